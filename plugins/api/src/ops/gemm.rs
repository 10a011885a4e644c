//! A bounds-checked, single-threaded f32 matrix product over the `gemm` crate (the blocked,
//! SIMD GEMM candle itself uses). The kernels call it once per image from their own worker
//! threads, so it runs without `gemm`'s own parallelism.

#![allow(unsafe_code)]

/// A read-only strided view of a `rows x cols` matrix: element `(r, c)` is
/// `data[r * rs + c * cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of the row-major `rows x cols` matrix in `data` (a `cols x rows` view).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a . b` (or `dst += a . b` with `accumulate`), `dst` row-major `a.rows x b.cols`.
///
/// # Panics
/// When the shapes disagree or a view reaches past its slice: the callers size every buffer
/// from the same geometry, so this is a bug, never bad input.
pub(crate) fn sgemm(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && dst.len() >= m * n && a.fits() && b.fits(),
        "sgemm: {}x{} . {}x{} into {} floats",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertion above checks that every element the product reads lies inside
    // `a.data` / `b.data` and every element it writes inside `dst` (row-major, m x n); the
    // three slices cannot alias (one is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut naive = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                naive[r * n + c] = (0..k).map(|i| a[r * k + i] * b[i * n + c]).sum();
            }
        }
        let mut dst = vec![1f32; m * n];
        sgemm(&mut dst, Mat::rows(&a, m, k), Mat::rows(&b, k, n), true);
        for (d, e) in dst.iter().zip(&naive) {
            assert!((d - 1.0 - e).abs() < 1e-5);
        }
        // b^T^T = b: the transposed view of b's transpose.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        sgemm(
            &mut dst,
            Mat::rows(&a, m, k),
            Mat::transposed(&bt, n, k),
            false,
        );
        for (d, e) in dst.iter().zip(&naive) {
            assert!((d - e).abs() < 1e-5);
        }
    }
}
