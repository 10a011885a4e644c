//! From decoded pixels to a [`Thumb`]: transparency composited, luma or RGB, resized, upright.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{ColorType, DynamicImage, GrayImage, RgbImage};
use lookalike_plugin::InputSpec;

use super::{Decoded, Pixels, Thumb};
use crate::error::{Error, Result};

/// Opaque 8-bit pixels of `img`: grey images stay one channel, anything with alpha is
/// composited over `background` (straight alpha, in the stored sRGB values), the rest is RGB.
pub(super) fn opaque(img: DynamicImage, background: [u8; 3]) -> Pixels {
    match img.color() {
        ColorType::L8 | ColorType::L16 => Pixels::Luma(img.into_luma8().into_raw()),
        c if c.has_alpha() => {
            let rgba = img.into_rgba8();
            let mut rgb = Vec::with_capacity(rgba.as_raw().len() / 4 * 3);
            for p in rgba.as_raw().chunks_exact(4) {
                let a = u32::from(p[3]);
                for (c, bg) in p[..3].iter().zip(background) {
                    rgb.push(((u32::from(*c) * a + u32::from(bg) * (255 - a) + 127) / 255) as u8);
                }
            }
            Pixels::Rgb(rgb)
        }
        _ => Pixels::Rgb(img.into_rgb8().into_raw()),
    }
}

/// Luma of 8-bit RGB with the `image` crate's weights (Rec. 709), so that a colour image
/// turns grey as it always has.
fn luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            let l = 2126 * u32::from(p[0]) + 7152 * u32::from(p[1]) + 722 * u32::from(p[2]);
            ((l + 5000) / 10_000) as u8
        })
        .collect()
}

/// True for the orientations that turn the image a quarter: width and height swap.
fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn resize_error(e: &dyn std::fmt::Display) -> Error {
    Error::Undecodable {
        reason: format!("resizing failed: {e}"),
    }
}

/// Fits a decoded image to `spec`: luma or RGB, resized to the input (to its transposed size
/// when the orientation turns it a quarter), then turned upright. The full-size pixels are
/// dropped here.
pub(super) fn fit(d: Decoded, spec: &InputSpec) -> Result<Thumb> {
    let swap = swaps_sides(d.orientation);
    let (tw, th) = if swap {
        (spec.height, spec.width)
    } else {
        (spec.width, spec.height)
    };
    // One channel when the extractor wants luma, or when the image is grey (resized once,
    // copied to three channels after).
    let (data, kind) = match (d.pixels, spec.channels) {
        (Pixels::Rgb(rgb), 1) => (luma(&rgb), PixelType::U8),
        (Pixels::Rgb(rgb), _) => (rgb, PixelType::U8x3),
        (Pixels::Luma(l), _) => (l, PixelType::U8),
    };
    let small = if (d.width, d.height) == (tw, th) {
        data
    } else {
        let src = ImageRef::new(d.width, d.height, &data, kind).map_err(|e| resize_error(&e))?;
        let mut dst = Image::new(tw, th, kind);
        Resizer::new()
            .resize(
                &src,
                &mut dst,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
            )
            .map_err(|e| resize_error(&e))?;
        dst.into_vec()
    };
    let mut img = if kind == PixelType::U8 {
        GrayImage::from_raw(tw, th, small).map(DynamicImage::ImageLuma8)
    } else {
        RgbImage::from_raw(tw, th, small).map(DynamicImage::ImageRgb8)
    }
    .ok_or_else(|| resize_error(&"the resized buffer has the wrong size"))?;
    img.apply_orientation(d.orientation);
    let pixels = if spec.channels == 1 {
        img.into_luma8().into_raw()
    } else {
        img.into_rgb8().into_raw()
    };
    let (w, h) = d.full;
    let (width, height) = if swap { (h, w) } else { (w, h) };
    Ok(Thumb {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_is_composited_over_the_background() {
        // Red at full, half and no opacity over white, and a grey + alpha pixel over blue.
        let rgba =
            image::RgbaImage::from_raw(3, 1, vec![255, 0, 0, 255, 255, 0, 0, 128, 255, 0, 0, 0])
                .map(DynamicImage::ImageRgba8);
        let Some(rgba) = rgba else {
            panic!("3 x 1 RGBA buffer")
        };
        match opaque(rgba, [255, 255, 255]) {
            Pixels::Rgb(p) => assert_eq!(p, vec![255, 0, 0, 255, 127, 127, 255, 255, 255]),
            Pixels::Luma(_) => panic!("RGBA turned grey"),
        }
        let la = image::GrayAlphaImage::from_raw(1, 1, vec![0, 0]).map(DynamicImage::ImageLumaA8);
        let Some(la) = la else {
            panic!("1 x 1 LA buffer")
        };
        match opaque(la, [0, 0, 255]) {
            Pixels::Rgb(p) => assert_eq!(p, vec![0, 0, 255]),
            Pixels::Luma(_) => panic!("a transparent grey pixel must take the background"),
        }
    }

    #[test]
    fn orientation_turns_the_thumb_upright() {
        // A 4 x 2 stored image, left half black, right half white, tagged "rotate 90 clockwise"
        // (EXIF 6): upright it is 2 x 4, top half black.
        let stored = vec![0, 0, 255, 255, 0, 0, 255, 255];
        let d = Decoded {
            width: 4,
            height: 2,
            pixels: Pixels::Luma(stored),
            orientation: Orientation::Rotate90,
            full: (4, 2),
        };
        let t = fit(d, &InputSpec::luma(2, 4)).map_err(|e| e.to_string());
        let Ok(t) = t else { panic!("fit failed") };
        assert_eq!((t.width, t.height), (2, 4));
        assert_eq!(t.pixels, vec![0, 0, 0, 0, 255, 255, 255, 255]);
    }
}
