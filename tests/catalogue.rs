//! `catalogue.bin`: the ids and labels that opening reads instead of every entry
//! (`src/db/catalogue.rs`), the change log it is caught up from, and the format-4 store it
//! upgrades. Catching up after a kill is covered by `tests/crash.rs`.

use std::fs;
use std::path::Path;

use lookalike::{Db, ImageId, IndexSource, Options};

use crate::common::{insert_classes, noise_png, relaxed, tempdir};

/// Every id with its label, and every label with its count.
type View = (Vec<(ImageId, Option<String>)>, Vec<(String, usize)>);

/// Everything the catalogue answers, for comparing two opens.
fn view(db: &Db) -> View {
    let ids = db
        .ids()
        .into_iter()
        .map(|id| (id, db.label(id).unwrap()))
        .collect();
    (ids, db.labels().into_iter().collect())
}

fn raw_change_log(path: &Path) -> usize {
    let raw = crate::errors::raw_sled(path);
    raw.open_tree("changes").unwrap().len()
}

#[test]
fn open_reads_the_catalogue_file_and_the_changes_since() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    let before;
    {
        let db = Db::open_with(&path, relaxed()).unwrap();
        let ids = insert_classes(&db, 0, 30, 3);
        db.remove(ids[3]).unwrap();
        db.set_label(ids[4], Some("relabelled")).unwrap();
        db.set_label(ids[5], None).unwrap();
        before = view(&db);
    }
    assert!(path.join("catalogue.bin").exists());
    // The file's changes are trimmed from the log, all but the last (it keeps numbering up).
    assert_eq!(raw_change_log(&path), 1);
    let db = Db::open_with(&path, relaxed()).unwrap();
    assert_eq!(view(&db), before);
    assert_eq!(db.labels()["relabelled"], 1);
    // Filters and browsing read the same catalogue.
    assert_eq!(db.browse(Some("relabelled"), None, 10).len(), 1);
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
}

#[test]
fn open_trusts_the_file_only_as_far_as_its_marks() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    {
        let db = Db::open_with(&path, relaxed()).unwrap();
        insert_classes(&db, 0, 10, 3);
    }
    // Behind the file's back: a later insert's entry (id 11, above the file's bound) and a
    // logged label change of image 2 (numbered above what the file has seen), as a crash
    // before the next save would leave them.
    {
        let raw = crate::errors::raw_sled(&path);
        let entries = raw.open_tree("entries").unwrap();
        let changes = raw.open_tree("changes").unwrap();
        let last = changes.last().unwrap().map_or(0, |(k, _)| {
            u64::from_be_bytes(k.as_ref().try_into().unwrap())
        });
        let images = raw.open_tree("images").unwrap();
        let two = entries.get(2u64.to_be_bytes()).unwrap().unwrap();
        entries.insert(11u64.to_be_bytes(), two).unwrap();
        let bytes = images.get(2u64.to_be_bytes()).unwrap().unwrap();
        images.insert(11u64.to_be_bytes(), bytes).unwrap();
        changes
            .insert((last + 1).to_be_bytes(), &2u64.to_be_bytes())
            .unwrap();
        entries.remove(2u64.to_be_bytes()).unwrap();
        let meta = raw.open_tree("meta").unwrap();
        meta.insert(b"next_id", &[12u8][..]).unwrap();
        raw.flush().unwrap();
    }
    let db = Db::open_with(&path, relaxed()).unwrap();
    let ids: Vec<u64> = db.ids().into_iter().map(|i| i.0).collect();
    assert!(ids.contains(&11), "{ids:?}");
    assert!(!ids.contains(&2), "{ids:?}");
    assert_eq!(db.len(), 10);
}

#[test]
fn a_damaged_catalogue_file_is_replaced_by_a_scan() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    let before;
    {
        let db = Db::open_with(&path, relaxed()).unwrap();
        let ids = insert_classes(&db, 0, 20, 3);
        db.remove(ids[0]).unwrap();
        before = view(&db);
    }
    let file = path.join("catalogue.bin");
    let good = fs::read(&file).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    for damage in [bad, good[..good.len() / 2].to_vec(), Vec::new()] {
        fs::write(&file, damage).unwrap();
        let db = Db::open_with(&path, relaxed()).unwrap();
        assert_eq!(view(&db), before);
        drop(db);
        // Rewritten at that open.
        assert!(fs::read(&file).unwrap().len() > 8);
    }
    // Missing altogether: the same.
    fs::remove_file(&file).unwrap();
    let db = Db::open_with(&path, relaxed()).unwrap();
    assert_eq!(view(&db), before);
}

#[test]
fn a_catalogue_from_another_store_is_not_used() {
    let dir = tempdir();
    let big = dir.path().join("big.db");
    let small = dir.path().join("small.db");
    {
        let db = Db::open_with(&big, relaxed()).unwrap();
        insert_classes(&db, 0, 20, 3);
    }
    let want;
    {
        let db = Db::open_with(&small, relaxed()).unwrap();
        insert_classes(&db, 100, 105, 3);
        want = view(&db);
    }
    // Its ids go past what the small store ever gave: refused, the entries are scanned.
    fs::copy(big.join("catalogue.bin"), small.join("catalogue.bin")).unwrap();
    let db = Db::open_with(&small, relaxed()).unwrap();
    assert_eq!(view(&db), want);
}

