//! Data and index survive reopening; a missing, stale or corrupt index snapshot is detected
//! and caught up or rebuilt.

use std::fs;
use std::path::Path;

use lookalike::{Db, Hit, IndexSource, Options};

use crate::common::*;

fn fill(db: &Db, n: u64, offset: u64) -> Vec<lookalike::ImageId> {
    let images: Vec<Vec<u8>> = (offset..offset + n)
        .map(|i| class_png((i % 4) as u32, i))
        .collect();
    let labels = ["a", "b", "c", "d"];
    db.insert_images(
        images
            .iter()
            .enumerate()
            .map(|(i, b)| (b.as_slice(), Some(labels[i % 4]))),
    )
    .unwrap()
}

fn ids(hits: &[Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.id.0).collect()
}

fn query(db: &Db) -> Vec<u64> {
    ids(&db.nearest(&class_png(2, 424242), 15).unwrap())
}

#[test]
fn reopen_uses_a_valid_snapshot() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let before;
    {
        let db = Db::open(&path).unwrap();
        fill(&db, 100, 0);
        before = query(&db);
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.len(), 100);
    assert_eq!(db.labels().get("a"), Some(&25));
    assert_eq!(query(&db), before);
}

#[test]
fn missing_snapshot_is_rebuilt() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let before;
    {
        let db = Db::open(&path).unwrap();
        fill(&db, 60, 0);
        before = query(&db);
    }
    fs::remove_file(path.join("index.faiss")).unwrap();
    let db = Db::open(&path).unwrap();
    assert!(
        matches!(db.index_info().source, IndexSource::Rebuilt { .. }),
        "{:?}",
        db.index_info()
    );
    assert_eq!(query(&db), before);
    drop(db);
    fs::remove_file(path.join("index.stamp")).unwrap();
    let db = Db::open(&path).unwrap();
    assert!(
        matches!(db.index_info().source, IndexSource::Rebuilt { ref reason } if reason.contains("no snapshot"))
    );
    assert_eq!(query(&db), before);
}

