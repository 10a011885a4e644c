//! Helpers for plugins whose weights live in a candle-nn [`VarMap`] (feature `nn`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub use crate::ops::Activation;
use crate::PluginError;

/// A fresh `VarMap` and a builder over it (f32, CPU): build the model with the builder, and the
/// map holds every parameter under its `vb.pp(..)` name.
pub fn new_varmap() -> (VarMap, VarBuilder<'static>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (varmap, vb)
}

/// Every parameter of `varmap` as safetensors bytes, names sorted.
pub fn save_varmap(varmap: &VarMap) -> Result<Vec<u8>, PluginError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let mut tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| PluginError::Weights(format!("cannot write safetensors: {e}")))
}

/// Reads safetensors bytes into tensors on the CPU.
pub fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, PluginError> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| PluginError::Weights(format!("not a safetensors file: {e}")))
}

/// Overwrites every parameter of `varmap` with the tensor of the same name in `bytes`
/// (safetensors). Extra tensors are ignored; a missing tensor or one of another shape is an
/// error naming it and the expected shape. F16/BF16/F64 tensors are converted to f32.
pub fn load_varmap(varmap: &VarMap, bytes: &[u8]) -> Result<(), PluginError> {
    load_prefixed(varmap, &read_safetensors(bytes)?, "", "the")
}

/// A builder over detached copies of `varmap`'s parameters: a network built from it computes
/// without recording a gradient graph (inference), and later changes to the map do not reach it.
pub fn frozen_builder(varmap: &VarMap) -> Result<VarBuilder<'static>, PluginError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}

/// A VGG convolution stack with torchvision's parameter names (`features.{i}.weight`), so
/// that torchvision's VGG16/VGG19 weights load as they are. `cfg` lists output channels, with
/// 0 for a 2 x 2 max pool (torchvision's "M").
#[derive(Debug, Clone)]
pub struct Vgg {
    layers: Vec<Option<(Conv2d, Option<BatchNorm>)>>,
}

/// VGG16's configuration "D".
pub const VGG16: [usize; 18] = [
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];
/// VGG19's configuration "E".
pub const VGG19: [usize; 21] = [
    64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0,
];

impl Vgg {
    /// Builds the stack under `vb` (pass `vb.pp("features")` for torchvision names); with
    /// `batch_norm`, each convolution is followed by batch norm, as in torchvision's `vgg*_bn`.
    pub fn new(
        cfg: &[usize],
        in_channels: usize,
        batch_norm: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::new();
        let mut cin = in_channels;
        let mut index = 0;
        for &c in cfg {
            if c == 0 {
                layers.push(None);
                index += 1;
            } else {
                let conv_cfg = candle_nn::Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let conv = conv2d(cin, c, 3, conv_cfg, vb.pp(index.to_string()))?;
                let bn = if batch_norm {
                    Some(self::batch_norm(c, 1e-5, vb.pp((index + 1).to_string()))?)
                } else {
                    None
                };
                layers.push(Some((conv, bn)));
                cin = c;
                index += if batch_norm { 3 } else { 2 }; // conv, [BN,] ReLU
            }
        }
        Ok(Vgg { layers })
    }

    /// Output channels of the stack.
    pub fn out_channels(cfg: &[usize]) -> usize {
        cfg.iter().rev().copied().find(|c| *c != 0).unwrap_or(0)
    }

    /// Runs the stack: convolutions with [batch norm and] ReLU, max pools. `train` puts batch
    /// norm in training mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = match l {
                Some((conv, bn)) => {
                    let y = candle_core::Module::forward(conv, &h)?;
                    match bn {
                        Some(bn) => bn.forward_act(&y, train, Activation::Relu)?,
                        None => y.relu()?,
                    }
                }
                None => max_pool2d(&h, 2, 2, 0)?,
            };
        }
        Ok(h)
    }
}

/// Stochastic gradient descent with Nesterov momentum (Sutskever et al. 2013), as PyTorch's
/// `SGD(nesterov=True)`: `v = mu * v + g; p -= lr * (g + mu * v)`, with optional weight decay
/// added to `g`.
#[derive(Debug)]
pub struct SgdNesterov {
    vars: Vec<(candle_core::Var, Option<Tensor>)>,
    /// Learning rate.
    pub lr: f64,
    /// Momentum `mu`.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
}

