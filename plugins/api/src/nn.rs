//! Helpers for plugins whose weights live in a candle-nn [`VarMap`] (feature `nn`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub use crate::ops::Activation;
use crate::PluginError;

/// A fresh `VarMap` and a builder over it (f32, CPU): build the model with the builder, and the
/// map holds every parameter under its `vb.pp(..)` name. Inside [`with_init_seed`] the random
/// initial values are drawn from that seed (and each parameter's name), so the same seed gives
/// the same initial model; otherwise from candle's generator.
pub fn new_varmap() -> (VarMap, VarBuilder<'static>) {
    let varmap = VarMap::new();
    let vb = match INIT_SEED.with(|s| s.get()) {
        Some(seed) => VarBuilder::from_backend(
            Box::new(SeededVarMap {
                varmap: varmap.clone(),
                seed,
            }),
            DType::F32,
            Device::Cpu,
        ),
        None => VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    };
    (varmap, vb)
}

thread_local! {
    static INIT_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`new_varmap`] drawing initial parameters from `seed` on this thread. The
/// training jobs build trainable models inside it (candle's CPU generator cannot be seeded).
pub fn with_init_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let old = INIT_SEED.with(|s| s.replace(Some(seed)));
    let out = f();
    INIT_SEED.with(|s| s.set(old));
    out
}

