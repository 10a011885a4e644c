//! Entry points of the fuzz targets in `fuzz/` and of their regression tests
//! (`tests/fuzz_regressions.rs`): each feeds arbitrary bytes to one of the database's own
//! readers and must return, never panic or abort. Not a stable API.

use lookalike_plugin::InputSpec;

/// Encoded image bytes through the decode policy every insert and query uses, at a colour and
/// a grey input size.
pub fn image(bytes: &[u8]) {
    for input in [InputSpec::rgb(32, 24), InputSpec::luma(28, 28)] {
        let _ = crate::decode_for(bytes, &input);
    }
}

/// Bytes decoded as every kind of record the store reads (image, packed image, entry,
/// embedding, model, checkpoint, meta values, keys).
pub fn record(bytes: &[u8]) {
    crate::store::decode_every_record(bytes);
}

/// Bytes as model weights: safetensors read, then built into each built-in extractor (as a
/// stored model is on open) and into each trainable one (as a checkpoint is on resume), and
/// as optimiser buffers.
pub fn weights(bytes: &[u8]) {
    // The plugins with weights read them with this reader (classic ignores them): an input it
    // refuses fails every build the same way, so the networks (slow to set up, about 4 inputs
    // a second) are built only for readable safetensors.
    if lookalike_plugin::nn::read_safetensors(bytes).is_err() {
        return;
    }
    for plugin in crate::extractors::builtin() {
        if plugin.name() == "fused" {
            // ResNet50 + VGG19 take seconds to set up per input; its loader is the same
            // safetensors reader as EfficientNet's, which is fuzzed.
            continue;
        }
        let _ = plugin.build("", Some(bytes));
        if let Some(Ok(t)) = plugin.trainable("", Some(bytes)) {
            let _ = t.freeze();
        }
    }
}

/// Bytes as a training checkpoint record, and its weights and optimiser buffers as
/// safetensors, as a resumed job reads them.
pub fn checkpoint(bytes: &[u8]) {
    if let Ok(c) = crate::store::decode_checkpoint(bytes) {
        let _ = lookalike_plugin::nn::read_safetensors(&c.weights);
        let _ = lookalike_plugin::nn::read_safetensors(&c.optimiser);
    }
}

/// Bytes as an index snapshot: as its stamp, and as its FAISS file, which FAISS reads only
/// when the database's walk of it accepts it (as on open); and as `catalogue.bin`, the other
/// file written beside the store.
pub fn snapshot(bytes: &[u8]) {
    crate::index::snapshot::fuzz(bytes);
    crate::db::fuzz_catalogue(bytes);
}

#[cfg(test)]
mod seeds {
    use std::path::{Path, PathBuf};

    fn dir(target: &str) -> PathBuf {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes the seed corpora of the fuzz targets into `fuzz/corpus/` (committed): run by
    /// hand with `cargo test --lib write_fuzz_seeds -- --ignored` when a format changes.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        use image::ImageFormat as F;
        let img = image::RgbaImage::from_fn(9, 7, |x, y| {
            image::Rgba([(x * 28) as u8, (y * 36) as u8, 90, (x * y * 4) as u8])
        });
        for (name, format) in [
            ("a.png", F::Png),
            ("a.gif", F::Gif),
            ("a.bmp", F::Bmp),
            ("a.tiff", F::Tiff),
            ("a.webp", F::WebP),
        ] {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, format).unwrap();
            std::fs::write(dir("image").join(name), out.into_inner()).unwrap();
        }
        let rgb = image::DynamicImage::ImageRgba8(img).to_rgb8();
        let mut out = std::io::Cursor::new(Vec::new());
        rgb.write_to(&mut out, F::Jpeg).unwrap();
        std::fs::write(dir("image").join("a.jpg"), out.into_inner()).unwrap();

        for (name, bytes) in crate::store::seed_records() {
            std::fs::write(dir("record").join(name), &bytes).unwrap();
            if name == "checkpoint" {
                std::fs::write(dir("checkpoint").join(name), &bytes).unwrap();
            }
        }
        let t =
            candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let map = std::collections::HashMap::from([("w".to_string(), t)]);
        candle_core::safetensors::save(&map, dir("weights").join("small.safetensors")).unwrap();

        for (name, shape, n) in [
            ("flat", crate::index::Shape::Flat, 3),
            ("hnsw", crate::index::Shape::Hnsw { m: 4 }, 5),
        ] {
            let bytes = crate::index::faiss_file::written(shape, lookalike_plugin::Metric::L2, n);
            std::fs::write(dir("snapshot").join(name), bytes).unwrap();
        }
        std::fs::write(
            dir("snapshot").join("catalogue"),
            crate::db::catalogue_seed(),
        )
        .unwrap();
    }
}
