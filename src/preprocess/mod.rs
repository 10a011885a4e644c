//! Decoding untrusted image bytes into what an extractor declares: the decode policy.
//!
//! Every path that turns bytes into a tensor (insert, query, re-embedding, training loaders)
//! goes through [`prepare`], which
//!
//! 1. checks the encoded size and, from the header, the pixel count before any pixel is
//!    decoded;
//! 2. decodes a JPEG in the DCT domain at the smallest of 1/8, 1/4, 1/2 or full scale that
//!    keeps both sides at least twice the extractor's input (`jpeg`), and any other format with
//!    the `image` crate;
//! 3. composites transparency over the input's background ([`InputSpec::background`]);
//! 4. converts to luma or RGB and resizes to the input with a bilinear convolution
//!    (`fast_image_resize`), then turns the small result upright by the EXIF orientation.
//!
//! The full-size decoded image never outlives step 4: what is kept is a [`Thumb`] of
//! `width x height x channels` bytes. [`policy`] names these choices; it is stored with each
//! model so that a change of policy re-embeds the images like a change of extractor code.

mod jpeg;
mod pixels;

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::InputSpec;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Size limits for untrusted images.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageLimits {
    pub max_bytes: u64,
    pub max_pixels: u64,
}

impl ImageLimits {
    /// No limits: for images already in the store (they passed the limits when inserted).
    pub(crate) const STORED: ImageLimits = ImageLimits {
        max_bytes: u64::MAX,
        max_pixels: u64::MAX,
    };
}

/// The version and steps of the decode policy. Change the text when any step changes what an
/// image decodes to: stored embeddings made under another policy are then made again.
const POLICY: &str = "decode 2: EXIF orientation, alpha composited over the background, \
                      JPEG at the DCT scale keeping 2x the input, bilinear convolution resize";

/// The decode policy for an extractor's input, as stored with its model.
pub(crate) fn policy(spec: &InputSpec) -> String {
    let [r, g, b] = spec.background;
    format!("{POLICY}; background #{r:02x}{g:02x}{b:02x}")
}

/// An image fitted to an extractor's input: `height x width x channels` bytes (interleaved),
/// upright and opaque, plus the upright size of the original.
#[derive(Debug, Clone)]
pub(crate) struct Thumb {
    /// Width of the original image, after orientation.
    pub width: u32,
    /// Height of the original image, after orientation.
    pub height: u32,
    pixels: Vec<u8>,
}

impl Thumb {
    /// The fitted pixels: `height x width x channels` bytes of the spec it was fitted to.
    pub(crate) fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    /// Appends the `C x H x W` normalised values (`(x / 255 - mean) / std`) to `out`.
    pub(crate) fn normalised_into(&self, spec: &InputSpec, out: &mut Vec<f32>) {
        let c = spec.channels as usize;
        let plane = (spec.width * spec.height) as usize;
        let start = out.len();
        out.resize(start + c * plane, 0.0);
        let dst = &mut out[start..];
        for ch in 0..c {
            let (m, s) = (spec.mean[ch], spec.std[ch]);
            let plane_out = &mut dst[ch * plane..(ch + 1) * plane];
            for (o, p) in plane_out
                .iter_mut()
                .zip(self.pixels.iter().skip(ch).step_by(c))
            {
                *o = (f32::from(*p) / 255.0 - m) / s;
            }
        }
    }
}

/// A decoded image, opaque, before it is fitted to the input.
struct Decoded {
    width: u32,
    height: u32,
    pixels: Pixels,
    orientation: Orientation,
    /// The size of the original image as stored (before scaled decoding and orientation).
    full: (u32, u32),
}

/// Opaque 8-bit pixels, interleaved.
enum Pixels {
    Luma(Vec<u8>),
    Rgb(Vec<u8>),
}

pub(super) fn undecodable(e: &dyn std::fmt::Display) -> Error {
    Error::Undecodable {
        reason: e.to_string(),
    }
}

/// Refuses an image of `w x h` pixels over the limit, or of no pixels at all.
fn check_pixels(w: u64, h: u64, limits: ImageLimits) -> Result<()> {
    let pixels = w * h;
    if pixels > limits.max_pixels {
        return Err(Error::ImageTooLarge {
            what: "pixel count",
            got: pixels,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(Error::Undecodable {
            reason: format!("the image is {w}x{h} pixels"),
        });
    }
    Ok(())
}

/// Decodes `bytes` under `limits` and fits the image to `spec` (see the module docs).
pub(crate) fn prepare(bytes: &[u8], limits: ImageLimits, spec: &InputSpec) -> Result<Thumb> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Error::ImageTooLarge {
            what: "encoded size in bytes",
            got: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    // A decoder bug must not take the caller's process down with it: a panic on these
    // untrusted bytes is reported as an undecodable image.
    let decoded =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(bytes, limits, spec)))
            .unwrap_or_else(|_| {
                Err(Error::Undecodable {
                    reason: "the decoder failed on malformed data".to_string(),
                })
            })?;
    pixels::fit(decoded, spec)
}

/// [`prepare`] for many images on every core; one result per image, in order.
pub(crate) fn prepare_many(
    items: &[&[u8]],
    limits: ImageLimits,
    spec: &InputSpec,
) -> Vec<Result<Thumb>> {
    items
        .par_iter()
        .map(|bytes| prepare(bytes, limits, spec))
        .collect()
}

fn decode(bytes: &[u8], limits: ImageLimits, spec: &InputSpec) -> Result<Decoded> {
    if jpeg::is_jpeg(bytes) {
        // Both sides at least twice the input's longer side, whatever the orientation.
        let min_side = 2 * spec.width.max(spec.height);
        if let Some(d) = jpeg::decode_scaled(bytes, limits, min_side)? {
            return Ok(d);
        }
    }
    decode_other(bytes, limits, spec.background)
}

/// Any format with the `image` crate (the first frame of an animation), transparency
/// composited over `background`.
fn decode_other(bytes: &[u8], limits: ImageLimits, background: [u8; 3]) -> Result<Decoded> {
    let reader = |bytes| {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| undecodable(&e))
    };
    let (w, h) = reader(bytes)?
        .into_dimensions()
        .map_err(|e| undecodable(&e))?;
    check_pixels(u64::from(w), u64::from(h), limits)?;
    let mut r = reader(bytes)?;
    let mut lim = Limits::default();
    // 8 bytes per pixel covers 16-bit RGBA; the decoder refuses anything bigger.
    lim.max_alloc = Some(
        (u64::from(w) * u64::from(h))
            .saturating_mul(8)
            .saturating_add(1 << 20),
    );
    r.limits(lim);
    let mut decoder = r.into_decoder().map_err(|e| undecodable(&e))?;
    // A malformed EXIF block is no orientation, not a bad image.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| undecodable(&e))?;
    let (width, height) = (img.width(), img.height());
    Ok(Decoded {
        width,
        height,
        pixels: pixels::opaque(img, background),
        orientation,
        full: (width, height),
    })
}

/// Stacks thumbs into one `N x C x H x W` tensor, normalised as `spec` declares.
pub(crate) fn batch_tensor(thumbs: &[&Thumb], spec: &InputSpec) -> Result<Tensor> {
    let per = (spec.channels * spec.width * spec.height) as usize;
    let mut data = Vec::with_capacity(per * thumbs.len());
    for t in thumbs {
        t.normalised_into(spec, &mut data);
    }
    let shape = (
        thumbs.len(),
        spec.channels as usize,
        spec.height as usize,
        spec.width as usize,
    );
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| Error::plugin("preprocess", e.into()))
}