fn copy_snapshot(from: &Path, to: &Path) {
    for f in ["index.faiss", "index.vectors", "index.stamp"] {
        fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn stale_snapshot_is_caught_up() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let saved = dir.path().join("saved");
    fs::create_dir(&saved).unwrap();
    let first;
    {
        let db = Db::open(&path).unwrap();
        first = fill(&db, 50, 0);
    }
    copy_snapshot(&path, &saved);
    let (added, before);
    {
        let db = Db::open(&path).unwrap();
        added = fill(&db, 30, 1000);
        db.remove(first[0]).unwrap();
        db.remove(first[1]).unwrap();
        before = query(&db);
    }
    copy_snapshot(&saved, &path); // put the old snapshot back: it lags the store
    let db = Db::open(&path).unwrap();
    assert_eq!(
        db.index_info().source,
        IndexSource::CaughtUp {
            added: 30,
            removed: 2
        }
    );
    assert_eq!(db.index_info().len, 78);
    assert_eq!(query(&db), before);
    let all = ids(&db.nearest(&class_png(0, 0), 100).unwrap());
    assert_eq!(all.len(), 78);
    assert!(!all.contains(&first[0].0) && !all.contains(&first[1].0));
    assert!(added.iter().all(|id| all.contains(&id.0)));
}

#[test]
fn corrupt_snapshot_is_rebuilt() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let before;
    {
        let db = Db::open(&path).unwrap();
        fill(&db, 40, 0);
        before = query(&db);
    }
    let mut bytes = fs::read(path.join("index.faiss")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    fs::write(path.join("index.faiss"), bytes).unwrap();
    {
        let db = Db::open(&path).unwrap();
        match db.index_info().source {
            IndexSource::Rebuilt { reason } => assert!(reason.contains("corrupt"), "{reason}"),
            other => panic!("expected a rebuild, got {other:?}"),
        }
        assert_eq!(query(&db), before);
    }
    fs::write(path.join("index.stamp"), b"garbage").unwrap();
    let db = Db::open(&path).unwrap();
    assert!(
        matches!(db.index_info().source, IndexSource::Rebuilt { ref reason } if reason.contains("corrupt"))
    );
    assert_eq!(query(&db), before);
}

fn hnsw_options() -> Options {
    Options::default().index(lookalike::IndexKind::Hnsw {
        m: 16,
        ef_search: 64,
    })
}

#[test]
fn hnsw_snapshot_with_removals_round_trips() {
    let dir = tempdir();
    let opts = hnsw_options;
    let path = dir.path().join("db");
    let gone;
    {
        let db = Db::open_with(&path, opts()).unwrap();
        let ids = fill(&db, 120, 0);
        gone = ids[5];
        db.remove(gone).unwrap();
    }
    let db = Db::open_with(&path, opts()).unwrap();
    assert_eq!(db.index_info().kind, "hnsw");
    assert_eq!(db.index_info().len, 119);
    let all = ids(&db.nearest(&class_png(1, 5), 200).unwrap());
    assert_eq!(all.len(), 119);
    assert!(!all.contains(&gone.0));
}

/// An HNSW snapshot is read with its vectors mapped from `index.vectors` (`index/mapped.cpp`);
/// inserts (whose growth copies them into the index's own memory), removals, a flush that
/// appends to the same file, and another reopen all keep every image findable.
#[test]
fn a_mapped_hnsw_snapshot_takes_inserts_removals_and_reopens() {
    let dir = tempdir();
    let opts = hnsw_options;
    let path = dir.path().join("db");
    {
        let db = Db::open_with(&path, opts()).unwrap();
        fill(&db, 90, 0);
    }
    let (more, gone);
    {
        let db = Db::open_with(&path, opts()).unwrap();
        assert_eq!(db.index_info().source, IndexSource::Snapshot);
        more = fill(&db, 40, 90);
        gone = more[3];
        db.remove(gone).unwrap();
        db.flush().unwrap();
        let all = ids(&db.nearest(&class_png(1, 5), 200).unwrap());
        assert_eq!(all.len(), 129);
        assert!(all.contains(&more[0].0) && !all.contains(&gone.0));
        // Stored images, old and new, are found by their own bytes.
        for id in [
            more[0],
            more[39],
            lookalike::ImageId(1),
            lookalike::ImageId(90),
        ] {
            let hits = db.nearest(&db.image(id).unwrap(), 1).unwrap();
            assert_eq!(hits[0].id, id);
            assert!(hits[0].distance < 1e-4, "{id}: {}", hits[0].distance);
        }
    }
    let db = Db::open_with(&path, opts()).unwrap();
    // The snapshot keeps the removed vector (HNSW cannot drop it); the open masks it again.
    assert_eq!(
        db.index_info().source,
        IndexSource::CaughtUp {
            added: 0,
            removed: 1
        }
    );
    assert_eq!(db.index_info().len, 129);
    let all = ids(&db.nearest(&class_png(1, 5), 200).unwrap());
    assert_eq!(all.len(), 129);
    assert!(all.contains(&more[39].0) && !all.contains(&gone.0));
}

#[test]
fn auto_index_turns_approximate_past_the_limit() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed().exact_limit(100));
    fill(&db, 100, 0);
    assert_eq!(db.index_info().kind, "exact");
    fill(&db, 1, 500);
    assert_eq!(db.index_info().kind, "hnsw");
    assert_eq!(db.nearest(&class_png(0, 1), 101).unwrap().len(), 101);
}

/// An extractor whose code version is chosen per open: version 1 embeds an image as its mean
/// colour, version 2 as the mean colour reversed (the same "weights", other embeddings).
mod versioned {
    use lookalike::lookalike_plugin::candle_core::{Tensor, D};
    use lookalike::lookalike_plugin::{
        Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
    };

    #[derive(Debug)]
    pub struct Versioned(pub u32);

    impl Extractor for Versioned {
        fn name(&self) -> &str {
            "versioned"
        }
        fn version(&self) -> u32 {
            self.0
        }
        fn spec(&self) -> ExtractorSpec {
            ExtractorSpec {
                input: InputSpec::rgb(8, 8),
                dim: 3,
                metric: Metric::L2,
            }
        }
        fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
            let mean = batch.mean(D::Minus1)?.mean(D::Minus1)?;
            Ok(if self.0 == 1 {
                mean
            } else {
                mean.index_select(&Tensor::new(&[2u32, 1, 0], batch.device())?, 1)?
            })
        }
        fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
            Ok(Vec::new())
        }
    }

    impl ExtractorPlugin for Versioned {
        fn name(&self) -> &str {
            "versioned"
        }
        fn build(&self, _: &str, _: Option<&[u8]>) -> Result<Box<dyn Extractor>, PluginError> {
            Ok(Box::new(Versioned(self.0)))
        }
    }
}

