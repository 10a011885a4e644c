//! Every bad input gets its typed error, and loses no data.

use lookalike::{Db, Error, ImageId, Options, Query};

use crate::common::*;

/// A valid PNG header that claims `w x h` pixels, followed by a tiny body.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = class_png(0, 1);
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); CRC covers type + data.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

#[test]
fn undecodable_image() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let err = db
        .insert_image(b"definitely not an image", Some("x"))
        .unwrap_err();
    assert!(matches!(err, Error::Undecodable { .. }), "{err}");
    assert!(
        err.to_string().contains("PNG"),
        "message names the supported formats: {err}"
    );
    let mut truncated = class_png(0, 1);
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(
        db.insert_image(&truncated, None),
        Err(Error::Undecodable { .. })
    ));
    assert!(matches!(db.nearest(b"", 3), Err(Error::Undecodable { .. })));
    assert_eq!(db.len(), 0, "nothing stored");
}

#[test]
fn oversized_images() {
    let dir = tempdir();
    let db = open(
        dir.path(),
        Options::default()
            .max_image_bytes(2000)
            .max_image_pixels(32 * 32),
    );
    let big = noise_png(1, 64);
    assert!(big.len() > 2000);
    let err = db.insert_image(&big, None).unwrap_err();
    assert!(
        matches!(err, Error::ImageTooLarge { what, .. } if what.contains("bytes")),
        "{err}"
    );
    let err = db.insert_image(&class_png(0, 1), None).map(|_| ()); // 32x32: at the limit, fine
    assert!(err.is_ok());
    drop(db);
    // A decompression bomb: a tiny file whose header claims 100k x 100k pixels.
    let db = open(dir.path(), Options::default());
    let bomb = png_claiming(100_000, 100_000);
    let err = db.insert_image(&bomb, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageTooLarge {
                what: "pixel count",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(db.len(), 1);
}

#[test]
fn zero_k_and_empty_database() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let q = class_png(0, 1);
    assert!(matches!(
        db.nearest(&q, 3),
        Err(Error::Empty { filter: None })
    ));
    let id = db.insert_image(&q, Some("a")).unwrap();
    assert!(matches!(db.nearest(&q, 0), Err(Error::ZeroK)));
    assert!(matches!(db.nearest_to(id, 0), Err(Error::ZeroK)));
    let err = db.nearest_with(&q, &Query::k(3).labels(["b"])).unwrap_err();
    assert!(
        matches!(&err, Error::Empty { filter: Some(f) } if f == "labelled b"),
        "{err}"
    );
    assert!(
        matches!(db.nearest_to(id, 3), Err(Error::Empty { .. })),
        "nothing but itself"
    );
}

#[test]
fn unknown_image_id() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    db.insert_image(&class_png(0, 1), None).unwrap();
    let ghost = ImageId(987_654);
    assert!(matches!(db.image(ghost), Err(Error::UnknownImage(g)) if g == ghost));
    assert!(matches!(db.label(ghost), Err(Error::UnknownImage(_))));
    assert!(matches!(
        db.set_label(ghost, Some("x")),
        Err(Error::UnknownImage(_))
    ));
    assert!(matches!(db.remove(ghost), Err(Error::UnknownImage(_))));
    assert!(matches!(
        db.nearest_to(ghost, 1),
        Err(Error::UnknownImage(_))
    ));
    assert_eq!(db.len(), 1);
}

#[test]
fn unknown_extractor_lists_known_ones() {
    let dir = tempdir();
    let err = Db::open_with(
        dir.path().join("db"),
        Options::default().extractor("nope", ""),
    )
    .unwrap_err();
    match &err {
        Error::UnknownExtractor { name, known } => {
            assert_eq!(name, "nope");
            assert!(known.contains(&"classic".to_string()));
        }
        other => panic!("expected UnknownExtractor, got {other}"),
    }
    assert!(err.to_string().contains("classic"), "{err}");
}

