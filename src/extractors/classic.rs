//! `classic`: the training-free default extractor.
//!
//! A hand-made descriptor of a 32 x 32 RGB thumbnail, four parts each L2-normalised, weighted and
//! joined, then L2-normalised as a whole (metric: cosine):
//!
//! | part | dims | weight | what it sees |
//! |---|---|---|---|
//! | HOG, 4 px cells, 9 unsigned orientations, 2 x 2 blocks, L2-Hys | 1,764 | 1.0 | local shape and edges |
//! | HOG, 8 px cells, 9 signed orientations, 2 x 2 blocks, L2-Hys | 324 | 0.5 | coarse shape, edge polarity |
//! | 16 x 16 luma thumbnail, mean-centred | 256 | 0.5 | layout and brightness |
//! | RGB colour histogram, 4 x 4 x 4 bins, square-rooted (Hellinger) | 64 | 0.25 | colour |
//!
//! HOG is the histogram-of-oriented-gradients descriptor of Dalal and Triggs (2005). The
//! weights were chosen on Fashion-MNIST's *training* split; `docs/benchmarks.md` has the
//! figures on the test split.

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::{
    check_batch, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
};

const SIDE: usize = 32;
const HOG_FINE: Hog = Hog {
    cell: 4,
    bins: 9,
    signed: false,
};
const HOG_COARSE: Hog = Hog {
    cell: 8,
    bins: 9,
    signed: true,
};
const THUMB: usize = 16;
const COLOUR_LEVELS: usize = 4;
const W_FINE: f32 = 1.0;
const W_COARSE: f32 = 0.5;
const W_THUMB: f32 = 0.5;
const W_COLOUR: f32 = 0.25;

/// The plugin that builds [`Classic`]; registered as `"classic"`.
#[derive(Debug, Default)]
pub struct ClassicPlugin;

impl ExtractorPlugin for ClassicPlugin {
    fn name(&self) -> &str {
        "classic"
    }

    fn build(
        &self,
        config: &str,
        _weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError> {
        if !config.is_empty() && config != "default" {
            return Err(PluginError::UnknownConfig {
                config: config.to_string(),
                known: "default".to_string(),
            });
        }
        Ok(Box::new(Classic))
    }
}

/// The classic descriptor (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct Classic;

impl Classic {
    fn dim() -> usize {
        HOG_FINE.dim(SIDE) + HOG_COARSE.dim(SIDE) + THUMB * THUMB + COLOUR_LEVELS.pow(3)
    }

    /// Describes one `3 x 32 x 32` image (planar RGB in `[0, 1]`).
    fn describe(rgb: &[f32], out: &mut Vec<f32>) {
        let plane = SIDE * SIDE;
        let (r, g, b) = (&rgb[..plane], &rgb[plane..2 * plane], &rgb[2 * plane..]);
        let luma: Vec<f32> = (0..plane)
            .map(|i| 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i])
            .collect();
        let start = out.len();
        push_weighted(out, &HOG_FINE.describe(&luma, SIDE), W_FINE);
        push_weighted(out, &HOG_COARSE.describe(&luma, SIDE), W_COARSE);
        push_weighted(out, &thumbnail(&luma), W_THUMB);
        push_weighted(out, &colour_histogram(r, g, b), W_COLOUR);
        l2_normalise(&mut out[start..]);
    }
}

impl Extractor for Classic {
    fn name(&self) -> &str {
        "classic"
    }

    fn spec(&self) -> ExtractorSpec {
        ExtractorSpec {
            input: InputSpec::rgb(SIDE as u32, SIDE as u32),
            dim: Self::dim(),
            metric: Metric::Cosine,
        }
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        let n = check_batch(batch, &self.spec().input)?;
        let data = batch.flatten_all()?.to_vec1::<f32>()?;
        let per = 3 * SIDE * SIDE;
        let dim = Self::dim();
        let mut out = Vec::with_capacity(n * dim);
        for img in data.chunks_exact(per) {
            Self::describe(img, &mut out);
        }
        Ok(Tensor::from_vec(out, (n, dim), &Device::Cpu)?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }
}

fn push_weighted(out: &mut Vec<f32>, part: &[f32], weight: f32) {
    out.extend(part.iter().map(|v| v * weight));
}

fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1e-12 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// One HOG configuration.
#[derive(Debug, Clone, Copy)]
struct Hog {
    cell: usize,
    bins: usize,
    signed: bool,
}

impl Hog {
    fn dim(self, side: usize) -> usize {
        let cells = side / self.cell;
        (cells - 1) * (cells - 1) * 4 * self.bins
    }

