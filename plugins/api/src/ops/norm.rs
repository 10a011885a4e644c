//! Batch normalisation with a fused activation, as custom ops: one pass for the statistics,
//! one for the output; the backward pass is one reduction pass over the channels and one
//! element pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32_slice, par_chunks, par_ranges};

/// The activation fused after the normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None: the affine output as it is.
    Identity,
    /// `max(0, z)`.
    Relu,
    /// `min(max(0, z), 6)` (MobileNet, EfficientNet-Lite).
    Relu6,
}

/// The per-plane loops, monomorphised per activation so that they vectorise (a data-dependent
/// branch per element costs more than the arithmetic: ReLU masks are close to random).
trait Act {
    fn apply(z: f32) -> f32;
    /// 1 where the gradient passes at pre-activation `z` (PyTorch's rule: open interval), else 0.
    fn gate(z: f32) -> f32;
}

struct Identity;
struct Relu;
struct Relu6;

impl Act for Identity {
    #[inline(always)]
    fn apply(z: f32) -> f32 {
        z
    }
    #[inline(always)]
    fn gate(_: f32) -> f32 {
        1.0
    }
}

impl Act for Relu {
    #[inline(always)]
    fn apply(z: f32) -> f32 {
        z.max(0.0)
    }
    #[inline(always)]
    fn gate(z: f32) -> f32 {
        if z > 0.0 {
            1.0
        } else {
            0.0
        }
    }
}

impl Act for Relu6 {
    #[inline(always)]
    fn apply(z: f32) -> f32 {
        z.clamp(0.0, 6.0)
    }
    #[inline(always)]
    fn gate(z: f32) -> f32 {
        if z > 0.0 && z < 6.0 {
            1.0
        } else {
            0.0
        }
    }
}

/// Runs `$body` with `$a` bound to the [`Act`] type of `$act`.
macro_rules! with_act {
    ($act:expr, $a:ident => $body:expr) => {
        match $act {
            Activation::Identity => {
                type $a = Identity;
                $body
            }
            Activation::Relu => {
                type $a = Relu;
                $body
            }
            Activation::Relu6 => {
                type $a = Relu6;
                $body
            }
        }
    };
}

/// `y = act(x * a + b)` over one plane.
fn forward_plane<A: Act>(y: &mut [f32], x: &[f32], a: f32, b: f32) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = A::apply(v * a + b);
    }
}

/// Sums of the gated gradient and of it times x-hat over one plane.
fn sums_plane<A: Act>(x: &[f32], g: &[f32], a: f32, b: f32, mean: f32, is: f32) -> (f32, f32) {
    let (mut s1, mut s2) = (0f32, 0f32);
    for (v, g) in x.iter().zip(g) {
        let gm = g * A::gate(v * a + b);
        s1 += gm;
        s2 += gm * (v - mean) * is;
    }
    (s1, s2)
}

/// The input gradient over one plane: `a (g_gated - k1 - x_hat k2)`.
#[allow(clippy::too_many_arguments)]
fn dx_plane<A: Act>(
    dx: &mut [f32],
    x: &[f32],
    g: &[f32],
    (a, b): (f32, f32),
    mean: f32,
    is: f32,
    k1: f32,
    k2: f32,
) {
    for ((o, v), g) in dx.iter_mut().zip(x).zip(g) {
        let gm = g * A::gate(v * a + b);
        *o = a * (gm - k1 - (v - mean) * is * k2);
    }
}

/// Geometry: N images of C planes of `hw` values.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    fn of(shape: &Shape) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            return Err(candle_core::Error::Msg(format!(
                "batch norm: input must be N x C x ..., got {d:?}"
            )));
        }
        Ok(Dims {
            n: d[0],
            c: d[1],
            hw: d[2..].iter().product(),
        })
    }

    /// Values per channel.
    fn m(&self) -> usize {
        self.n * self.hw
    }

    /// The planes of channel `c`, one per image.
    fn planes<'a>(&self, x: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (cc, hw) = (self.c, self.hw);
        (0..self.n).map(move |i| &x[(i * cc + c) * hw..(i * cc + c + 1) * hw])
    }
}

/// Per-channel mean and biased variance, 2 x C (no gradient).
#[derive(Debug, Clone, Copy)]
struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "lookalike-batch-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "batch stats")?;
        let d = Dims::of(l.shape())?;
        let m = d.m().max(1) as f64;
        let per: Vec<Vec<(f32, f32)>> = par_ranges(d.c, |range| {
            range
                .map(|c| {
                    // f32 within a plane (vectorised), f64 across planes.
                    let sum: f64 = d.planes(x, c).map(|p| p.iter().sum::<f32>() as f64).sum();
                    let mean = (sum / m) as f32;
                    let sq: f64 = d
                        .planes(x, c)
                        .map(|p| p.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() as f64)
                        .sum();
                    (mean, (sq / m) as f32)
                })
                .collect()
        });
        let flat: Vec<(f32, f32)> = per.into_iter().flatten().collect();
        let mut out: Vec<f32> = flat.iter().map(|s| s.0).collect();
        out.extend(flat.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, d.c))))
    }
}

/// Per-channel batch statistics of `x` (N x C x ...): a 2 x C tensor of the mean and the
/// biased variance, without a gradient.
pub fn batch_stats(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Stats)
}

/// Per-channel scale and shift: `y = x * scale + shift`.
fn affine(params: &[f32], stats: &[f32], c: usize, eps: f32) -> Vec<(f32, f32)> {
    (0..c)
        .map(|ch| {
            let scale = params[ch] / (stats[c + ch] + eps).sqrt();
            (scale, params[c + ch] - stats[ch] * scale)
        })
        .collect()
}

