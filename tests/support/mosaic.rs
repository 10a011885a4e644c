//! Photo-like images made from 28 x 28 greyscale tiles (Fashion-MNIST), shared by the
//! integration tests (`tests/meta.rs`) and `benches/duplicates.rs`.

use image::{imageops, RgbImage};
use rand::{rngs::StdRng, Rng};

/// A `side` x `side` photo-like image: four of `tiles` (28 x 28 grey pixels, row by row) in a
/// 2 x 2 mosaic, each tinted, upscaled, with noise.
pub fn mosaic(tiles: &[Vec<u8>], side: u32, rng: &mut StdRng) -> RgbImage {
    let mut small = RgbImage::new(56, 56);
    for q in 0..4u32 {
        let t = &tiles[rng.random_range(0..tiles.len())];
        let tint: [f32; 3] = [
            rng.random_range(0.3..1.0),
            rng.random_range(0.3..1.0),
            rng.random_range(0.3..1.0),
        ];
        for (i, v) in t.iter().enumerate() {
            let (x, y) = ((q % 2) * 28 + i as u32 % 28, (q / 2) * 28 + i as u32 / 28);
            small.put_pixel(x, y, image::Rgb(tint.map(|k| (f32::from(*v) * k) as u8)));
        }
    }
    let mut big = imageops::resize(&small, side, side, imageops::CatmullRom);
    for p in big.pixels_mut() {
        for c in &mut p.0 {
            *c = (i16::from(*c) + rng.random_range(-6i16..=6)).clamp(0, 255) as u8;
        }
    }
    big
}

/// `img` as a JPEG of `quality`.
pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .expect("encoding to memory");
    out.into_inner()
}