impl SgdNesterov {
    /// An optimiser over `vars`.
    pub fn new(vars: Vec<candle_core::Var>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        SgdNesterov {
            vars: vars.into_iter().map(|v| (v, None)).collect(),
            lr,
            momentum,
            weight_decay,
        }
    }

    /// One step from the gradients of `loss`.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        for (var, velocity) in &mut self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if self.weight_decay != 0.0 {
                (g + (var.as_tensor() * self.weight_decay)?)?
            } else {
                g.clone()
            };
            let v = match velocity.take() {
                Some(v) => ((v * self.momentum)? + &g)?,
                None => g.clone(),
            };
            let update = (&g + (&v * self.momentum)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *velocity = Some(v);
        }
        Ok(())
    }
}

/// Rows of `x` scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(candle_core::D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// The contrastive loss of Hadsell, Chopra and LeCun (2006), the SimNet paper's Eq. 1, averaged
/// over pairs: `(1 - y) / 2 * D^2 + y / 2 * max(0, m - D)^2`, with `D` the Euclidean distance
/// between rows of `a` and `b` and `y = 1` for a dissimilar pair (as in the paper).
pub fn contrastive_loss(
    a: &Tensor,
    b: &Tensor,
    dissimilar: &Tensor,
    margin: f64,
) -> candle_core::Result<Tensor> {
    let d2 = (a - b)?.sqr()?.sum(candle_core::D::Minus1)?;
    let d = (&d2 + 1e-12)?.sqrt()?;
    let hinge = (d.neg()? + margin)?.relu()?.sqr()?;
    let y = dissimilar.to_dtype(DType::F32)?;
    let pos = ((y.ones_like()? - &y)? * &d2)?;
    let neg = (&y * hinge)?;
    ((pos + neg)? * 0.5)?.mean_all()
}

/// Max pooling with a `k x k` window, `stride` and `padding`, differentiable for every
/// window/stride combination: the fast kernel ([`crate::ops::max_pool2d`]) on CPU f32 tensors,
/// and otherwise plain tensor ops (candle's own max pool has no gradient when windows overlap),
/// where zero padding stands in for `-inf` padding (equal for non-negative inputs, after ReLU).
pub fn max_pool2d(
    x: &Tensor,
    k: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if crate::ops::fast_for(x) {
        return crate::ops::max_pool2d(x, k, stride, padding);
    }
    if k == stride && padding == 0 {
        return x.max_pool2d(k);
    }
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = ((h - k) / stride + 1, (w - k) / stride + 1);
    let mut out: Option<Tensor> = None;
    for dy in 0..k {
        for dx in 0..k {
            // Rows dy, dy + s, ..., dy + (oh - 1) s: take a span, pad to oh * s, fold, keep the first.
            let span_h = (oh - 1) * stride + 1;
            let span_w = (ow - 1) * stride + 1;
            let v = x
                .narrow(2, dy, span_h)?
                .narrow(3, dx, span_w)?
                .pad_with_zeros(2, 0, oh * stride - span_h)?
                .pad_with_zeros(3, 0, ow * stride - span_w)?
                .reshape((n, c, oh, stride, ow, stride))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, c, oh, ow))?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// Loads the parameters of `varmap` whose names start with `prefix` (for example `"deep."`)
/// from `tensors`, where each may be named with the prefix or without it (as torchvision names
/// a backbone's tensors). Every such parameter must be present with its shape; the error names
/// `what` (for example `"VGG16"`), the tensor and the expected shape.
pub fn load_prefixed(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    what: &str,
) -> Result<(), PluginError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let bare = &name[prefix.len()..];
        let want = var.dims();
        let t = tensors
            .get(name.as_str())
            .or_else(|| tensors.get(bare))
            .ok_or_else(|| {
                PluginError::Weights(format!(
                    "{what} weights lack {bare} (expected shape {want:?})"
                ))
            })?;
        if t.dims() != want {
            return Err(PluginError::Weights(format!(
                "{what} tensor {bare} has shape {:?}, expected {want:?}",
                t.dims()
            )));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_matches_candle_forward_and_has_a_gradient() {
        let x = Tensor::rand(0f32, 1f32, (2, 3, 9, 9), &Device::Cpu).unwrap();
        let ours = max_pool2d(&x, 3, 2, 0).unwrap();
        let theirs = x.max_pool2d_with_stride(3, 2).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let g = max_pool2d(v.as_tensor(), 3, 2, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(v.as_tensor()).is_some());
    }
}

/// A 2-D convolution layer that runs the fast kernels ([`crate::ops::conv2d`]) on CPU f32
/// tensors when groups = 1 and the `LOOKALIKE_OPS` switch allows it, and candle's `conv2d`
/// otherwise. Same parameter names as `candle_nn::conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv2d {
    /// The weight, O x C/groups x kh x kw.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.groups != 1 || !crate::ops::fast_for(x) {
            return self.inner.forward(x);
        }
        crate::ops::conv2d(
            x,
            self.inner.weight(),
            self.inner.bias(),
            self.stride,
            self.padding,
        )
    }
}

