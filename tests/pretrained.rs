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

#[test]
fn weights_of_another_architecture_are_a_typed_error_and_create_nothing() {
    use lookalike::lookalike_plugin::candle_core::{Device, Tensor};
    let dir = tempdir();
    // A well-formed safetensors file whose tensors are not EfficientNet-Lite0's (as a SimNet
    // or fused model's weights would be), and one that is not safetensors at all.
    let other = dir.path().join("other.safetensors");
    let t = Tensor::zeros(
        (4, 3),
        lookalike::lookalike_plugin::candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    lookalike::lookalike_plugin::candle_core::safetensors::save(
        &std::collections::HashMap::from([("conv1.weight".to_string(), t)]),
        &other,
    )
    .unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    for (i, weights) in [other, garbage].into_iter().enumerate() {
        let path = dir.path().join(format!("db{i}"));
        let err = Db::open_with(
            &path,
            Options::default()
                .extractor("efficientnet-lite0", "")
                .extractor_weights(&weights),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Plugin { name, .. } if name == "efficientnet-lite0"),
            "{err}"
        );
        // The database it would have created holds no model: opening it plainly works.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.active_model().extractor, "classic");
    }
}
