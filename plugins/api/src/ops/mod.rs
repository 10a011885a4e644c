//! Fast CPU kernels for training and inference, as candle custom ops with their own backward
//! passes, so that models stay ordinary candle code.
//!
//! candle 0.11's CPU convolution backward runs as direct (transposed) convolutions, and every
//! element-wise op of a batch-norm or max-pool backward allocates a fresh tensor on one core;
//! on the fast-training issue's small CNN that is 12-70 training images/s. The kernels here:
//!
//! * [`conv2d`]: im2col per image into a reused buffer, one blocked GEMM per image (the `gemm`
//!   crate candle uses), images spread over the cores; the backward pass is two GEMMs per image
//!   (weight gradient accumulated per thread, input gradient through col2im) in one op.
//! * [`batch_norm`]: batch statistics, normalisation, affine map and an optional ReLU/ReLU6
//!   in one pass; the backward pass is one reduction pass and one element pass.
//! * [`max_pool2d`]: any window, stride and padding (`-inf` padding, as PyTorch), with a
//!   backward that routes each gradient to its window's maximum.
//!
//! Which path runs is decided per process by the environment variable `LOOKALIKE_OPS`:
//! `candle` selects candle's built-in ops everywhere ([`OpsPath::Candle`]); anything else, or
//! unset, these kernels. They run on CPU f32 tensors only: the layers in [`crate::nn`] use
//! candle's ops for any other device or dtype (so the `gpu` feature gets candle's CUDA
//! kernels).

mod conv;
mod gemm;
mod norm;
mod pool;

pub use conv::{conv2d, depthwise_conv2d_inference};
pub use norm::{batch_norm, batch_stats, Activation};
pub use pool::max_pool2d;

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The kernel implementation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsPath {
    /// The kernels of this module.
    Fast,
    /// candle's built-in ops.
    Candle,
}

/// The path selected by `LOOKALIKE_OPS` (read once per process).
pub fn ops_path() -> OpsPath {
    static PATH: OnceLock<OpsPath> = OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("LOOKALIKE_OPS").as_deref() {
        Ok("candle") => OpsPath::Candle,
        _ => OpsPath::Fast,
    })
}

/// Whether the fast kernels apply to `x`: the fast path is selected and `x` is an f32 tensor
/// on the CPU.
pub fn fast_for(x: &Tensor) -> bool {
    ops_path() == OpsPath::Fast && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Worker threads for the kernels: the machine's available parallelism.
fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// The contiguous f32 data of a custom op's input.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "{what}: only f32 is supported"
            )))
        }
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::Msg(format!(
            "{what}: input must be contiguous"
        ))),
    }
}

/// Splits `out` into chunks of `per` floats and runs `f(state, chunk index, chunk)` over them
/// on all cores, each thread with its own `state` from `init` (a reused scratch buffer).
fn par_chunks<S>(
    out: &mut [f32],
    per: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [f32]) + Sync,
) {
    let per = per.max(1);
    par_blocks(out, per, |first, block| {
        let mut s = init();
        for (i, chunk) in block.chunks_mut(per).enumerate() {
            f(&mut s, first + i, chunk);
        }
    });
}

/// Splits `out` (whole chunks of `per` floats) into one block per core, runs
/// `f(index of the block's first chunk, block)` on each in parallel and returns the results in
/// order.
fn par_blocks<T: Send>(
    out: &mut [f32],
    per: usize,
    f: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    let per = per.max(1);
    let n = out.len() / per;
    let threads = threads().min(n).max(1);
    if threads == 1 {
        return vec![f(0, out)];
    }
    let per_thread = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(per * per_thread)
            .enumerate()
            .map(|(t, block)| {
                let f = &f;
                scope.spawn(move || f(t * per_thread, block))
            })
            .collect();
        join_all(handles)
    })
}

/// Splits `0..n` into one range per core, runs `f` on each in parallel and returns the
/// results in order.
fn par_ranges<T: Send>(n: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = threads().min(n).max(1);
    if threads == 1 {
        return vec![f(0..n)];
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || f(t * per..((t + 1) * per).min(n)))
            })
            .collect();
        join_all(handles)
    })
}

/// The results of scoped threads in order; a worker's panic continues in the caller.
fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect()
}