fn wrap(inner: candle_nn::Conv2d, cfg: candle_nn::Conv2dConfig) -> Conv2d {
    Conv2d {
        inner,
        stride: cfg.stride,
        padding: cfg.padding,
        groups: cfg.groups,
    }
}

/// [`Conv2d`] with a bias, initialised as `candle_nn::conv2d` (dilation must be 1).
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: candle_nn::Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Ok(wrap(candle_nn::conv2d(cin, cout, k, cfg, vb)?, cfg))
}

/// [`Conv2d`] without a bias, initialised as `candle_nn::conv2d_no_bias` (dilation must be 1).
pub fn conv2d_no_bias(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: candle_nn::Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Ok(wrap(candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)?, cfg))
}

/// Batch normalisation over N x C x ... inputs with `candle_nn::batch_norm`'s parameter names
/// (`weight`, `bias`, `running_mean`, `running_var`) and update rule, plus a fused activation.
/// On CPU f32 tensors it runs the fast kernels ([`crate::ops::batch_norm`]): statistics,
/// normalisation and activation in one op, and one op backward.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    inner: candle_nn::BatchNorm,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    weight: Tensor,
    bias: Tensor,
}

/// [`BatchNorm`] over `c` channels under `vb`, configured as `candle_nn::batch_norm`.
pub fn batch_norm<C: Into<candle_nn::BatchNormConfig>>(
    c: usize,
    config: C,
    vb: VarBuilder,
) -> candle_core::Result<BatchNorm> {
    let inner = candle_nn::batch_norm(c, config, vb)?;
    // Var::from_tensor shares storage with a variable (a VarMap-backed builder), so the
    // running statistics updated here are the ones candle's layer and the VarMap see.
    let running_mean = candle_core::Var::from_tensor(inner.running_mean())?;
    let running_var = candle_core::Var::from_tensor(inner.running_var())?;
    let (weight, bias) = match inner.weight_and_bias() {
        Some((w, b)) => (w.clone(), b.clone()),
        None => (
            Tensor::ones(c, DType::F32, &Device::Cpu)?,
            Tensor::zeros(c, DType::F32, &Device::Cpu)?,
        ),
    };
    Ok(BatchNorm {
        inner,
        running_mean,
        running_var,
        weight,
        bias,
    })
}

impl BatchNorm {
    /// Normalises `x` (batch statistics when `train`, updating the running ones; running
    /// statistics otherwise), then applies `act`.
    pub fn forward_act(
        &self,
        x: &Tensor,
        train: bool,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        if !crate::ops::fast_for(x) {
            let y = candle_core::ModuleT::forward_t(&self.inner, x, train)?;
            return match act {
                Activation::Identity => Ok(y),
                Activation::Relu => y.relu(),
                Activation::Relu6 => y.clamp(0f32, 6f32),
            };
        }
        let eps = self.inner.eps();
        if !train {
            let stats = Tensor::stack(
                &[self.running_mean.as_tensor(), self.running_var.as_tensor()],
                0,
            )?;
            return crate::ops::batch_norm(x, &self.weight, &self.bias, &stats, eps, act, false);
        }
        let stats = crate::ops::batch_stats(x)?;
        let m = self.inner.momentum();
        let count = (x.elem_count() / x.dim(1)?) as f64;
        let mean = stats.get(0)?;
        let var = stats.get(1)?;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var.set(
            &((self.running_var.as_tensor() * (1.0 - m))?
                + (var * (m * count / (count - 1.0).max(1.0)))?)?,
        )?;
        crate::ops::batch_norm(x, &self.weight, &self.bias, &stats, eps, act, true)
    }
}

impl candle_core::ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, Activation::Identity)
    }
}