    /// Cell histograms of gradient orientation (linear interpolation between the two nearest
    /// bins, weighted by magnitude), then overlapping 2 x 2 blocks normalised with L2-Hys
    /// (L2, clip at 0.2, L2); the whole L2-normalised.
    fn describe(self, img: &[f32], side: usize) -> Vec<f32> {
        let cells = side / self.cell;
        let mut hist = vec![0f32; cells * cells * self.bins];
        let period = if self.signed {
            2.0 * std::f32::consts::PI
        } else {
            std::f32::consts::PI
        };
        for y in 0..cells * self.cell {
            for x in 0..cells * self.cell {
                let at = |yy: usize, xx: usize| img[yy * side + xx];
                let gx = if x > 0 && x + 1 < side {
                    at(y, x + 1) - at(y, x - 1)
                } else {
                    0.0
                };
                let gy = if y > 0 && y + 1 < side {
                    at(y + 1, x) - at(y - 1, x)
                } else {
                    0.0
                };
                let mag = (gx * gx + gy * gy).sqrt();
                if mag == 0.0 {
                    continue;
                }
                let pos = gy.atan2(gx).rem_euclid(period) / period * self.bins as f32;
                let lo = pos.floor();
                let frac = pos - lo;
                let b0 = (lo as usize) % self.bins;
                let b1 = (b0 + 1) % self.bins;
                let base = ((y / self.cell) * cells + x / self.cell) * self.bins;
                hist[base + b0] += mag * (1.0 - frac);
                hist[base + b1] += mag * frac;
            }
        }
        let mut out = Vec::with_capacity(self.dim(side));
        let mut block = Vec::with_capacity(4 * self.bins);
        for cy in 0..cells - 1 {
            for cx in 0..cells - 1 {
                block.clear();
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let base = ((cy + dy) * cells + cx + dx) * self.bins;
                    block.extend_from_slice(&hist[base..base + self.bins]);
                }
                l2_normalise(&mut block);
                block.iter_mut().for_each(|v| *v = v.min(0.2));
                l2_normalise(&mut block);
                out.extend_from_slice(&block);
            }
        }
        l2_normalise(&mut out);
        out
    }
}

/// 2 x 2 average-pooled luma, mean-centred, L2-normalised.
fn thumbnail(luma: &[f32]) -> Vec<f32> {
    let f = SIDE / THUMB;
    let mut t = vec![0f32; THUMB * THUMB];
    for (i, v) in t.iter_mut().enumerate() {
        let (ty, tx) = (i / THUMB, i % THUMB);
        let mut s = 0.0;
        for dy in 0..f {
            for dx in 0..f {
                s += luma[(ty * f + dy) * SIDE + tx * f + dx];
            }
        }
        *v = s / (f * f) as f32;
    }
    let mean = t.iter().sum::<f32>() / t.len() as f32;
    t.iter_mut().for_each(|v| *v -= mean);
    l2_normalise(&mut t);
    t
}

/// Joint RGB histogram, square-rooted (so that cosine is the Hellinger kernel), L2-normalised.
fn colour_histogram(r: &[f32], g: &[f32], b: &[f32]) -> Vec<f32> {
    let q = |v: f32| ((v * COLOUR_LEVELS as f32) as usize).min(COLOUR_LEVELS - 1);
    let mut h = vec![0f32; COLOUR_LEVELS.pow(3)];
    for i in 0..r.len() {
        h[(q(r[i]) * COLOUR_LEVELS + q(g[i])) * COLOUR_LEVELS + q(b[i])] += 1.0;
    }
    h.iter_mut().for_each(|v| *v = v.sqrt());
    l2_normalise(&mut h);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use lookalike_plugin::candle_core::DType;

    #[test]
    fn shape_and_norm() {
        let e = Classic;
        let x = Tensor::rand(0f32, 1f32, (3, 3, 32, 32), &Device::Cpu).unwrap();
        let y = e.embed(&x).unwrap();
        assert_eq!(y.dims(), &[3, Classic::dim()]);
        let norms = y.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        for n in norms {
            assert!((n - 1.0).abs() < 1e-4, "norm {n}");
        }
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let x = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            Classic.embed(&x),
            Err(PluginError::BadInput { .. })
        ));
    }

    #[test]
    fn unknown_config_lists_known() {
        let err = ClassicPlugin.build("huge", None).unwrap_err();
        assert!(err.to_string().contains("default"));
    }
}
