//! Real files in: every format the decode policy handles, transparency over the input's
//! background, EXIF orientation, phone-sized JPEGs, and bad files. Each test makes its files.

use std::io::Cursor;
use std::sync::Arc;

use image::{DynamicImage, ImageFormat, RgbImage};
use lookalike::lookalike_plugin::candle_core::Tensor;
use lookalike::lookalike_plugin::{
    check_batch, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
};
use lookalike::{decode_for, Db, Error};

use crate::common::*;

/// An extractor whose embedding is its input: what the database fed it, `C x H x W` values.
#[derive(Debug)]
struct Raw(InputSpec);

impl Extractor for Raw {
    fn name(&self) -> &str {
        "raw"
    }
    fn spec(&self) -> ExtractorSpec {
        let i = &self.0;
        ExtractorSpec {
            input: i.clone(),
            dim: (i.channels * i.width * i.height) as usize,
            metric: Metric::L2,
        }
    }
    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        check_batch(batch, &self.0)?;
        Ok(batch.flatten_from(1)?)
    }
    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }
}

#[derive(Debug)]
struct RawPlugin(InputSpec);

impl ExtractorPlugin for RawPlugin {
    fn name(&self) -> &str {
        "raw"
    }
    fn build(&self, _: &str, _: Option<&[u8]>) -> Result<Box<dyn Extractor>, PluginError> {
        Ok(Box::new(Raw(self.0.clone())))
    }
}

fn raw_db(dir: &std::path::Path, input: InputSpec) -> Db {
    open(
        dir,
        relaxed()
            .register(Arc::new(RawPlugin(input)))
            .extractor("raw", ""),
    )
}

fn encode_dyn(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A 64 x 48 picture: red left half, blue right half, a green bar across the top quarter.
fn picture() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        if y < 12 {
            image::Rgb([20, 200, 40])
        } else if x < 32 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([30, 40, 210])
        }
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compresses interleaved `pixels` (`format`, `width` wide) with libjpeg-turbo.
fn turbo(
    pixels: &[u8],
    width: u32,
    format: turbojpeg::PixelFormat,
    quality: i32,
    progressive: bool,
) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(quality).unwrap();
    c.set_progressive(progressive).unwrap();
    let size = format.size();
    let image = turbojpeg::Image {
        pixels,
        width: width as usize,
        pitch: size * width as usize,
        height: pixels.len() / (size * width as usize),
        format,
    };
    c.compress_to_vec(image).unwrap()
}

fn jpeg_turbo(img: &RgbImage, quality: i32, progressive: bool) -> Vec<u8> {
    turbo(
        img.as_raw(),
        img.width(),
        turbojpeg::PixelFormat::RGB,
        quality,
        progressive,
    )
}

/// A CMYK JPEG of `img` (inverted CMYK, as Adobe writes it).
fn jpeg_cmyk(img: &RgbImage) -> Vec<u8> {
    let cmyk: Vec<u8> = img
        .pixels()
        .flat_map(|p| {
            let k = 255 - p.0.iter().copied().max().unwrap_or(0);
            let ink = |c: u8| {
                if k == 255 {
                    0
                } else {
                    ((255 - c - k) as u32 * 255 / (255 - k) as u32) as u8
                }
            };
            // Adobe's CMYK JPEGs store every value inverted.
            [
                255 - ink(p.0[0]),
                255 - ink(p.0[1]),
                255 - ink(p.0[2]),
                255 - k,
            ]
        })
        .collect();
    turbo(&cmyk, img.width(), turbojpeg::PixelFormat::CMYK, 95, false)
}

/// An animated GIF whose first frame is `first` and second frame is black.
fn gif_two_frames(first: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        let rgba = DynamicImage::ImageRgb8(first.clone()).into_rgba8();
        let black = image::RgbaImage::from_pixel(
            first.width(),
            first.height(),
            image::Rgba([0, 0, 0, 255]),
        );
        enc.encode_frames([image::Frame::new(rgba), image::Frame::new(black)])
            .unwrap();
    }
    out
}

