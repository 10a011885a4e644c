//! Decoding untrusted image bytes and turning them into the tensors an extractor declares.

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, ImageReader, Limits};
use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::InputSpec;

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

/// Decodes encoded bytes (PNG, JPEG, WebP, GIF first frame, BMP) under `limits`. The pixel
/// count is checked from the header before any pixel is decoded.
pub(crate) fn decode(bytes: &[u8], limits: ImageLimits) -> Result<DynamicImage> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Error::ImageTooLarge {
            what: "encoded size in bytes",
            got: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let undecodable = |e: &dyn std::fmt::Display| Error::Undecodable {
        reason: e.to_string(),
    };
    let reader = |bytes| {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| undecodable(&e))
    };
    let (w, h) = reader(bytes)?
        .into_dimensions()
        .map_err(|e| undecodable(&e))?;
    let pixels = u64::from(w) * u64::from(h);
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
    let mut r = reader(bytes)?;
    let mut lim = Limits::default();
    // 8 bytes per pixel covers 16-bit RGBA; the decoder refuses anything bigger.
    lim.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    r.limits(lim);
    // A decoder bug must not take the caller's process down with it: a panic on these
    // untrusted bytes is reported as an undecodable image.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.decode())) {
        Ok(decoded) => decoded.map_err(|e| undecodable(&e)),
        Err(_) => Err(Error::Undecodable {
            reason: "the decoder failed on malformed data".to_string(),
        }),
    }
}

/// Converts, resizes and normalises `img` into `C x H x W` values, appended to `out`.
pub(crate) fn pixels_into(img: &DynamicImage, spec: &InputSpec, out: &mut Vec<f32>) {
    let (w, h) = (spec.width, spec.height);
    let plane = (w * h) as usize;
    let start = out.len();
    if spec.channels == 1 {
        let g = img.to_luma8();
        let g = if g.dimensions() == (w, h) {
            g
        } else {
            image::imageops::resize(&g, w, h, FilterType::Triangle)
        };
        out.extend(g.as_raw().iter().map(|&v| f32::from(v) / 255.0));
    } else {
        let rgb = img.to_rgb8();
        let rgb = if rgb.dimensions() == (w, h) {
            rgb
        } else {
            image::imageops::resize(&rgb, w, h, FilterType::Triangle)
        };
        out.resize(start + 3 * plane, 0.0);
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[start + c * plane + i] = f32::from(p.0[c]) / 255.0;
            }
        }
    }
    for c in 0..spec.channels as usize {
        let (m, s) = (spec.mean[c], spec.std[c]);
        if m != 0.0 || s != 1.0 {
            for v in &mut out[start + c * plane..start + (c + 1) * plane] {
                *v = (*v - m) / s;
            }
        }
    }
}

/// Stacks decoded images into one `N x C x H x W` tensor.
pub(crate) fn batch_tensor(images: &[&DynamicImage], spec: &InputSpec) -> Result<Tensor> {
    let per = (spec.channels * spec.width * spec.height) as usize;
    let mut data = Vec::with_capacity(per * images.len());
    for img in images {
        pixels_into(img, spec, &mut data);
    }
    let shape = (
        images.len(),
        spec.channels as usize,
        spec.height as usize,
        spec.width as usize,
    );
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| Error::plugin("preprocess", e.into()))
}