#[test]
fn a_changed_extractor_version_embeds_the_images_again_on_open() {
    let dir = tempdir();
    let opts = |version: u32| {
        relaxed()
            .register(std::sync::Arc::new(versioned::Versioned(version)))
            .extractor("versioned", "")
    };
    let db = open(dir.path(), opts(1));
    let ids = fill(&db, 12, 0);
    let old = db.embedding(ids[3]).unwrap();
    drop(db);

    let db = open(dir.path(), opts(2));
    match db.index_info().source {
        IndexSource::Rebuilt { reason } => assert!(reason.contains("version 1 to 2"), "{reason}"),
        other => panic!("the stale snapshot was used: {other:?}"),
    }
    // Stored embeddings and queries now come from the same code.
    let new = db.embedding(ids[3]).unwrap();
    assert_ne!(new, old);
    let image = db.image(ids[3]).unwrap();
    let fresh = db.embed(&[image.as_slice()]).unwrap();
    assert_eq!(new, fresh[0]);
    assert_eq!(db.nearest(&image, 1).unwrap()[0].distance, 0.0);
    assert_eq!(db.len(), 12);
    drop(db);

    // The record took the new version: the next open uses the snapshot again.
    let db = open(dir.path(), opts(2));
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.embedding(ids[3]).unwrap(), new);
}

/// Copies the fixture database written by main at e74f980 (store format 1, no decode
/// policies; see tests/fixtures/README.md) into `to`, unpacking its gzipped sled file.
fn main_v1_fixture(to: &Path) {
    fixture("main-v1.db", to)
}

/// Copies fixture database `name` (tests/fixtures/README.md) into `to`, unpacking its gzipped
/// sled file.
pub(crate) fn fixture(name: &str, to: &Path) {
    use std::io::Read;
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::create_dir_all(to.join("store")).unwrap();
    for f in ["index.faiss", "index.stamp", "store/conf"] {
        fs::copy(from.join(f), to.join(f)).unwrap();
    }
    // Written by later formats only.
    for f in ["catalogue.bin", "index.vectors"] {
        if from.join(f).exists() {
            fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
    if from.join("images").exists() {
        fs::create_dir_all(to.join("images")).unwrap();
        for entry in fs::read_dir(from.join("images")).unwrap() {
            let name = entry.unwrap().file_name();
            fs::copy(
                from.join("images").join(&name),
                to.join("images").join(&name),
            )
            .unwrap();
        }
    }
    for entry in fs::read_dir(from.join("store")).unwrap() {
        let name = entry.unwrap().file_name();
        if name.to_string_lossy().starts_with("snap.") {
            fs::copy(from.join("store").join(&name), to.join("store").join(&name)).unwrap();
        }
    }
    let mut db = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(from.join("store/db.gz")).unwrap())
        .read_to_end(&mut db)
        .unwrap();
    fs::write(to.join("store/db"), db).unwrap();
}

#[test]
fn a_database_written_by_format_1_is_upgraded_and_embedded_again() {
    let dir = tempdir();
    let path = dir.path().join("old.db");
    main_v1_fixture(&path);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let sandal = fs::read(sample.join("sandal/t10k-00008.png")).unwrap();
    {
        let db = Db::open(&path).unwrap();
        // The images, ids and labels as main stored them (id 1 was removed).
        assert_eq!(db.len(), 11);
        let labels = db.labels();
        assert_eq!((labels["bag"], labels["sandal"]), (5, 6));
        assert_eq!(db.image(lookalike::ImageId(7)).unwrap(), sandal);
        // Embedded again under the new decode policy, not trusted from the old snapshot.
        match &db.index_info().source {
            IndexSource::Rebuilt { reason } => {
                assert!(reason.contains("decode policy"), "{reason}")
            }
            other => panic!("expected a rebuild, got {other:?}"),
        }
        let hits = db.nearest(&sandal, 3).unwrap();
        assert_eq!(hits[0].id.0, 7);
        assert!(hits[0].distance < 1e-4, "{}", hits[0].distance);
        assert_eq!(hits[0].label.as_deref(), Some("sandal"));
        // New inserts work beside the old records, with the next id (sled's id generator,
        // which the format-1 store used, would have jumped to about 2,000,000 here).
        let id = db.insert_image(&class_png(1, 5), Some("new")).unwrap();
        assert_eq!(id.0, 13);
    }
    // Once only: the next open trusts the new snapshot.
    let db = Db::open(&path).unwrap();
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.len(), 12);
    assert_eq!(db.nearest(&sandal, 1).unwrap()[0].id.0, 7);
}

