//! A faster CPU 2-D convolution for training: im2col as a differentiable custom op, the
//! product through candle's (blocked, multi-threaded) matrix multiply.
//!
//! candle's own `conv2d` computes its forward pass with im2col and a GEMM too, but its backward
//! pass runs as direct convolutions (`conv_transpose2d` for the input gradient, a convolution
//! over transposed tensors for the weight gradient), which dominate training time on a CPU.
//! Here the convolution is `cols = im2col(x)` (N x L x K, K = C kh kw, L = out h x out w)
//! followed by `cols . W^T`: candle's autograd then gets the weight gradient
//! (`cols^T . dY`) and the columns' gradient (`dY . W`) as matrix products, and [`Im2Col`]'s
//! backward is col2im (a scatter-add). Only groups = 1 takes this path.
//!
//! Which path runs is decided per process by the environment variable `LOOKALIKE_CONV`:
//! `candle` selects candle's built-in convolution, anything else (or unset) this one.
//!
//! Measured (`cargo bench --bench conv`): about as fast as candle's on the small CNN
//! (the GEMMs here are skinny and candle's element-wise backward ops cost as much as the
//! convolutions), so it is not yet the speed-up the fast-training issue asks for. It does
//! differentiate every stride and padding: candle's own backward fails when strided windows do
//! not tile the padded input (17 of the 40 random cases in `tests/conv.rs`).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The convolution implementation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPath {
    /// im2col + GEMM with a GEMM backward (this module).
    Fast,
    /// candle's built-in `conv2d`.
    Candle,
}

/// The path selected by `LOOKALIKE_CONV` (read once per process).
pub fn conv_path() -> ConvPath {
    static PATH: OnceLock<ConvPath> = OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("LOOKALIKE_CONV").as_deref() {
        Ok("candle") => ConvPath::Candle,
        _ => ConvPath::Fast,
    })
}

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn l(&self) -> usize {
        self.oh * self.ow
    }

    /// Calls `f(col, src)` for every (column entry, input pixel) pair of image `b`'s window
    /// grid, where `col` indexes the image's L x K columns and `src` its C x H x W input.
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let k = self.k();
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let row = (oy * self.ow + ox) * k;
                for ci in 0..self.c {
                    for i in 0..self.kh {
                        let y = (oy * self.stride + i) as isize - self.padding as isize;
                        if y < 0 || y >= self.h as isize {
                            continue;
                        }
                        for j in 0..self.kw {
                            let x = (ox * self.stride + j) as isize - self.padding as isize;
                            if x < 0 || x >= self.w as isize {
                                continue;
                            }
                            let col = row + (ci * self.kh + i) * self.kw + j;
                            let src = (ci * self.h + y as usize) * self.w + x as usize;
                            f(col, src);
                        }
                    }
                }
            }
        }
    }
}

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

/// Runs `f(image index, output chunk)` over the images of a batch on all cores.
fn par_images(out: &mut [f32], per: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = out.len().checked_div(per).unwrap_or(0);
    if threads <= 1 || n <= 1 {
        for (b, chunk) in out.chunks_mut(per.max(1)).enumerate() {
            f(b, chunk);
        }
        return;
    }
    let per_thread = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, block) in out.chunks_mut(per * per_thread).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, chunk) in block.chunks_mut(per).enumerate() {
                    f(t * per_thread + i, chunk);
                }
            });
        }
    });
}

/// im2col: N x C x H x W to N x L x K. Backward: col2im.
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "lookalike-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s, l, "im2col")?;
        let (per_in, per_out) = (g.c * g.h * g.w, g.l() * g.k());
        let mut out = vec![0f32; g.n * per_out];
        par_images(&mut out, per_out, |b, cols| {
            let img = &x[b * per_in..(b + 1) * per_in];
            g.for_each(|col, src| cols[col] = img[src]);
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.l(), g.k()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

/// col2im: N x L x K back to N x C x H x W, summing overlapping windows. Backward: im2col.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "lookalike-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = f32_slice(s, l, "col2im")?;
        let (per_in, per_cols) = (g.c * g.h * g.w, g.l() * g.k());
        let mut out = vec![0f32; g.n * per_in];
        par_images(&mut out, per_in, |b, img| {
            let c = &cols[b * per_cols..(b + 1) * per_cols];
            g.for_each(|col, src| img[src] += c[col]);
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// 2-D convolution of `x` (N x C x H x W, f32) with `w` (O x C x kh x kw), groups = 1, square
/// stride and padding, through im2col + GEMM (see the module docs). Same result as candle's
/// `conv2d` up to float rounding; differentiable in `x` and `w`.
pub fn conv2d_im2col(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c {
        return Err(candle_core::Error::Msg(format!(
            "conv2d: input has {c} channels, the kernel expects {wc}"
        )));
    }
    if h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        return Err(candle_core::Error::Msg(
            "conv2d: kernel larger than the padded input".into(),
        ));
    }
    let g = Geometry {
        n,
        c,
        h,
        w: wd,
        kh,
        kw,
        stride,
        padding,
        oh: (h + 2 * padding - kh) / stride + 1,
        ow: (wd + 2 * padding - kw) / stride + 1,
    };
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?; // N x L x K
    let y = cols
        .reshape((n * g.l(), g.k()))?
        .matmul(&w.reshape((o, g.k()))?.t()?)?; // (N L) x O
    y.reshape((n, g.l(), o))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, o, g.oh, g.ow))
}

/// Depthwise convolution (one group per channel) for inference: `x` is N x C x H x W, already
/// padded; `w` is C x 1 x k x k. A direct loop over each channel plane, in parallel over planes.
#[derive(Debug, Clone, Copy)]
struct Depthwise {
    stride: usize,
}

impl candle_core::CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "lookalike-depthwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "depthwise input")?;
        let w = f32_slice(s2, l2, "depthwise kernel")?;
        let (n, c, h, wd) = l1.shape().dims4()?;
        let (wc, _, k, _) = l2.shape().dims4()?;
        if wc != c || h < k || wd < k {
            return Err(candle_core::Error::Msg(format!(
                "depthwise: {c} channels of {h}x{wd} against a {wc}-channel {k}x{k} kernel"
            )));
        }
        let s = self.stride;
        let (oh, ow) = ((h - k) / s + 1, (wd - k) / s + 1);
        let mut out = vec![0f32; n * c * oh * ow];
        par_images(&mut out, oh * ow, |plane, o| {
            let ch = plane % c;
            let img = &x[plane * h * wd..(plane + 1) * h * wd];
            let ker = &w[ch * k * k..(ch + 1) * k * k];
            for oy in 0..oh {
                let orow = &mut o[oy * ow..(oy + 1) * ow];
                for i in 0..k {
                    let irow = &img[(oy * s + i) * wd..(oy * s + i + 1) * wd];
                    for j in 0..k {
                        let wv = ker[i * k + j];
                        if s == 1 {
                            for (dst, src) in orow.iter_mut().zip(&irow[j..j + ow]) {
                                *dst += wv * src;
                            }
                        } else {
                            for (ox, dst) in orow.iter_mut().enumerate() {
                                *dst += wv * irow[ox * s + j];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Depthwise convolution without padding, for inference (no gradient): `x` N x C x H x W, `w`
/// C x 1 x k x k, square `stride`.
pub fn depthwise_conv2d_inference(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Depthwise { stride })
}
