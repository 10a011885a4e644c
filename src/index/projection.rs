//! Compact vectors: a PCA projection fitted on a database's own stored vectors.
//!
//! Past `Options::compact_after` images, a model whose extractor makes more than
//! `Options::compact_dim` dimensions gets a projection to that many (`db/compact.rs`): the
//! stored vectors, the index, every query and every later insert use `y = x * matrix + bias`,
//! then L2 normalisation for the cosine metric. Fitted with FAISS's `PCAMatrix` (centred, no
//! whitening) on up to [`FIT_SAMPLE`] stored vectors. On Fashion-MNIST, the default extractor's
//! 2,408 dimensions projected to 256 keep accuracy@1 (`docs/benchmarks.md`, "Compact vectors").

use lookalike_plugin::candle_core::{Device, Tensor};

use super::ffi;
use crate::error::{Error, Result};

/// Stored vectors a projection is fitted on, at most.
pub(crate) const FIT_SAMPLE: usize = 20_000;

/// A linear projection `y = x * matrix + bias`.
#[derive(Debug, Clone)]
pub(crate) struct Projection {
    dim_in: usize,
    dim_out: usize,
    /// `dim_in x dim_out`.
    matrix: Tensor,
    /// `1 x dim_out`.
    bias: Tensor,
}

fn tensor_err(e: lookalike_plugin::candle_core::Error) -> Error {
    Error::Index(format!("projection: {e}"))
}

impl Projection {
    /// Fits a PCA from `dim_in` to `dim_out` dimensions on `sample` (rows of `dim_in` floats,
    /// at least `dim_out` of them).
    pub fn fit(sample: &[f32], dim_in: usize, dim_out: usize) -> Result<Projection> {
        let n = sample.len() / dim_in.max(1);
        let (matrix, bias) = ffi::pca_fit(sample, n, dim_in, dim_out)?;
        Projection::from_parts(dim_in, dim_out, matrix, bias).map_err(Error::Index)
    }

    /// A projection from stored numbers; why not, when they do not make one.
    pub fn from_parts(
        dim_in: usize,
        dim_out: usize,
        matrix: Vec<f32>,
        bias: Vec<f32>,
    ) -> std::result::Result<Projection, String> {
        if dim_out == 0 || dim_out > dim_in {
            return Err(format!("projects {dim_in} dimensions to {dim_out}"));
        }
        if matrix.len() != dim_in.saturating_mul(dim_out) || bias.len() != dim_out {
            return Err(format!(
                "{} matrix and {} bias values for {dim_in} to {dim_out} dimensions",
                matrix.len(),
                bias.len()
            ));
        }
        if !matrix.iter().chain(&bias).all(|x| x.is_finite()) {
            return Err("has NaN or infinite values".into());
        }
        Ok(Projection {
            dim_in,
            dim_out,
            matrix: Tensor::from_vec(matrix, (dim_in, dim_out), &Device::Cpu)
                .map_err(|e| e.to_string())?,
            bias: Tensor::from_vec(bias, (1, dim_out), &Device::Cpu).map_err(|e| e.to_string())?,
        })
    }

    /// Output dimension.
    pub fn dim_out(&self) -> usize {
        self.dim_out
    }

    /// The matrix (`dim_in x dim_out`, row-major) and the bias, for storing.
    pub fn parts(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        Ok((
            flat(&self.matrix).map_err(tensor_err)?,
            flat(&self.bias).map_err(tensor_err)?,
        ))
    }

    /// Projects rows of `dim_in` floats (one after another) to rows of `dim_out`.
    pub fn apply(&self, rows: &[f32]) -> Result<Vec<f32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if !rows.len().is_multiple_of(self.dim_in) {
            return Err(Error::DimensionMismatch {
                what: "vectors given to the projection".into(),
                expected: self.dim_in,
                got: rows.len() % self.dim_in,
            });
        }
        let n = rows.len() / self.dim_in;
        let x = Tensor::from_slice(rows, (n, self.dim_in), &Device::Cpu).map_err(tensor_err)?;
        x.matmul(&self.matrix)
            .and_then(|y| y.broadcast_add(&self.bias))
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.to_vec1::<f32>())
            .map_err(tensor_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on a plane tilted in 6 dimensions, around an offset: a PCA to 2 dimensions
    /// keeps every distance between them.
    #[test]
    fn pca_keeps_a_plane() {
        let (d, n) = (6, 200);
        let a = [1.0f32, 2.0, 0.0, -1.0, 0.5, 0.0];
        let b = [0.0f32, 1.0, 1.0, 1.0, -0.5, 2.0];
        let offset = [3.0f32, -1.0, 2.0, 0.0, 1.0, 5.0];
        let mut rows = Vec::new();
        for i in 0..n {
            let (s, t) = ((i as f32 * 0.37).sin() * 3.0, (i as f32 * 0.11).cos() * 2.0);
            rows.extend((0..d).map(|k| offset[k] + s * a[k] + t * b[k]));
        }
        let p = Projection::fit(&rows, d, 2).unwrap();
        let y = p.apply(&rows).unwrap();
        let dist = |v: &[f32], w: usize, i: usize, j: usize| -> f32 {
            (0..w)
                .map(|k| (v[i * w + k] - v[j * w + k]).powi(2))
                .sum::<f32>()
        };
        for (i, j) in [(0, 1), (3, 150), (20, 199)] {
            let (full, proj) = (dist(&rows, d, i, j), dist(&y, 2, i, j));
            assert!(
                (full - proj).abs() < 1e-3 * full.max(1.0),
                "{full} vs {proj}"
            );
        }
        // Centred: the mean of the projected points is zero.
        let mean: f32 = y.iter().step_by(2).sum::<f32>() / n as f32;
        assert!(mean.abs() < 1e-3, "{mean}");
    }

    #[test]
    fn bad_parts_are_refused() {
        assert!(Projection::from_parts(4, 2, vec![0.0; 7], vec![0.0; 2]).is_err());
        assert!(Projection::from_parts(4, 5, vec![0.0; 20], vec![0.0; 5]).is_err());
        assert!(Projection::from_parts(2, 1, vec![f32::NAN, 0.0], vec![0.0]).is_err());
        assert!(
            Projection::fit(&[0.0; 8], 4, 3).is_err(),
            "two rows cannot fit three dims"
        );
        let p = Projection::from_parts(2, 1, vec![1.0, 1.0], vec![0.5]).unwrap();
        assert_eq!(p.apply(&[1.0, 2.0, 0.0, 0.0]).unwrap(), vec![3.5, 0.5]);
        assert!(p.apply(&[1.0, 2.0, 3.0]).is_err());
    }
}