#[test]
fn a_snapshot_that_cannot_be_written_never_fails_open_or_flush() {
    let dir = tempdir();
    let path = dir.path().join("db");
    {
        let db = Db::open(&path).unwrap();
        fill(&db, 20, 0);
    }
    // A folder where the snapshot's temporary file goes: every save fails.
    fs::remove_file(path.join("index.stamp")).unwrap();
    fs::create_dir(path.join("index.faiss.tmp")).unwrap();
    let db = Db::open(&path).unwrap();
    let info = db.index_info();
    assert!(matches!(info.source, IndexSource::Rebuilt { .. }));
    assert!(info.snapshot_error.is_some(), "{info:?}");
    fill(&db, 4, 100);
    db.flush().unwrap();
    assert!(db.index_info().snapshot_error.is_some());
    assert_eq!(db.len(), 24);
    // Once the obstacle is gone, the next flush writes it.
    fs::remove_dir(path.join("index.faiss.tmp")).unwrap();
    fill(&db, 1, 200);
    db.flush().unwrap();
    assert_eq!(db.index_info().snapshot_error, None);
    drop(db);
    let db = Db::open(&path).unwrap();
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.len(), 25);
}

#[test]
fn temporary_snapshot_files_left_behind_are_removed_on_open() {
    let dir = tempdir();
    let path = dir.path().join("db");
    drop(Db::open(&path).unwrap());
    fs::write(path.join("index.faiss.tmp"), vec![0u8; 1 << 20]).unwrap();
    fs::write(path.join("index.stamp.tmp"), b"half a stamp").unwrap();
    drop(Db::open(&path).unwrap());
    assert!(!path.join("index.faiss.tmp").exists());
    assert!(!path.join("index.stamp.tmp").exists());
}

#[test]
fn ids_are_dense_across_reopens() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let mut ids = Vec::new();
    for i in 0..5 {
        let db = Db::open(&path).unwrap();
        ids.push(db.insert_image(&class_png(0, i), None).unwrap().0);
        // A refused batch takes no id that a later insert of this handle reuses.
        assert!(db
            .insert_images([
                (class_png(1, i).as_slice(), None),
                (b"junk".as_slice(), None)
            ])
            .is_err());
    }
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    let db = Db::open(&path).unwrap();
    db.remove(lookalike::ImageId(5)).unwrap();
    drop(db);
    // The largest id was removed: it is still never given again.
    let db = Db::open(&path).unwrap();
    assert_eq!(db.insert_image(&class_png(2, 9), None).unwrap().0, 6);
}

#[test]
fn a_database_in_a_folder_whose_name_is_not_utf8_opens() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let path = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.db"));
    {
        let db = Db::open(&path).unwrap();
        fill(&db, 8, 0);
        db.flush().unwrap();
        // FAISS writes and reads the snapshot through the database's own files (FAISS's own
        // file functions take UTF-8 paths only).
        assert_eq!(db.index_info().snapshot_error, None);
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(db.len(), 8);
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.nearest(&class_png(0, 0), 1).unwrap()[0].id.0, 1);
}

