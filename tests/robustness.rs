//! Fuzz-style robustness: damaged images, records and snapshots give typed errors or are
//! repaired, never a panic. (cargo-fuzz needs a nightly toolchain, which these machines lack;
//! these seeded mutation loops run in every `cargo test`.)

use image::ImageFormat;
use lookalike::{Db, Error, Options};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::common::*;

fn mutate(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..4) {
        0 => {
            let n = rng.random_range(0..b.len());
            b.truncate(n);
        }
        1 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
        }
        2 => {
            let i = rng.random_range(0..b.len());
            let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            b.splice(i..i, junk);
        }
        _ => {
            // Damage the header, where sizes live.
            for _ in 0..3 {
                let i = rng.random_range(0..b.len().min(40));
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
    }
    b
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed().max_image_pixels(4_000_000));
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    });
    let mut rng = StdRng::seed_from_u64(99);
    let mut outcomes = [0usize; 3];
    let mut cases: Vec<(String, Vec<u8>)> = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ]
    .into_iter()
    .map(|f| (format!("{f:?}"), encode(&img, f)))
    .collect();
    // The decode policy's own paths: libjpeg-turbo on a progressive JPEG whose EXIF block
    // says "rotate", and alpha compositing on a 16-bit RGBA PNG.
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_progressive(true).unwrap();
    let progressive = c
        .compress_to_vec(turbojpeg::Image {
            pixels: img.as_raw().as_slice(),
            width: 48,
            pitch: 3 * 48,
            height: 40,
            format: turbojpeg::PixelFormat::RGB,
        })
        .unwrap();
    let mut exif = progressive[..2].to_vec();
    exif.extend_from_slice(&[0xFF, 0xE1, 0, 30]);
    exif.extend_from_slice(b"Exif\0\0MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0");
    exif.extend_from_slice(&progressive[2..]);
    cases.push(("progressive JPEG with EXIF".into(), exif));
    let rgba16 = image::DynamicImage::ImageRgb8(img.clone()).into_rgba16();
    let mut png16 = std::io::Cursor::new(Vec::new());
    rgba16.write_to(&mut png16, ImageFormat::Png).unwrap();
    cases.push(("16-bit RGBA PNG".into(), png16.into_inner()));
    for (format, good) in cases {
        assert!(
            db.insert_image(&good, None).is_ok(),
            "{format} itself must decode"
        );
        for _ in 0..120 {
            let bad = mutate(&mut rng, &good);
            match db.insert_image(&bad, Some("m")) {
                Ok(_) => outcomes[0] += 1,
                Err(Error::Undecodable { .. }) => outcomes[1] += 1,
                Err(Error::ImageTooLarge { .. }) => outcomes[2] += 1,
                Err(e) => panic!("{format}: unexpected error {e}"),
            }
        }
    }
    assert!(
        outcomes[1] > 0,
        "some mutations must be undecodable: {outcomes:?}"
    );
    assert_eq!(db.len(), outcomes[0] + 8);
}

#[test]
fn mutated_snapshots_are_rebuilt() {
    let dir = tempdir();
    let path = dir.path().join("db");
    let want;
    {
        let db = Db::open(&path).unwrap();
        let imgs: Vec<Vec<u8>> = (0..30u64).map(|i| class_png((i % 4) as u32, i)).collect();
        db.insert_images(imgs.iter().map(|b| (b.as_slice(), None)))
            .unwrap();
        want = db.nearest(&class_png(1, 5), 30).unwrap();
    }
    let stamp = std::fs::read(path.join("index.stamp")).unwrap();
    let index = std::fs::read(path.join("index.faiss")).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for round in 0..20 {
        let (s, i) = if round % 2 == 0 {
            (mutate(&mut rng, &stamp), index.clone())
        } else {
            (stamp.clone(), mutate(&mut rng, &index))
        };
        std::fs::write(path.join("index.stamp"), &s).unwrap();
        std::fs::write(path.join("index.faiss"), &i).unwrap();
        let db = Db::open_with(&path, Options::default()).unwrap();
        let got = db.nearest(&class_png(1, 5), 30).unwrap();
        assert_eq!(got.len(), want.len(), "round {round}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g.distance - w.distance).abs() < 1e-5, "round {round}");
        }
    }
}
