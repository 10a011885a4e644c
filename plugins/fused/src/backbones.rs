//! Backbones with torchvision's parameter names: ResNet50 (bottleneck v1.5) and VGG19, at full
//! or reduced width, and EfficientNet-Lite0. Each returns a globally average-pooled feature.

use lookalike_plugin::candle_core::{Module, Result as CResult, Tensor, D};
use lookalike_plugin::candle_nn::{Conv2dConfig, VarBuilder};
use lookalike_plugin::nn::{self, Vgg};
use lookalike_plugin::nn::{Activation, BatchNorm, Conv2d};

use crate::efficientnet::EfficientNetLite0;

/// Which backbone, and how wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackboneKind {
    /// ResNet with bottleneck blocks: `blocks` per stage (ResNet50: 3, 4, 6, 3) and base
    /// width `width` (ResNet50: 64; the stage outputs are 4, 8, 16, 32 times it).
    ResNet {
        /// Bottleneck blocks in each of the four stages.
        blocks: [usize; 4],
        /// Base width.
        width: usize,
    },
    /// VGG convolution stack (torchvision configuration with 0 = max pool).
    Vgg {
        /// The configuration (VGG19 is [`nn::VGG19`]).
        cfg: Vec<usize>,
    },
    /// EfficientNet-Lite0 (always full size; 1280-d).
    EfficientNetLite0,
}

impl BackboneKind {
    /// Full ResNet50.
    pub fn resnet50() -> Self {
        BackboneKind::ResNet {
            blocks: [3, 4, 6, 3],
            width: 64,
        }
    }

    /// Full VGG19.
    pub fn vgg19() -> Self {
        BackboneKind::Vgg {
            cfg: nn::VGG19.to_vec(),
        }
    }

    /// Width of the pooled feature.
    pub fn out_dim(&self) -> usize {
        match self {
            BackboneKind::ResNet { width, .. } => width * 32,
            BackboneKind::Vgg { cfg } => Vgg::out_channels(cfg),
            BackboneKind::EfficientNetLite0 => crate::efficientnet::FEATURES,
        }
    }

    /// Name prefix of its parameters in a fused model (and in a combined weights file).
    pub fn prefix(&self) -> &'static str {
        match self {
            BackboneKind::ResNet { .. } => "resnet50",
            BackboneKind::Vgg { .. } => "vgg19",
            BackboneKind::EfficientNetLite0 => "efficientnet",
        }
    }
}

#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        conv: VarBuilder,
        bn: VarBuilder,
    ) -> CResult<Self> {
        let cfg = Conv2dConfig {
            stride,
            padding,
            ..Default::default()
        };
        Ok(ConvBn {
            conv: nn::conv2d_no_bias(cin, cout, k, cfg, conv)?,
            bn: nn::batch_norm(cout, 1e-5, bn)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, act: Activation) -> CResult<Tensor> {
        self.bn.forward_act(&self.conv.forward(x)?, train, act)
    }
}

#[derive(Debug, Clone)]
struct Bottleneck {
    a: ConvBn,
    b: ConvBn,
    c: ConvBn,
    down: Option<ConvBn>,
}

impl Bottleneck {
    fn new(cin: usize, mid: usize, stride: usize, vb: VarBuilder) -> CResult<Self> {
        let out = mid * 4;
        let down = if stride != 1 || cin != out {
            Some(ConvBn::new(
                cin,
                out,
                1,
                stride,
                0,
                vb.pp("downsample.0"),
                vb.pp("downsample.1"),
            )?)
        } else {
            None
        };
        Ok(Bottleneck {
            a: ConvBn::new(cin, mid, 1, 1, 0, vb.pp("conv1"), vb.pp("bn1"))?,
            b: ConvBn::new(mid, mid, 3, stride, 1, vb.pp("conv2"), vb.pp("bn2"))?,
            c: ConvBn::new(mid, out, 1, 1, 0, vb.pp("conv3"), vb.pp("bn3"))?,
            down,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let h = self.a.forward(x, train, Activation::Relu)?;
        let h = self.b.forward(&h, train, Activation::Relu)?;
        let h = self.c.forward(&h, train, Activation::Identity)?;
        let skip = match &self.down {
            Some(d) => d.forward(x, train, Activation::Identity)?,
            None => x.clone(),
        };
        (h + skip)?.relu()
    }
}

/// ResNet with torchvision's names (`conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}`, ...).
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stages: Vec<Bottleneck>,
}

impl ResNet {
    /// Builds it under `vb`.
    pub fn new(blocks: [usize; 4], width: usize, vb: VarBuilder) -> CResult<Self> {
        let stem = ConvBn::new(3, width, 7, 2, 3, vb.pp("conv1"), vb.pp("bn1"))?;
        let mut stages = Vec::new();
        let mut cin = width;
        for (s, &n) in blocks.iter().enumerate() {
            let mid = width << s;
            for i in 0..n {
                let stride = if i == 0 && s > 0 { 2 } else { 1 };
                stages.push(Bottleneck::new(
                    cin,
                    mid,
                    stride,
                    vb.pp(format!("layer{}.{i}", s + 1)),
                )?);
                cin = mid * 4;
            }
        }
        Ok(ResNet { stem, stages })
    }

    /// The last feature map.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let h = self.stem.forward(x, train, Activation::Relu)?;
        // 3x3 max pool, stride 2, padding 1.
        let mut h = nn::max_pool2d(&h, 3, 2, 1)?;
        for b in &self.stages {
            h = b.forward(&h, train)?;
        }
        Ok(h)
    }
}

/// A built backbone.
#[derive(Debug, Clone)]
pub enum Backbone {
    /// ResNet.
    ResNet(ResNet),
    /// VGG.
    Vgg(Vgg),
    /// EfficientNet-Lite0.
    EfficientNet(Box<EfficientNetLite0>),
}

impl Backbone {
    /// Builds `kind` under `vb` (already prefixed).
    pub fn new(kind: &BackboneKind, vb: VarBuilder) -> CResult<Self> {
        Ok(match kind {
            BackboneKind::ResNet { blocks, width } => {
                Backbone::ResNet(ResNet::new(*blocks, *width, vb)?)
            }
            BackboneKind::Vgg { cfg } => Backbone::Vgg(Vgg::new(cfg, 3, false, vb.pp("features"))?),
            BackboneKind::EfficientNetLite0 => {
                Backbone::EfficientNet(Box::new(EfficientNetLite0::new(vb)?))
            }
        })
    }

    /// Globally average-pooled features, N x out_dim.
    pub fn pooled(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let map = match self {
            Backbone::ResNet(r) => r.forward_t(x, train)?,
            Backbone::Vgg(v) => v.forward_t(x, train)?,
            Backbone::EfficientNet(e) => e.feature_map(x, train)?,
        };
        map.mean(D::Minus1)?.mean(D::Minus1)
    }
}