/// The forward op: (x, [weight; bias] 2 x C, [mean; var] 2 x C) to y.
#[derive(Debug, Clone, Copy)]
struct Norm {
    eps: f32,
    act: Activation,
    /// The statistics are x's own (they carry gradient back to x).
    batch: bool,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "lookalike-batch-norm"
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
        let x = f32_slice(s1, l1, "batch norm input")?;
        let p = f32_slice(s2, l2, "batch norm parameters")?;
        let st = f32_slice(s3, l3, "batch norm statistics")?;
        let d = Dims::of(l1.shape())?;
        let ab = affine(p, st, d.c, self.eps);
        let mut out = vec![0f32; x.len()];
        let act = self.act;
        par_chunks(
            &mut out,
            d.c * d.hw,
            || (),
            |_, i, y| {
                let img = &x[i * d.c * d.hw..(i + 1) * d.c * d.hw];
                for ((yp, xp), (a, b)) in y.chunks_mut(d.hw).zip(img.chunks(d.hw)).zip(&ab) {
                    with_act!(act, A => forward_plane::<A>(yp, xp, *a, *b));
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        stats: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = params.dim(1)?;
        let packed = Tensor::cat(&[params.detach(), stats.detach()], 0)?;
        let flat = x.apply_op3_no_bwd(&packed, &grad.contiguous()?, &NormBackward(*self))?;
        let nx = x.elem_count();
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dp = flat.narrow(0, nx, 2 * c)?.reshape((2, c))?;
        Ok((Some(dx), Some(dp), None))
    }
}

/// The backward op: (x, [weight; bias; mean; var] 4 x C, dY) to [dX, dweight, dbias].
#[derive(Debug, Clone, Copy)]
struct NormBackward(Norm);

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        "lookalike-batch-norm-backward"
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
        let Norm { eps, act, batch } = self.0;
        let x = f32_slice(s1, l1, "batch norm input")?;
        let ps = f32_slice(s2, l2, "batch norm parameters")?;
        let dy = f32_slice(s3, l3, "batch norm output gradient")?;
        let d = Dims::of(l1.shape())?;
        let (p, st) = ps.split_at(2 * d.c);
        let ab = affine(p, st, d.c, eps);
        let invstd: Vec<f32> = (0..d.c).map(|c| 1.0 / (st[d.c + c] + eps).sqrt()).collect();
        // Per channel: sum of the masked gradient (d bias) and of it times x-hat (d weight).
        let sums: Vec<(f32, f32)> = par_ranges(d.c, |range| {
            range
                .map(|c| {
                    let (a, b) = ab[c];
                    let (mean, is) = (st[c], invstd[c]);
                    let (mut s_dy, mut s_dyx) = (0f64, 0f64);
                    for (xp, gp) in d.planes(x, c).zip(d.planes(dy, c)) {
                        let (s1, s2) = with_act!(act, A => sums_plane::<A>(xp, gp, a, b, mean, is));
                        s_dy += s1 as f64;
                        s_dyx += s2 as f64;
                    }
                    (s_dy as f32, s_dyx as f32)
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        let m = d.m().max(1) as f32;
        let mut out = vec![0f32; x.len() + 2 * d.c];
        let (dx, dp) = out.split_at_mut(x.len());
        par_chunks(
            dx,
            d.c * d.hw,
            || (),
            |_, i, dxi| {
                let base = i * d.c * d.hw;
                for (c, dxp) in dxi.chunks_mut(d.hw).enumerate() {
                    let (a, b) = ab[c];
                    let (mean, is) = (st[c], invstd[c]);
                    let (s_dy, s_dyx) = sums[c];
                    let (k1, k2) = if batch {
                        (s_dy / m, s_dyx / m)
                    } else {
                        (0.0, 0.0)
                    };
                    let xp = &x[base + c * d.hw..base + (c + 1) * d.hw];
                    let gp = &dy[base + c * d.hw..base + (c + 1) * d.hw];
                    with_act!(act, A => dx_plane::<A>(dxp, xp, gp, (a, b), mean, is, k1, k2));
                }
            },
        );
        for (c, (s_dy, s_dyx)) in sums.iter().enumerate() {
            dp[c] = *s_dyx;
            dp[d.c + c] = *s_dy;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * d.c)))
    }
}

/// Batch normalisation of `x` (N x C x ..., f32, CPU) with `stats` (2 x C: mean and biased
/// variance), per-channel `weight` and `bias`, then `act`. With `batch_stats_of_x` the
/// statistics are `x`'s own ([`batch_stats`]) and the gradient flows through them (training
/// mode); otherwise they are fixed (running statistics: evaluation or frozen batch norm).
/// Differentiable in `x`, `weight` and `bias`.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &Tensor,
    eps: f64,
    act: Activation,
    batch_stats_of_x: bool,
) -> Result<Tensor> {
    let c = weight.dim(0)?;
    if x.rank() < 2 || x.dim(1)? != c || bias.dims() != [c] || stats.dims() != [2, c] {
        return Err(candle_core::Error::Msg(format!(
            "batch norm: input {:?} against {c} channels (bias {:?}, statistics {:?})",
            x.dims(),
            bias.dims(),
            stats.dims()
        )));
    }
    let params = Tensor::stack(&[weight, bias], 0)?;
    x.contiguous()?.apply_op3(
        &params,
        &stats.detach().contiguous()?,
        Norm {
            eps: eps as f32,
            act,
            batch: batch_stats_of_x,
        },
    )
}