/// Unmounts a test's tmpfs, however the test ends.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_writes_and_loses_nothing() {
    use lookalike::Error;
    let dir = tempdir();
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: a 24 MiB tmpfs cannot be mounted here (the test needs root)");
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let path = mnt.join("db");
    let db = Db::open(&path).unwrap();
    // Photos of about 1 MB each (random pixels do not compress) until the disk is full.
    let mut stored = Vec::new();
    let refused = loop {
        let i = stored.len() as u64;
        assert!(i < 100, "24 MiB cannot hold 100 images of 1 MB");
        match db.insert_image(&noise_png(i, 600), Some("photo")) {
            Ok(id) => stored.push(id),
            Err(e @ Error::DiskFull { .. }) => break e,
            Err(e) => panic!("after {i} images: expected DiskFull, got {e}"),
        }
    };
    assert!(refused.to_string().contains("free"), "{refused}");
    assert!(stored.len() >= 5, "only {} images fit", stored.len());
    for id in &stored {
        db.image(*id).unwrap();
    }
    drop(db);
    // Opening while the disk is still full: refused or fine, never damaging.
    match Db::open(&path) {
        Ok(db) => assert_eq!(db.len(), stored.len()),
        Err(Error::DiskFull { .. }) => {}
        Err(e) => panic!("open on a full disk: {e}"),
    }
    // Space freed: everything acknowledged is there and writes work again.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(grown, "remount the tmpfs larger");
    let db = Db::open(&path).unwrap();
    assert_eq!(db.len(), stored.len());
    let hits = db.nearest(&noise_png(0, 600), 1).unwrap();
    assert_eq!(hits[0].id, stored[0]);
    db.insert_image(&noise_png(1000, 600), None).unwrap();
}

#[test]
fn a_database_written_by_format_2_gets_content_hashes_and_keeps_everything() {
    use lookalike::{ContentHash, ImageId, ImageMeta, InsertMode, Inserted};
    let dir = tempdir();
    let path = dir.path().join("old.db");
    fixture("main-v2.db", &path);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let sandal = fs::read(src.join("sandal/t10k-00008.png")).unwrap();
    {
        let db = Db::open(&path).unwrap();
        // What main stored (id 1 removed): bag 2-6, dup 7, photo 8, sandal 9-14.
        assert_eq!(db.len(), 13);
        let labels = db.labels();
        assert_eq!((labels["bag"], labels["dup"], labels["photo"]), (5, 1, 1));
        assert_eq!(labels["sandal"], 6);
        assert_eq!(db.image(ImageId(9)).unwrap(), sandal);
        // The upgrade hashed every image's bytes, inline and packed.
        assert_eq!(
            db.find_by_hash(&ContentHash::of(&sandal)).unwrap(),
            vec![ImageId(7), ImageId(9)]
        );
        let photo = db.image(ImageId(8)).unwrap();
        assert_eq!(photo.len(), 39_205);
        let info = db.info(ImageId(8)).unwrap();
        assert_eq!(info.hash, ContentHash::of(&photo));
        assert_eq!((info.width, info.height), (320, 240));
        assert_eq!(info.meta, ImageMeta::label("photo"));
        // The model and its snapshot are as they were: nothing is embedded again.
        assert_eq!(db.index_info().source, lookalike::IndexSource::Snapshot);
        let hits = db.nearest(&sandal, 2).unwrap();
        assert!(hits[0].distance.max(hits[1].distance) < 1e-4);
        assert_eq!(hits[0].source, None);
        // Writes after the upgrade: a byte-identical photo is recognised, a new one stored.
        let m = ImageMeta::default().source("again.jpg");
        let out = db
            .insert_images_with(
                [(&photo[..], &m), (&class_png(1, 5)[..], &m)],
                InsertMode::SkipExisting,
            )
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap(), &Inserted::Existing(ImageId(8)));
        assert_eq!(out[1].as_ref().unwrap(), &Inserted::New(ImageId(15)));
        db.remove(ImageId(7)).unwrap();
        assert_eq!(
            db.find_by_hash(&ContentHash::of(&sandal)).unwrap(),
            vec![ImageId(9)]
        );
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(db.len(), 13);
    assert_eq!(
        db.meta(ImageId(15)).unwrap().source.as_deref(),
        Some("again.jpg")
    );
}

#[test]
fn a_growing_database_saves_its_snapshot_as_it_goes() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let db = Db::open_with(&path, crate::common::relaxed()).unwrap();
    for batch in 0..12 {
        fill(&db, 1_000, batch * 1_000);
    }
    // 12,000 vectors, no flush: an insert saved it once the index held 10,000 more than the
    // snapshot (at least; a quarter of the index above 40,000), appending to index.vectors.
    let vectors = fs::metadata(path.join("index.vectors")).unwrap().len();
    assert!(vectors >= 10_000 * 2_408 * 4, "{vectors} bytes of vectors");
    assert!(vectors < 12_000 * 2_408 * 4, "{vectors} bytes of vectors");
    assert_eq!(db.index_info().snapshot_error, None);
    drop(db);
    let db = Db::open_with(&path, crate::common::relaxed()).unwrap();
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.len(), 12_000);
}
