//! 2-D convolution (groups = 1) as a custom op: im2col into a per-thread buffer and one GEMM
//! per image, images spread over the cores. The backward pass is one op too: per image, the
//! weight gradient `dY . cols^T` accumulated per thread and the columns' gradient
//! `W^T . dY` scattered back by col2im. A 1 x 1 convolution with stride 1 and no padding uses
//! the image itself as its columns.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::gemm::{sgemm, Mat};
use super::{f32_slice, par_blocks, par_chunks};

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// Rows of an image's columns: C kh kw.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of an image's columns: out h x out w.
    fn l(&self) -> usize {
        self.oh * self.ow
    }

    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The columns are the image itself.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// For every column row (channel, i, j) and output row `oy`: calls
    /// `f(column offset, Some(input row offset) or None when the row is padding, x offset of
    /// the first output column)`. The column holds `ow` entries from `col`; entry `ox` reads
    /// input column `ox * stride + j - padding` of the input row.
    fn rows(&self, mut f: impl FnMut(usize, Option<usize>, isize)) {
        let l = self.l();
        for ci in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let r = (ci * self.kh + i) * self.kw + j;
                    for oy in 0..self.oh {
                        let y = (oy * self.stride + i) as isize - self.padding as isize;
                        let col = r * l + oy * self.ow;
                        let src = (y >= 0 && y < self.h as isize)
                            .then(|| (ci * self.h + y as usize) * self.w);
                        f(col, src, j as isize - self.padding as isize);
                    }
                }
            }
        }
    }

    /// The output columns `ox` whose input column `ox * stride + x0` lies inside the row.
    fn valid(&self, x0: isize) -> std::ops::Range<usize> {
        let s = self.stride as isize;
        let first = if x0 >= 0 { 0 } else { (-x0 + s - 1) / s };
        let last = (self.w as isize - 1 - x0).div_euclid(s) + 1; // exclusive
        let first = first.clamp(0, self.ow as isize) as usize;
        let last = last.clamp(0, self.ow as isize) as usize;
        first..last.max(first)
    }

    /// Fills `cols` (K x L) from one image (C x H x W).
    fn im2col(&self, img: &[f32], cols: &mut [f32]) {
        let s = self.stride;
        self.rows(|col, src, x0| {
            let out = &mut cols[col..col + self.ow];
            let Some(src) = src else {
                out.fill(0.0);
                return;
            };
            let valid = self.valid(x0);
            out[..valid.start].fill(0.0);
            out[valid.end..].fill(0.0);
            let row = &img[src..src + self.w];
            if s == 1 {
                let a = (valid.start as isize + x0) as usize;
                out[valid.clone()].copy_from_slice(&row[a..a + valid.len()]);
            } else {
                for ox in valid {
                    out[ox] = row[(ox as isize * s as isize + x0) as usize];
                }
            }
        });
    }

    /// Adds `cols` (K x L) back into one image's gradient (C x H x W).
    fn col2im(&self, cols: &[f32], img: &mut [f32]) {
        let s = self.stride;
        self.rows(|col, src, x0| {
            let Some(src) = src else { return };
            let inp = &cols[col..col + self.ow];
            let row = &mut img[src..src + self.w];
            let valid = self.valid(x0);
            if s == 1 {
                let a = (valid.start as isize + x0) as usize;
                for (o, v) in row[a..a + valid.len()].iter_mut().zip(&inp[valid]) {
                    *o += v;
                }
            } else {
                for ox in valid {
                    row[(ox as isize * s as isize + x0) as usize] += inp[ox];
                }
            }
        });
    }
}

