//! The pretrained EfficientNet-Lite0 extractor inside a database: weights read once from the
//! user's file, kept in the store, used again after reopening. Skips where
//! `../shared/data/efficientnet-lite0` is absent.

use std::path::PathBuf;

use lookalike::{Db, Error, Options};

use crate::common::*;

fn data() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/efficientnet-lite0");
    if d.join("efficientnet-lite0.safetensors").exists() {
        Some(d)
    } else {
        eprintln!("SKIP: {} not found", d.display());
        None
    }
}

#[test]
fn efficientnet_database_round_trip() {
    let Some(d) = data() else { return };
    let dir = tempdir();
    let path = dir.path().join("db");
    let mut files: Vec<PathBuf> = std::fs::read_dir(d.join("reference/inputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.truncate(6);
    let images: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let first_hits;
    {
        let db = Db::open_with(
            &path,
            Options::default()
                .extractor("efficientnet-lite0", "")
                .extractor_weights(d.join("efficientnet-lite0.safetensors")),
        )
        .unwrap();
        assert_eq!(db.active_model().dim, 1280);
        db.insert_images(images.iter().map(|b| (b.as_slice(), Some("photo"))))
            .unwrap();
        first_hits = db.nearest(&images[2], 3).unwrap();
        assert!(first_hits[0].distance < 1e-4, "an image finds itself first");
    }
    // Reopen without naming the file: the weights come from the store.
    let db = Db::open(&path).unwrap();
    assert_eq!(db.active_model().extractor, "efficientnet-lite0");
    let hits = db.nearest(&images[2], 3).unwrap();
    assert_eq!(
        hits.iter().map(|h| h.id).collect::<Vec<_>>(),
        first_hits.iter().map(|h| h.id).collect::<Vec<_>>()
    );
    for (a, b) in hits.iter().zip(&first_hits) {
        assert_eq!(
            a.distance, b.distance,
            "bit-identical after the store round trip"
        );
    }
}

#[test]
fn efficientnet_without_weights_is_a_typed_error() {
    let dir = tempdir();
    let err = Db::open_with(
        dir.path().join("db"),
        Options::default().extractor("efficientnet-lite0", ""),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Plugin { name, .. } if name == "efficientnet-lite0"),
        "{err}"
    );
    let err = Db::open_with(
        dir.path().join("db2"),
        Options::default()
            .extractor("efficientnet-lite0", "")
            .extractor_weights(dir.path().join("missing.safetensors")),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}