/// A `VarMap` backend whose new variables are initialised from a seed.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the parameter map is poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} against {s:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        // FNV-1a of the name, mixed with the seed: each parameter its own stream.
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let rng = TrainRng::default();
        rng.reseed(self.seed ^ hash);
        let n = s.elem_count();
        let uniform = |lo: f64, up: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (lo + (up - lo) * rng.unit()) as f32)
                .collect()
        };
        let normal = |mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u1 = rng.unit().max(f64::MIN_POSITIVE);
                    let u2 = rng.unit();
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (mean + std * z) as f32
                })
                .collect()
        };
        let values = match h {
            candle_nn::Init::Const(c) => vec![c as f32; n],
            candle_nn::Init::Uniform { lo, up } => uniform(lo, up),
            candle_nn::Init::Randn { mean, stdev } => normal(mean, stdev),
            candle_nn::Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(-bound, bound)
                    }
                    candle_nn::init::NormalOrUniform::Normal => normal(0.0, std),
                }
            }
        };
        let var =
            candle_core::Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: a VarMap creates parameters through `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
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

pub use crate::optim::{Adam, Optimiser, SgdNesterov};

/// A seedable random source for a model's training-time randomness (dropout masks), shared by
/// its layers. [`crate::Trainable::reseed`] sets it before every step, so that a resumed
/// training job draws the same masks as an uninterrupted one (candle's CPU generator cannot be
/// seeded).
#[derive(Debug, Clone, Default)]
pub struct TrainRng(std::sync::Arc<std::sync::Mutex<u64>>);

impl TrainRng {
    /// Restarts the sequence from `seed`.
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut s) = self.0.lock() {
            *s = seed;
        }
    }

    /// A source that starts from `seed`.
    pub fn seeded(seed: u64) -> Self {
        TrainRng(std::sync::Arc::new(std::sync::Mutex::new(seed)))
    }

    /// A tensor of values uniform in `[lo, hi)`, drawn from this source (a seeded stand-in
    /// for `Tensor::rand`, whose CPU generator cannot be seeded).
    pub fn rand(
        &self,
        lo: f32,
        hi: f32,
        shape: impl Into<candle_core::Shape>,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(shape.into(), device, || lo + (hi - lo) * self.unit() as f32)
    }

    /// A tensor of normal values with `mean` and `std` (Box-Muller), drawn from this source.
    pub fn randn(
        &self,
        mean: f32,
        std: f32,
        shape: impl Into<candle_core::Shape>,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(shape.into(), device, || {
            let u1 = self.unit().max(f64::MIN_POSITIVE);
            let u2 = self.unit();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            mean + std * z as f32
        })
    }

    /// A tensor of `shape` filled by `draw`, element by element.
    fn tensor(
        &self,
        shape: candle_core::Shape,
        device: &candle_core::Device,
        draw: impl FnMut() -> f32,
    ) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = std::iter::repeat_with(draw)
            .take(shape.elem_count())
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// A uniform value in [0, 1).
    fn unit(&self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next 64 random bits (SplitMix64).
    fn next(&self) -> u64 {
        let mut s = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Inverted dropout with drop probability `p`, its mask drawn from `rng`.
pub fn dropout(x: &Tensor, p: f32, rng: &TrainRng) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
            if u >= p {
                keep
            } else {
                0.0
            }
        })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

/// The variables of `varmap` in name order, leaving out those under any of `skip` (name
/// prefixes): the stable order [`crate::Trainable::vars`] promises.
pub fn sorted_vars(varmap: &VarMap, skip: &[String]) -> Vec<candle_core::Var> {
    let data = match varmap.data().lock() {
        Ok(d) => d,
        Err(p) => p.into_inner(),
    };
    let mut named: Vec<(&String, &candle_core::Var)> = data
        .iter()
        .filter(|(k, _)| !skip.iter().any(|s| k.starts_with(s.as_str())))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
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

/// `x` (`N x C x H x W`) mirrored left to right: each row of each plane reversed.
pub fn flip_horizontal(x: &Tensor) -> candle_core::Result<Tensor> {
    let w = x.dim(3)?;
    let reversed: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::new(reversed.as_slice(), x.device())?, 3)
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

/// The temperature of [`supcon_loss`] in the built-in plugins: Khosla et al.'s 0.1.
pub const SUPCON_TEMPERATURE: f64 = 0.1;

/// The supervised contrastive loss of Khosla et al. (2020, Eq. 2, "L_out"), over every pair of
/// a labelled batch: each row's cosine similarities to the other rows, divided by
/// `temperature`, go through a softmax, and the loss is the mean negative log-probability of
/// the rows that share its label. Rows are L2-normalised here; rows without a positive in the
/// batch count only through the other rows' denominators. `labels` holds N integer labels
/// (u32 or i64), `embeddings` is N x D.
pub fn supcon_loss(
    embeddings: &Tensor,
    labels: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let n = embeddings.dim(0)?;
    let dev = embeddings.device();
    let z = l2_normalize(embeddings)?;
    let labels = labels.to_dtype(DType::F32)?;
    let same = labels
        .reshape((n, 1))?
        .broadcast_eq(&labels.reshape((1, n))?)?
        .to_dtype(DType::F32)?;
    let eye = Tensor::eye(n, DType::F32, dev)?;
    let positive = (same - &eye)?;
    // |s| <= 1 / temperature, so the exponentials cannot overflow for any sane temperature;
    // the diagonal is pushed far down so that a row never counts itself.
    let s = ((z.matmul(&z.t()?)? / temperature)? - (eye * 1e4)?)?;
    let log_denominator = s.exp()?.sum_keepdim(1)?.log()?;
    let log_p = s.broadcast_sub(&log_denominator)?;
    let count = positive.sum_keepdim(1)?;
    let has_positive = count.gt(0f64)?.to_dtype(DType::F32)?;
    let per_row = ((&log_p * &positive)?.sum_keepdim(1)? / count.clamp(1f32, f32::MAX)?)?;
    let rows = has_positive.sum_all()?.clamp(1f32, f32::MAX)?;
    ((per_row * has_positive)?.sum_all()? / rows)?.neg()
}

/// The temperature of [`proxy_loss`] in the training jobs: Zhai and Wu's 0.05.
pub const PROXY_TEMPERATURE: f64 = 0.05;

/// The normalised-softmax proxy loss (Zhai and Wu, *Classification is a Strong Baseline for
/// Deep Metric Learning*, BMVC 2019): one learned proxy per label (`proxies`, L x D); each
/// row's cosine similarities to the proxies, divided by `temperature`, go through a softmax,
/// and the loss is the mean negative log-probability of the row's own label's proxy. Rows and
/// proxies are L2-normalised here. `labels` holds N integer labels (u32 or i64) below L,
/// `embeddings` is N x D. Every row is pulled towards its label's proxy and away from all the
/// others at every step, which teaches faster than pairs within one batch alone.
pub fn proxy_loss(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let logits = (l2_normalize(embeddings)?.matmul(&l2_normalize(proxies)?.t()?)? / temperature)?;
    candle_nn::loss::cross_entropy(&logits, &labels.to_dtype(DType::U32)?)
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

/// A fingerprint of the parameters in `varmap`, except those whose names start with `skip`
/// (a trained head beside a frozen backbone, say): their names, shapes and values, hashed in
/// name order. Maps with the same such parameters have the same fingerprint within one
/// process (the hash is not stable across Rust versions: never store it).
pub fn fingerprint(varmap: &VarMap, skip: Option<&str>) -> Result<crate::FeaturesId, PluginError> {
    use std::hash::{Hash, Hasher};
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| skip.is_none_or(|p| !k.starts_with(p)))
        .collect();
    names.sort();
    let mut h = std::hash::DefaultHasher::new();
    for name in names {
        let t = data[name].as_tensor();
        name.hash(&mut h);
        t.dims().hash(&mut h);
        let values = t
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())?;
        for chunk in values.chunks(4096) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.write(&bytes);
        }
    }
    Ok(crate::FeaturesId(h.finish()))
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
    fn flip_horizontal_reverses_rows_only() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 3))
            .unwrap();
        let f = flip_horizontal(&x).unwrap();
        assert_eq!(
            f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.]
        );
        let back = flip_horizontal(&f).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn supcon_matches_a_direct_computation() {
        let rng = TrainRng::seeded(3);
        let x = rng.randn(0f32, 1f32, (6, 4), &Device::Cpu).unwrap();
        // Label 7 has no positive: it only appears in the others' denominators.
        let labels = [1u32, 2, 1, 2, 2, 7];
        let t = Tensor::new(&labels[..], &Device::Cpu).unwrap();
        let ours = supcon_loss(&x, &t, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let z = l2_normalize(&x).unwrap().to_vec2::<f32>().unwrap();
        let dot = |i: usize, j: usize| -> f64 { (0..4).map(|k| (z[i][k] * z[j][k]) as f64).sum() };
        let (mut total, mut rows) = (0f64, 0f64);
        for i in 0..6 {
            let denom: f64 = (0..6)
                .filter(|j| *j != i)
                .map(|j| (dot(i, j) / 0.5).exp())
                .sum();
            let pos: Vec<usize> = (0..6)
                .filter(|j| *j != i && labels[*j] == labels[i])
                .collect();
            if pos.is_empty() {
                continue;
            }
            let l: f64 = pos
                .iter()
                .map(|j| -((dot(i, *j) / 0.5).exp() / denom).ln())
                .sum();
            total += l / pos.len() as f64;
            rows += 1.0;
        }
        let direct = total / rows;
        assert!((ours as f64 - direct).abs() < 1e-5, "{ours} vs {direct}");
    }

    #[test]
    fn proxy_loss_matches_a_direct_computation_and_pulls_rows_to_their_proxy() {
        let rng = TrainRng::seeded(5);
        let x = rng.randn(0f32, 1f32, (5, 4), &Device::Cpu).unwrap();
        let p = rng.randn(0f32, 1f32, (3, 4), &Device::Cpu).unwrap();
        let labels = [0u32, 2, 1, 2, 0];
        let t = Tensor::new(&labels[..], &Device::Cpu).unwrap();
        let ours = proxy_loss(&x, &t, &p, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let zx = l2_normalize(&x).unwrap().to_vec2::<f32>().unwrap();
        let zp = l2_normalize(&p).unwrap().to_vec2::<f32>().unwrap();
        let dot =
            |i: usize, c: usize| -> f64 { (0..4).map(|k| (zx[i][k] * zp[c][k]) as f64).sum() };
        let direct: f64 = (0..5)
            .map(|i| {
                let denom: f64 = (0..3).map(|c| (dot(i, c) / 0.5).exp()).sum();
                -((dot(i, labels[i] as usize) / 0.5).exp() / denom).ln()
            })
            .sum::<f64>()
            / 5.0;
        assert!((ours as f64 - direct).abs() < 1e-5, "{ours} vs {direct}");
        // Rows equal to their own label's proxy score better than rows at another's.
        let rows = |ls: &[u32]| {
            let idx = Tensor::new(ls, &Device::Cpu).unwrap();
            p.index_select(&idx, 0).unwrap()
        };
        let at_own = proxy_loss(&rows(&labels), &t, &p, 0.5).unwrap();
        let at_other = proxy_loss(&rows(&[1, 0, 2, 0, 1]), &t, &p, 0.5).unwrap();
        assert!(
            at_own.to_scalar::<f32>().unwrap() < at_other.to_scalar::<f32>().unwrap(),
            "the loss must fall as rows move to their proxies"
        );
    }

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
