//! Helpers shared by the integration tests: synthetic images and temporary databases.

use std::io::Cursor;

use image::{ImageFormat, RgbImage};
use lookalike::{Db, Durability, Options};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Encodes an RGB image in `format`.
pub fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encoding to memory");
    out.into_inner()
}

/// Inserts images `from..to`: image `i` is `class_png(i % classes, i)` labelled `c{class}`.
pub fn insert_classes(db: &Db, from: u64, to: u64, classes: u64) -> Vec<lookalike::ImageId> {
    let images: Vec<(Vec<u8>, String)> = (from..to)
        .map(|i| {
            (
                class_png((i % classes) as u32, i),
                format!("c{}", i % classes),
            )
        })
        .collect();
    db.insert_images(images.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap()
}

/// A 32x32 PNG of class `class` (0..4: horizontal stripes, vertical stripes, a disc, a
/// diagonal) with per-image noise from `seed`.
pub fn class_png(class: u32, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let phase: u32 = rng.random_range(0..4);
    let tint: [u8; 3] = [
        rng.random_range(0..60),
        rng.random_range(0..60),
        rng.random_range(0..60),
    ];
    let img = RgbImage::from_fn(32, 32, |x, y| {
        let on = match class % 4 {
            0 => ((y + phase) / 4).is_multiple_of(2),
            1 => ((x + phase) / 4).is_multiple_of(2),
            2 => {
                let (dx, dy) = (x as i32 - 16, y as i32 - 16);
                dx * dx + dy * dy < (90 + phase * 10) as i32
            }
            _ => (x + y + phase) % 8 < 4,
        };
        let base: u8 = if on { 200 } else { 30 };
        let n: u8 = rng.random_range(0..20);
        image::Rgb([
            base + n / 2 + tint[0] / 4,
            base + n / 2 + tint[1] / 4,
            base + tint[2] / 4,
        ])
    });
    encode(&img, ImageFormat::Png)
}

/// A PNG of uniformly random pixels.
pub fn noise_png(seed: u64, side: u32) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = RgbImage::from_fn(side, side, |_, _| {
        image::Rgb([rng.random(), rng.random(), rng.random()])
    });
    encode(&img, ImageFormat::Png)
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Options for fast bulk tests.
pub fn relaxed() -> Options {
    Options::default().durability(Durability::Relaxed)
}

/// Opens a database in `dir` with `opts`.
pub fn open(dir: &std::path::Path, opts: Options) -> Db {
    Db::open_with(dir.join("db"), opts).expect("open")
}