#[test]
fn bad_batch_inserts_nothing() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let good = class_png(0, 1);
    let err = db
        .insert_images([
            (good.as_slice(), Some("a")),
            (b"junk".as_slice(), Some("a")),
        ])
        .unwrap_err();
    assert!(
        matches!(&err, Error::InBatch { index: 1, source } if matches!(**source, Error::Undecodable { .. })),
        "{err}"
    );
    assert_eq!(db.len(), 0);
    assert!(matches!(
        db.insert_image(&good, Some("")),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn locked_in_the_same_process() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let err = Db::open(dir.path().join("db")).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(db);
    Db::open(dir.path().join("db")).expect("reopens once the first handle is gone");
}

/// Opens the store with sled directly, waiting while a dropped handle's background thread still
/// holds sled's file lock.
pub(crate) fn raw_sled(path: &std::path::Path) -> sled::Db {
    for _ in 0..250 {
        match sled::open(path.join("store")) {
            Ok(db) => return db,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    sled::open(path.join("store")).unwrap()
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let id;
    {
        let db = Db::open(&path).unwrap();
        id = db.insert_image(&class_png(0, 1), Some("a")).unwrap();
        db.insert_image(&class_png(1, 2), Some("b")).unwrap();
    }
    // Damage the stored embedding of `id` with sled directly.
    {
        let raw = raw_sled(&path);
        let emb = raw.open_tree("embeddings").unwrap();
        let (k, _) = emb.iter().next().unwrap().unwrap();
        emb.insert(k, &[0xff, 0xff, 0xff][..]).unwrap();
        raw.flush().unwrap();
    }
    {
        let db = Db::open(&path).unwrap(); // the index snapshot is intact: open succeeds
        let err = db.nearest_to(id, 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    what: "embedding",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            db.image(id).unwrap(),
            class_png(0, 1),
            "other data still readable"
        );
    }
    // Damage an entry: reading it reports it instead of panicking. Open reads
    // catalogue.bin, not the entries, so it sees the damage only when it has to scan them.
    {
        let raw = raw_sled(&path);
        let entries = raw.open_tree("entries").unwrap();
        entries
            .insert(id.0.to_be_bytes(), &[9u8, 9, 9, 9, 9][..])
            .unwrap();
        raw.flush().unwrap();
    }
    {
        let db = Db::open(&path).unwrap();
        let err = db.meta(id).unwrap_err();
        assert!(matches!(err, Error::Corrupt { what: "entry", .. }), "{err}");
    }
    std::fs::remove_file(path.join("catalogue.bin")).unwrap();
    let err = Db::open(&path).unwrap_err();
    assert!(matches!(err, Error::Corrupt { what: "entry", .. }), "{err}");
}

/// An extractor whose dimension changed since the database was created.
#[derive(Debug)]
struct Sized(usize);

impl lookalike::lookalike_plugin::Extractor for Sized {
    fn name(&self) -> &str {
        "sized"
    }
    fn spec(&self) -> lookalike::lookalike_plugin::ExtractorSpec {
        lookalike::lookalike_plugin::ExtractorSpec {
            input: lookalike::lookalike_plugin::InputSpec::luma(4, 4),
            dim: self.0,
            metric: lookalike::lookalike_plugin::Metric::L2,
        }
    }
    fn embed(
        &self,
        batch: &lookalike::lookalike_plugin::candle_core::Tensor,
    ) -> Result<
        lookalike::lookalike_plugin::candle_core::Tensor,
        lookalike::lookalike_plugin::PluginError,
    > {
        let n = batch.dim(0)?;
        Ok(batch.reshape((n, 16))?.narrow(1, 0, self.0.min(16))?)
    }
    fn save_weights(&self) -> Result<Vec<u8>, lookalike::lookalike_plugin::PluginError> {
        Ok(Vec::new())
    }
}

impl lookalike::lookalike_plugin::ExtractorPlugin for Sized {
    fn name(&self) -> &str {
        "sized"
    }
    fn build(
        &self,
        _: &str,
        _: Option<&[u8]>,
    ) -> Result<
        Box<dyn lookalike::lookalike_plugin::Extractor>,
        lookalike::lookalike_plugin::PluginError,
    > {
        Ok(Box::new(Sized(self.0)))
    }
}

#[test]
fn extractor_dimension_mismatch_with_the_store() {
    let dir = tempdir();
    let path = dir.path().join("db");
    {
        let db = Db::open_with(
            &path,
            Options::default()
                .register(std::sync::Arc::new(Sized(8)))
                .extractor("sized", ""),
        )
        .unwrap();
        db.insert_image(&class_png(0, 1), None).unwrap();
    }
    let err = Db::open_with(
        &path,
        Options::default().register(std::sync::Arc::new(Sized(12))),
    )
    .unwrap_err();
    match err {
        Error::DimensionMismatch { expected, got, .. } => assert_eq!((expected, got), (8, 12)),
        other => panic!("expected DimensionMismatch, got {other}"),
    }
    // The data is intact: with the right plugin the database opens and answers.
    let db = Db::open_with(
        &path,
        Options::default().register(std::sync::Arc::new(Sized(8))),
    )
    .unwrap();
    assert_eq!(db.nearest(&class_png(0, 1), 1).unwrap().len(), 1);
}