/// The forward op: (x, weight, bias) to y.
#[derive(Debug, Clone, Copy)]
struct Conv(Geometry);

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "lookalike-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, "conv2d input")?;
        let w = f32_slice(s2, l2, "conv2d weight")?;
        let b = f32_slice(s3, l3, "conv2d bias")?;
        let (k, l) = (g.k(), g.l());
        let mut out = vec![0f32; g.n * g.o * l];
        let scratch = if g.pointwise() { 0 } else { k * l };
        par_chunks(
            &mut out,
            g.o * l,
            || vec![0f32; scratch],
            |cols, i, y| {
                let img = &x[i * g.image()..(i + 1) * g.image()];
                let cols: &[f32] = if g.pointwise() {
                    img
                } else {
                    g.im2col(img, cols);
                    cols
                };
                for (o, row) in y.chunks_mut(l).enumerate() {
                    row.fill(b[o]);
                }
                sgemm(y, Mat::rows(w, g.o, k), Mat::rows(cols, k, l), true);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &ConvBackward(g))?;
        let (nx, nw) = (g.n * g.image(), g.o * g.k());
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = flat.narrow(0, nx, nw)?.reshape(w.shape())?;
        let db = flat.narrow(0, nx + nw, g.o)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward op: (x, weight, dY) to the flat concatenation [dX, dW, db].
#[derive(Debug, Clone, Copy)]
struct ConvBackward(Geometry);

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "lookalike-conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, "conv2d input")?;
        let w = f32_slice(s2, l2, "conv2d weight")?;
        let dy = f32_slice(s3, l3, "conv2d output gradient")?;
        let (k, l, per) = (g.k(), g.l(), g.image());
        let (nx, nw) = (g.n * per, g.o * k);
        let mut out = vec![0f32; nx + nw + g.o];
        let (dx, rest) = out.split_at_mut(nx);
        // Per block of images: the input gradient in place, partial weight and bias gradients.
        let partials = par_blocks(dx, per, |first, dx_block| {
            let mut dw = vec![0f32; nw];
            let mut db = vec![0f32; g.o];
            let mut cols = vec![0f32; if g.pointwise() { 0 } else { k * l }];
            let mut dcols = vec![0f32; if g.pointwise() { 0 } else { k * l }];
            for (j, dxi) in dx_block.chunks_mut(per.max(1)).enumerate() {
                let i = first + j;
                let img = &x[i * per..(i + 1) * per];
                let dyi = &dy[i * g.o * l..(i + 1) * g.o * l];
                let c: &[f32] = if g.pointwise() {
                    img
                } else {
                    g.im2col(img, &mut cols);
                    &cols
                };
                sgemm(
                    &mut dw,
                    Mat::rows(dyi, g.o, l),
                    Mat::transposed(c, k, l),
                    true,
                );
                if g.pointwise() {
                    sgemm(
                        dxi,
                        Mat::transposed(w, g.o, k),
                        Mat::rows(dyi, g.o, l),
                        false,
                    );
                } else {
                    sgemm(
                        &mut dcols,
                        Mat::transposed(w, g.o, k),
                        Mat::rows(dyi, g.o, l),
                        false,
                    );
                    g.col2im(&dcols, dxi);
                }
                for (o, row) in dyi.chunks(l.max(1)).enumerate() {
                    db[o] += row.iter().sum::<f32>();
                }
            }
            (dw, db)
        });
        let (dw, db) = rest.split_at_mut(nw);
        for (pw, pb) in partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + nw + g.o)))
    }
}

/// 2-D convolution of `x` (N x C x H x W, f32, CPU) with `w` (O x C x kh x kw) and an optional
/// bias (O), groups = 1, square stride and zero padding, through the kernels of this module.
/// Same result as candle's `conv2d` up to float rounding; differentiable in `x`, `w` and the
/// bias.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
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
        o,
        kh,
        kw,
        stride,
        padding,
        oh: (h + 2 * padding - kh) / stride + 1,
        ow: (wd + 2 * padding - kw) / stride + 1,
    };
    let zeros;
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(o, candle_core::DType::F32, x.device())?;
            &zeros
        }
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv(g))
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
        par_chunks(
            &mut out,
            oh * ow,
            || (),
            |_, plane, o| {
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
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Depthwise convolution without padding, for inference (no gradient): `x` N x C x H x W, `w`
/// C x 1 x k x k, square `stride`.
pub fn depthwise_conv2d_inference(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Depthwise { stride })
}