/// A palette (indexed) PNG of `img`, which uses three colours.
fn png_palette(img: &RgbImage) -> Vec<u8> {
    let mut palette: Vec<[u8; 3]> = Vec::new();
    let indices: Vec<u8> = img
        .pixels()
        .map(|p| match palette.iter().position(|c| *c == p.0) {
            Some(i) => i as u8,
            None => {
                palette.push(p.0);
                (palette.len() - 1) as u8
            }
        })
        .collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette.concat());
        enc.write_header()
            .unwrap()
            .write_image_data(&indices)
            .unwrap();
    }
    out
}

/// `jpeg` with an APP1 EXIF segment right after SOI holding `orientation`, or `tiff` as the
/// segment's whole TIFF body when given.
fn with_exif(jpeg: &[u8], orientation: u16, tiff: Option<&[u8]>) -> Vec<u8> {
    let mut t = b"MM\0*".to_vec();
    t.extend_from_slice(&8u32.to_be_bytes());
    t.extend_from_slice(&1u16.to_be_bytes());
    t.extend_from_slice(&0x0112u16.to_be_bytes());
    t.extend_from_slice(&3u16.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&orientation.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let body = tiff.unwrap_or(&t);
    let mut seg = vec![0xFF, 0xE1];
    seg.extend_from_slice(&((body.len() + 8) as u16).to_be_bytes());
    seg.extend_from_slice(b"Exif\0\0");
    seg.extend_from_slice(body);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&seg);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn every_format_decodes_to_the_same_picture() {
    let input = InputSpec::rgb(8, 6);
    let pic = picture();
    let reference = decode_for(&encode(&pic, ImageFormat::Png), &input).unwrap();
    let rgba16 = DynamicImage::ImageRgb16(DynamicImage::ImageRgb8(pic.clone()).into_rgb16());
    let cases: Vec<(&str, Vec<u8>, f32)> = vec![
        ("jpeg", jpeg_turbo(&pic, 95, false), 0.08),
        ("progressive jpeg", jpeg_turbo(&pic, 95, true), 0.08),
        ("cmyk jpeg", jpeg_cmyk(&pic), 0.1),
        ("16-bit png", encode_dyn(&rgba16, ImageFormat::Png), 0.01),
        ("palette png", png_palette(&pic), 0.01),
        ("webp (lossless)", encode(&pic, ImageFormat::WebP), 0.01),
        ("tiff", encode(&pic, ImageFormat::Tiff), 0.01),
        ("bmp", encode(&pic, ImageFormat::Bmp), 0.01),
        ("animated gif, first frame", gif_two_frames(&pic), 0.08),
    ];
    for (name, bytes, tolerance) in cases {
        let got = decode_for(&bytes, &input).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = max_diff(&got, &reference);
        assert!(d <= tolerance, "{name}: differs by {d} from the PNG");
    }
    // Grey, and grey with alpha (opaque): the same grey in all three channels.
    let grey = DynamicImage::ImageRgb8(pic.clone()).into_luma8();
    let from_grey =
        decode_for(&encode_dyn(&grey.clone().into(), ImageFormat::Png), &input).unwrap();
    let la = DynamicImage::ImageLumaA8(DynamicImage::ImageLuma8(grey).into_luma_alpha8());
    let from_la = decode_for(&encode_dyn(&la, ImageFormat::Png), &input).unwrap();
    assert!(max_diff(&from_grey, &from_la) < 0.01);
    let plane = 8 * 6;
    assert_eq!(from_grey[..plane], from_grey[plane..2 * plane]);
}

#[test]
fn transparency_is_composited_over_the_declared_background() {
    // Fully transparent pixels whose colour is green, and half-transparent red ones.
    // Two pixels, the input's size: no resampling blurs them together.
    let img = image::RgbaImage::from_fn(2, 1, |x, _| {
        if x < 1 {
            image::Rgba([0, 255, 0, 0])
        } else {
            image::Rgba([255, 0, 0, 128])
        }
    });
    let png = encode_dyn(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
    let on_white = decode_for(&png, &InputSpec::rgb(2, 1)).unwrap();
    // C x H x W: R plane (left, right), G plane, B plane.
    let expect_white = [1.0, 1.0, 1.0, 127.0 / 255.0, 1.0, 127.0 / 255.0];
    assert!(max_diff(&on_white, &expect_white) < 0.01, "{on_white:?}");
    let on_black = decode_for(&png, &InputSpec::rgb(2, 1).background([0, 0, 0])).unwrap();
    let expect_black = [0.0, 128.0 / 255.0, 0.0, 0.0, 0.0, 0.0];
    assert!(max_diff(&on_black, &expect_black) < 0.01, "{on_black:?}");

    // Through the database: the transparent icon is embedded as the same icon on white.
    let dir = tempdir();
    let db = raw_db(dir.path(), InputSpec::rgb(2, 1));
    let opaque = RgbImage::from_fn(2, 1, |x, _| {
        if x < 1 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([255, 127, 127])
        }
    });
    let id = db.insert_image(&png, Some("icon")).unwrap();
    let hits = db.nearest(&encode(&opaque, ImageFormat::Png), 1).unwrap();
    assert_eq!(hits[0].id, id);
    assert!(hits[0].distance < 1e-3, "{}", hits[0].distance);
}

#[test]
fn exif_orientation_turns_photos_upright() {
    // Stored 64 x 32: left half black, right half white. EXIF 6 says "turn 90 degrees
    // clockwise to view": upright it is 32 x 64 with the black half on top.
    let stored = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    let plain = jpeg_turbo(&stored, 95, false);
    let luma = InputSpec::luma(1, 2);
    let top_bottom = |bytes: &[u8]| decode_for(bytes, &luma).unwrap();
    let upright = top_bottom(&with_exif(&plain, 6, None));
    // (The bilinear filter's support reaches a little into the other half.)
    assert!(
        upright[0] < 0.25 && upright[1] > 0.75,
        "EXIF 6: {upright:?}"
    );
    let turned_back = top_bottom(&with_exif(&plain, 8, None));
    assert!(
        turned_back[0] > 0.75 && turned_back[1] < 0.25,
        "EXIF 8: {turned_back:?}"
    );
    // No EXIF, EXIF 1, an orientation out of range and a broken EXIF block: as stored
    // (left black, right white).
    for bytes in [
        plain.clone(),
        with_exif(&plain, 1, None),
        with_exif(&plain, 99, None),
        with_exif(&plain, 6, Some(b"MM\0*\xff\xff\xff\xff garbage")),
    ] {
        let v = decode_for(&bytes, &InputSpec::luma(2, 1)).unwrap();
        assert!(v[0] < 0.25 && v[1] > 0.75, "{v:?}");
    }
    // The database stores the bytes as given and queries agree with stored images.
    let dir = tempdir();
    let db = raw_db(dir.path(), InputSpec::luma(1, 2));
    let rotated = with_exif(&plain, 6, None);
    let id = db.insert_image(&rotated, None).unwrap();
    assert_eq!(db.image(id).unwrap(), rotated);
    let upright_png = RgbImage::from_fn(32, 64, |_, y| {
        if y < 32 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    let hits = db
        .nearest(&encode(&upright_png, ImageFormat::Png), 1)
        .unwrap();
    assert_eq!(hits[0].id, id);
    assert!(hits[0].distance < 0.01, "{}", hits[0].distance);
}

#[test]
fn phone_sized_jpegs_go_in_and_come_out_unchanged() {
    // 4032 x 3024, quality 90: decoded at 1/8 scale for the default extractor.
    let big = RgbImage::from_fn(4032, 3024, |x, y| {
        image::Rgb([(x / 16) as u8, (y / 12) as u8, ((x + y) / 28) as u8])
    });
    let jpeg = with_exif(&jpeg_turbo(&big, 90, false), 3, None);
    let small = jpeg_turbo(&image::imageops::thumbnail(&big, 504, 378), 90, false);
    assert!(jpeg.len() > 16 << 10 && small.len() > 1000);
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let ids = db
        .insert_images([(jpeg.as_slice(), Some("photo")), (small.as_slice(), None)])
        .unwrap();
    // Stored in a pack file, read back byte for byte after a reopen.
    drop(db);
    let db = open(dir.path(), relaxed());
    assert_eq!(db.image(ids[0]).unwrap(), jpeg);
    assert!(dir.path().join("db/images").read_dir().unwrap().count() >= 1);
    // The photo (turned 180 degrees by its EXIF) is nearest to itself.
    let hits = db.nearest(&jpeg, 2).unwrap();
    assert_eq!(hits[0].id, ids[0]);
    assert!(hits[0].distance < 1e-4);
}

#[test]
fn bad_files_are_typed_errors() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed().max_image_pixels(1_000_000));
    let pic = picture();
    let jpeg = jpeg_turbo(&pic, 90, false);
    // Over the pixel limit, found from the header.
    let big = jpeg_turbo(&RgbImage::new(1200, 1000), 50, false);
    assert!(matches!(
        db.insert_image(&big, None),
        Err(Error::ImageTooLarge {
            what: "pixel count",
            ..
        })
    ));
    // A PNG whose header claims 60000 x 60000 pixels.
    let mut png = encode(&pic, ImageFormat::Png);
    png[16..20].copy_from_slice(&60000u32.to_be_bytes());
    png[20..24].copy_from_slice(&60000u32.to_be_bytes());
    assert!(matches!(
        db.insert_image(&png, None),
        Err(Error::ImageTooLarge { .. } | Error::Undecodable { .. })
    ));
    // Truncated JPEGs: refused or decoded, never a panic.
    for cut in [2, 20, 200, jpeg.len() / 2, jpeg.len() - 2] {
        match db.insert_image(&jpeg[..cut], None) {
            Ok(_) | Err(Error::Undecodable { .. }) => {}
            Err(e) => panic!("truncated at {cut}: {e}"),
        }
    }
    // Not an image at all, and an empty file.
    assert!(matches!(
        db.insert_image(b"GIF89a but not really", None),
        Err(Error::Undecodable { .. } | Error::ImageTooLarge { .. })
    ));
    assert!(matches!(
        db.insert_image(b"", None),
        Err(Error::Undecodable { .. })
    ));
}

#[test]
fn insert_each_stores_the_good_images_of_a_batch() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let good = class_png(0, 1);
    let out = db
        .insert_images_each([
            (good.as_slice(), Some("a")),
            (b"junk".as_slice(), Some("a")),
            (good.as_slice(), Some("")),
            (good.as_slice(), None),
        ])
        .unwrap();
    assert!(out[0].is_ok() && out[3].is_ok());
    assert!(matches!(out[1], Err(Error::Undecodable { .. })));
    assert!(matches!(out[2], Err(Error::InvalidArgument(_))));
    assert_eq!(db.len(), 2);
    // The all-or-nothing form stores nothing of a batch with a bad image.
    assert!(db
        .insert_images([(good.as_slice(), None), (b"junk".as_slice(), None)])
        .is_err());
    assert_eq!(db.len(), 2);
}

