//! Max pooling as a custom op: any square window, stride and padding (padding never wins, as
//! `-inf` padding in PyTorch); the backward pass routes each output's gradient to the first
//! maximum of its window.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{f32_slice, par_chunks};

#[derive(Debug, Clone, Copy)]
struct Pool {
    k: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Pool {
    /// Calls `f(output index, input index of the window's first maximum)` for one plane.
    fn argmax(&self, plane: &[f32], mut f: impl FnMut(usize, usize)) {
        if self.k == 2 && self.stride == 2 && self.padding == 0 {
            // The common 2 x 2 pool: two rows at a time, no window bounds or index checks
            // inside the row (a profile of SimNet training put the general loop at 6 %).
            let (w, ow) = (self.w, self.ow);
            for oy in 0..self.oh {
                let r0 = 2 * oy * w;
                let (top, bottom) = (&plane[r0..r0 + 2 * ow], &plane[r0 + w..r0 + w + 2 * ow]);
                for (ox, (t, b)) in top.chunks_exact(2).zip(bottom.chunks_exact(2)).enumerate() {
                    // The first maximum in the order top-left, top-right, bottom-left,
                    // bottom-right, as the general loop below finds it.
                    let (mut best, mut at) = (t[0], 0);
                    if t[1] > best {
                        (best, at) = (t[1], 1);
                    }
                    if b[0] > best {
                        (best, at) = (b[0], w);
                    }
                    if b[1] > best {
                        at = w + 1;
                    }
                    f(oy * ow + ox, r0 + 2 * ox + at);
                }
            }
            return;
        }
        for oy in 0..self.oh {
            let y0 = (oy * self.stride) as isize - self.padding as isize;
            let ys = y0.max(0) as usize..((y0 + self.k as isize).min(self.h as isize)) as usize;
            for ox in 0..self.ow {
                let x0 = (ox * self.stride) as isize - self.padding as isize;
                let xs = x0.max(0) as usize..((x0 + self.k as isize).min(self.w as isize)) as usize;
                let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                for y in ys.clone() {
                    for x in xs.clone() {
                        let v = plane[y * self.w + x];
                        if v > best || at == usize::MAX {
                            best = v;
                            at = y * self.w + x;
                        }
                    }
                }
                f(oy * self.ow + ox, at);
            }
        }
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "lookalike-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "max pool input")?;
        let (n, c, _, _) = l.shape().dims4()?;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut out = vec![0f32; n * c * ohw];
        par_chunks(
            &mut out,
            ohw,
            || (),
            |_, p, o| {
                let plane = &x[p * hw..(p + 1) * hw];
                self.argmax(plane, |i, at| o[i] = plane[at]);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, self.oh, self.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PoolBackward(*self),
        )?))
    }
}

/// (x, dY) to dX.
#[derive(Debug, Clone, Copy)]
struct PoolBackward(Pool);

impl CustomOp2 for PoolBackward {
    fn name(&self) -> &'static str {
        "lookalike-max-pool-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s1, l1, "max pool input")?;
        let dy = f32_slice(s2, l2, "max pool output gradient")?;
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut out = vec![0f32; x.len()];
        par_chunks(
            &mut out,
            hw,
            || (),
            |_, p, dx| {
                let plane = &x[p * hw..(p + 1) * hw];
                let gp = &dy[p * ohw..(p + 1) * ohw];
                g.argmax(plane, |i, at| dx[at] += gp[i]);
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Max pooling of `x` (N x C x H x W, f32, CPU) with a `k x k` window, `stride` and
/// `padding` (padded positions never win). Differentiable in `x`.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if k == 0 || stride == 0 || h + 2 * padding < k || w + 2 * padding < k || padding >= k {
        return Err(candle_core::Error::Msg(format!(
            "max pool: window {k}, stride {stride}, padding {padding} on a {h}x{w} input"
        )));
    }
    let pool = Pool {
        k,
        stride,
        padding,
        h,
        w,
        oh: (h + 2 * padding - k) / stride + 1,
        ow: (w + 2 * padding - k) / stride + 1,
    };
    x.contiguous()?.apply_op1(pool)
}
