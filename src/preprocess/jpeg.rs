//! JPEG decoding in the DCT domain at the smallest of 1/8, 1/4, 1/2 or full scale that keeps
//! the image at least twice the size the extractor needs (libjpeg-turbo through `turbojpeg`,
//! what Pillow's draft mode does), and the EXIF orientation read from the APP1 segment.

use image::metadata::Orientation;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use super::{undecodable, Decoded, ImageLimits, Pixels};
use crate::error::{Error, Result};

/// A progressive JPEG with more scans than this is refused (libjpeg-turbo's advice against
/// files built to make each scan cost a full pass over the coefficients).
const SCAN_LIMIT: u32 = 500;

/// True when `bytes` start like a JPEG file (SOI marker followed by another marker).
pub(super) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG at a reduced scale such that both sides stay at least `min_side` pixels. `Ok(None)` for a JPEG libjpeg-turbo cannot turn into RGB (CMYK,
/// YCCK): the caller decodes those with the `image` crate.
pub(super) fn decode_scaled(
    bytes: &[u8],
    limits: ImageLimits,
    min_side: u32,
) -> Result<Option<Decoded>> {
    // A fresh decompressor per image (microseconds against a decode's milliseconds): a
    // reused one kept the previous image's size when a truncated header failed to parse.
    let mut dec = Decompressor::new().map_err(|e| undecodable(&e))?;
    dec.set_scan_limit(SCAN_LIMIT)
        .map_err(|e| undecodable(&e))?;
    decode_with(&mut dec, bytes, limits, min_side)
}

fn decode_with(
    dec: &mut Decompressor,
    bytes: &[u8],
    limits: ImageLimits,
    min_side: u32,
) -> Result<Option<Decoded>> {
    let header = dec.read_header(bytes).map_err(|e| undecodable(&e))?;
    let (w, h) = (header.width as u64, header.height as u64);
    super::check_pixels(w, h, limits)?;
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
        return Ok(None);
    }
    let scale = if header.is_lossless {
        ScalingFactor::ONE
    } else {
        [8, 4, 2]
            .into_iter()
            .map(|d| ScalingFactor::new(1, d))
            .find(|s| s.scale(header.width.min(header.height)) as u64 >= u64::from(min_side))
            .unwrap_or(ScalingFactor::ONE)
    };
    dec.set_scaling_factor(scale).map_err(|e| undecodable(&e))?;
    let scaled = header.scaled(scale);
    let mut out = Image {
        pixels: vec![0u8; 3 * scaled.width * scaled.height],
        width: scaled.width,
        pitch: 3 * scaled.width,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    dec.decompress(bytes, out.as_deref_mut())
        .map_err(|e| undecodable(&e))?;
    Ok(Some(Decoded {
        width: u32::try_from(scaled.width).map_err(|_| too_wide(w))?,
        height: u32::try_from(scaled.height).map_err(|_| too_wide(h))?,
        pixels: Pixels::Rgb(out.pixels),
        orientation: orientation(bytes),
        full: (w as u32, h as u32),
    }))
}

fn too_wide(side: u64) -> Error {
    Error::Undecodable {
        reason: format!("a side of {side} pixels"),
    }
}

/// The EXIF orientation of a JPEG: the first APP1 "Exif" segment before the scan data, read
/// with the `image` crate's parser. A missing or malformed one is no transform: a photo with a
/// broken EXIF block is still a photo.
pub(super) fn orientation(bytes: &[u8]) -> Orientation {
    exif(bytes)
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// The TIFF structure inside the first APP1 "Exif\0\0" segment, walking the marker segments
/// up to the start of the scan.
fn exif(bytes: &[u8]) -> Option<&[u8]> {
    let mut at = 2; // after SOI
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while *bytes.get(at)? == 0xFF && *bytes.get(at + 1)? == 0xFF {
            at += 1;
        }
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        match marker {
            0xD8 | 0x01 | 0xD0..=0xD7 => {
                at += 2;
                continue;
            }
            0xDA | 0xD9 => return None, // start of scan, end of image
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(at + 2)?,
            *bytes.get(at + 3)?,
        ]));
        if len < 2 {
            return None;
        }
        let body = bytes.get(at + 4..at + 2 + len)?;
        if marker == 0xE1 {
            if let Some(tiff) = body.strip_prefix(b"Exif\0\0") {
                return Some(tiff);
            }
        }
        at += 2 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An APP1 segment holding a little-endian TIFF header with one IFD entry: orientation.
    fn app1(orientation: u16) -> Vec<u8> {
        let mut tiff = b"II*\0".to_vec();
        tiff.extend_from_slice(&8u32.to_le_bytes()); // IFD0 offset
        tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes()); // count
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        let mut body = b"Exif\0\0".to_vec();
        body.extend_from_slice(&tiff);
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        seg.extend_from_slice(&body);
        seg
    }

    #[test]
    fn reads_orientation_after_other_segments() {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x04, 0x4A, 0x46]); // a short APP0
        jpeg.extend_from_slice(&app1(6));
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02]);
        assert_eq!(orientation(&jpeg), Orientation::Rotate90);
    }

    #[test]
    fn malformed_segments_are_no_transform() {
        let mut truncated = vec![0xFF, 0xD8];
        truncated.extend_from_slice(&app1(8)[..10]);
        assert_eq!(orientation(&truncated), Orientation::NoTransforms);
        // A length that points past the end, a length under 2, garbage after SOI.
        for bad in [
            vec![0xFF, 0xD8, 0xFF, 0xE1, 0xFF, 0xFF, b'E'],
            vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x01],
            vec![0xFF, 0xD8, 0x12, 0x34],
            vec![0xFF, 0xD8],
        ] {
            assert_eq!(orientation(&bad), Orientation::NoTransforms);
        }
        // An orientation value outside 1..=8.
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend_from_slice(&app1(77));
        assert_eq!(orientation(&jpeg), Orientation::NoTransforms);
    }
}
