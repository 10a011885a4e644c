//! Readers for labelled image sets used by benchmarks and examples (nothing is downloaded).

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

/// Greyscale images of one size with integer labels, as an IDX file pair holds them.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// Width of every image.
    pub width: u32,
    /// Height of every image.
    pub height: u32,
    /// Row-major 8-bit pixels, `width * height` per image.
    pub pixels: Vec<Vec<u8>>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl LabelledImages {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` encoded as PNG.
    pub fn png(&self, i: usize) -> Result<Vec<u8>> {
        let px = self
            .pixels
            .get(i)
            .ok_or_else(|| Error::InvalidArgument(format!("no image {i}")))?;
        let img = image::GrayImage::from_raw(self.width, self.height, px.clone())
            .ok_or_else(|| Error::InvalidArgument("pixel buffer of the wrong size".into()))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| Error::InvalidArgument(format!("PNG encoding failed: {e}")))?;
        Ok(out.into_inner())
    }
}

/// Which part of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training images.
    Train,
    /// The test images.
    Test,
}

/// Reads Fashion-MNIST (or MNIST: same layout) from `dir`, which holds the four gzipped IDX
/// files (`train-images-idx3-ubyte.gz`, ...), as the Debian package `dataset-fashion-mnist`
/// installs them under `/usr/share/datasets/fashion-mnist/`.
pub fn fashion_mnist(dir: impl AsRef<Path>, split: Split) -> Result<LabelledImages> {
    let dir = dir.as_ref();
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = read_gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
    let labels = read_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
    parse_idx(&images, &labels)
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize) -> Result<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| Error::corrupt("IDX file", at, "truncated header"))
}

/// Parses an IDX3 image file and an IDX1 label file.
pub(crate) fn parse_idx(images: &[u8], labels: &[u8]) -> Result<LabelledImages> {
    if be_u32(images, 0)? != 0x0803 || be_u32(labels, 0)? != 0x0801 {
        return Err(Error::corrupt("IDX file", 0, "wrong magic number"));
    }
    let n = be_u32(images, 4)? as usize;
    let (h, w) = (be_u32(images, 8)?, be_u32(images, 12)?);
    let per = (w as usize)
        .checked_mul(h as usize)
        .ok_or_else(|| Error::corrupt("IDX file", 8, "image size overflows"))?;
    if be_u32(labels, 4)? as usize != n {
        return Err(Error::corrupt(
            "IDX file",
            4,
            "image and label counts differ",
        ));
    }
    let body = images
        .get(16..)
        .filter(|b| b.len() == n.saturating_mul(per))
        .ok_or_else(|| Error::corrupt("IDX file", 16, "image data has the wrong length"))?;
    let lab = labels
        .get(8..)
        .filter(|b| b.len() == n)
        .ok_or_else(|| Error::corrupt("IDX file", 8, "label data has the wrong length"))?;
    Ok(LabelledImages {
        width: w,
        height: h,
        pixels: body.chunks_exact(per.max(1)).map(<[u8]>::to_vec).collect(),
        labels: lab.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tiny_idx_pair_and_rejects_damage() {
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        images.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 7, 9];
        let set = parse_idx(&images, &labels).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.pixels[1], vec![5, 6, 7, 8]);
        assert_eq!(set.labels, vec![7, 9]);
        assert!(set.png(0).is_ok());
        assert!(matches!(
            parse_idx(&images[..20], &labels),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            parse_idx(&labels, &images),
            Err(Error::Corrupt { .. })
        ));
    }
}