#[test]
fn a_format_4_store_is_scanned_once_and_refused_by_format_4_builds() {
    let dir = tempdir();
    let path = dir.path().join("old.db");
    crate::persistence::fixture("main-v4.db", &path);
    {
        let db = Db::open_with(&path, Options::default()).unwrap();
        // What main stored (ids 1 and 8 removed): bag 2-6, sandal 7 and 9-12.
        let ids: Vec<u64> = db.ids().into_iter().map(|i| i.0).collect();
        assert_eq!(ids, vec![2, 3, 4, 5, 6, 7, 9, 10, 11, 12]);
        let labels = db.labels();
        assert_eq!((labels["bag"], labels["sandal"]), (5, 5));
        assert_eq!(db.label(ImageId(9)).unwrap().as_deref(), Some("sandal"));
        assert_eq!(db.index_info().source, IndexSource::Snapshot);
        for id in db.ids() {
            assert_eq!(db.nearest_to(id, 1).unwrap().len(), 1);
        }
        // Written at this first open.
        assert!(path.join("catalogue.bin").exists());
        // Ids go on after the largest ever given.
        let new = insert_classes(&db, 0, 1, 3);
        assert_eq!(new, vec![ImageId(13)]);
        db.remove(ImageId(2)).unwrap();
    }
    {
        let raw = crate::errors::raw_sled(&path);
        let format = raw
            .open_tree("meta")
            .unwrap()
            .get(b"format")
            .unwrap()
            .unwrap();
        // bincode's varint of 5: a format-4 build refuses the store (FormatTooNew).
        assert_eq!(format.as_ref(), &[5u8]);
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(db.len(), 10);
    assert!(db.label(ImageId(2)).is_err());
    assert_eq!(db.label(ImageId(13)).unwrap().as_deref(), Some("c0"));
}

#[test]
fn writers_and_saves_at_once_leave_a_catalogue_that_matches_the_store() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    let before;
    {
        let db = Db::open_with(&path, relaxed()).unwrap();
        insert_classes(&db, 0, 40, 3);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..10 {
                    insert_classes(&db, 100 + 4 * i, 104 + 4 * i, 3);
                }
            });
            s.spawn(|| {
                for id in 1..=20 {
                    let _ = db.remove(ImageId(id));
                    let _ = db.set_label(ImageId(id + 20), Some("moved"));
                }
            });
            s.spawn(|| {
                for _ in 0..10 {
                    db.flush().unwrap();
                }
            });
        });
        before = view(&db);
    }
    let db = Db::open_with(&path, relaxed()).unwrap();
    assert_eq!(view(&db), before);
    for (id, label) in before.0 {
        assert_eq!(db.meta(id).unwrap().label, label, "{id:?}");
    }
}

/// Sources and metadata of hits, from a database whose catalogue file is of format 1 (main
/// before the details bit: tests/fixtures/main-v5.db; scanned once) and then of format 2;
/// images with neither (whose entries queries do not read) and images given them later.
#[test]
fn hits_keep_sources_and_metadata_across_the_catalogue_upgrade() {
    let dir = tempdir();
    let path = dir.path().join("v5.db");
    crate::persistence::fixture("main-v5.db", &path);
    // ids 2-6 bag (with metadata {"shoot": "2024-05"}), 7-12 sandal; id 1 removed.
    let check = |db: &Db| {
        for id in db.ids().into_iter().filter(|i| i.0 <= 12) {
            let hits = db.nearest_to(id, 11).unwrap();
            assert_eq!(hits.len(), 11.min(db.len() - 1));
            for h in hits.iter().filter(|h| h.id.0 <= 12) {
                let src = h.source.as_deref().unwrap_or_default();
                let bag = h.id.0 <= 6;
                assert!(
                    src.starts_with(if bag { "src/bag/" } else { "src/sandal/" }),
                    "{h:?}"
                );
                let shoot = h.metadata.as_ref().and_then(|m| m.get("shoot"));
                assert_eq!(shoot.is_some(), bag, "{h:?}");
            }
        }
    };
    let (plain, later);
    {
        let db = Db::open_with(&path, Options::default()).unwrap();
        assert_eq!(db.len(), 11);
        check(&db);
        plain = db.insert_image(&noise_png(3, 28), Some("bare")).unwrap();
        later = db.insert_image(&noise_png(4, 28), Some("bare")).unwrap();
        db.set_meta(
            later,
            &lookalike::ImageMeta {
                label: Some("bare".into()),
                source: Some("given/later.png".into()),
                metadata: None,
            },
        )
        .unwrap();
    }
    // The first open scanned the entries and wrote format 2 (bincode's varint after the magic).
    assert_eq!(fs::read(path.join("catalogue.bin")).unwrap()[8], 2);
    for _ in 0..2 {
        let db = Db::open_with(&path, Options::default()).unwrap();
        check(&db);
        let hit = |id: ImageId| {
            db.nearest_to(ImageId(2), 12)
                .unwrap()
                .into_iter()
                .find(|h| h.id == id)
                .unwrap()
        };
        assert_eq!(hit(plain).source, None);
        assert_eq!(hit(plain).metadata, None);
        assert_eq!(hit(later).source.as_deref(), Some("given/later.png"));
        assert_eq!(hit(later).label.as_deref(), Some("bare"));
    }
}