#[test]
fn grey_extractors_see_the_same_grey_from_every_format() {
    // A greyscale JPEG and a colour JPEG of the same grey picture give the same luma input.
    let pic = RgbImage::from_fn(40, 40, |x, y| {
        let v = ((x * 6 + y * 2) % 256) as u8;
        image::Rgb([v, v, v])
    });
    let grey = DynamicImage::ImageRgb8(pic.clone()).into_luma8();
    let input = InputSpec::luma(10, 10);
    let a = decode_for(&encode_dyn(&grey.into(), ImageFormat::Jpeg), &input).unwrap();
    let b = decode_for(&jpeg_turbo(&pic, 95, false), &input).unwrap();
    assert!(max_diff(&a, &b) < 0.05, "{}", max_diff(&a, &b));
}

#[test]
fn many_queries_in_one_call() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let images: Vec<Vec<u8>> = (0..8).map(|i| class_png((i % 4) as u32, i)).collect();
    let ids = db
        .insert_images(images.iter().map(|b| (b.as_slice(), None)))
        .unwrap();
    let mut queries: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    queries.insert(3, b"junk");
    let out = db.nearest_batch(&queries, &lookalike::Query::k(2)).unwrap();
    assert_eq!(out.len(), 9);
    assert!(matches!(out[3], Err(Error::Undecodable { .. })));
    for (i, id) in ids.iter().enumerate() {
        let o = if i < 3 { &out[i] } else { &out[i + 1] };
        let hits = o.as_ref().unwrap();
        assert_eq!(hits[0].id, *id);
        // The same answer as one query at a time.
        assert_eq!(*hits, db.nearest(&images[i], 2).unwrap());
    }
}
