//! The fused Siamese extractor of *Siamese networks with fused ResNet50 and VGG19 features*
//! (the fused paper, sections 3.3-3.5): two backbones see the same image; their features are
//! joined by concatenation or averaging, pass through fully connected layers, and pairs are
//! compared by cosine similarity mapped to [0, 1]. Trained with the paper's loss over one
//! positive and N negatives (section 3.1): `max(0, max(S_neg) - S_pos + m)`, m = 1.
//!
//! Deviation, for CPU feasibility: each backbone's last feature map is globally average-pooled
//! (not flattened: ResNet50's flattened 7 x 7 map alone has 100,352 values), then projected to
//! a common width so that averaging is defined.

use std::collections::HashMap;

use lookalike_plugin::candle_core::{Module, Result as CResult, Tensor, Var, D};
use lookalike_plugin::candle_nn::{self, Linear, VarBuilder, VarMap};
use lookalike_plugin::{
    check_batch, nn, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
    Trainable, TrainingBatch,
};

use crate::backbones::{Backbone, BackboneKind};

/// The paper's margin `m`.
pub const MARGIN: f64 = 1.0;
/// Negatives per anchor in the paper's 21-branch batch (1 left, 1 positive, 19 + 1 ... right).
pub const NEGATIVES: usize = 20;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How the two backbones' features are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// `[a, b]`.
    Concat,
    /// `(a + b) / 2`.
    Average,
}

/// A fused network's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedConfig {
    /// Input side (square), ImageNet mean/std normalisation.
    pub side: usize,
    /// The two backbones.
    pub backbones: [BackboneKind; 2],
    /// Whether each backbone is expected to come with pretrained weights (and stays frozen in
    /// training).
    pub pretrained: [bool; 2],
    /// Concatenation or averaging.
    pub fusion: Fusion,
    /// Width each backbone's pooled feature is projected to before fusion.
    pub projection: usize,
    /// Fully connected layers after fusion; the last is the embedding.
    pub fc: Vec<usize>,
}

impl FusedConfig {
    /// Parses `preset[,avg]`: presets `paper` (ResNet50 + VGG19, 224 px), `cpu` (the same
    /// topology, reduced: ResNet with one bottleneck per stage at width 16, VGG19 at 1/8 width,
    /// 64 px) and `effnet` (pretrained EfficientNet-Lite0 + the reduced ResNet, 224 px).
    pub fn preset(config: &str) -> Result<Self, PluginError> {
        let mut parts = config.split(',').map(str::trim);
        let name = parts.next().unwrap_or("");
        let mut fusion = Fusion::Concat;
        for p in parts {
            match p {
                "avg" | "average" => fusion = Fusion::Average,
                "concat" => fusion = Fusion::Concat,
                other => return Err(unknown(other)),
            }
        }
        let small_resnet = BackboneKind::ResNet {
            blocks: [1, 1, 1, 1],
            width: 16,
        };
        let mut cfg = match name {
            "paper" => FusedConfig {
                side: 224,
                backbones: [BackboneKind::resnet50(), BackboneKind::vgg19()],
                pretrained: [true, true],
                fusion,
                projection: 512,
                fc: vec![512, 256],
            },
            "" | "cpu" => FusedConfig {
                side: 64,
                backbones: [
                    small_resnet,
                    BackboneKind::Vgg {
                        cfg: nn::VGG19.iter().map(|c| c / 8).collect(),
                    },
                ],
                pretrained: [false, false],
                fusion,
                projection: 128,
                fc: vec![128, 64],
            },
            "effnet" => FusedConfig {
                side: 224,
                backbones: [BackboneKind::EfficientNetLite0, small_resnet],
                pretrained: [true, false],
                fusion,
                projection: 256,
                fc: vec![256, 128],
            },
            other => return Err(unknown(other)),
        };
        cfg.fusion = fusion;
        Ok(cfg)
    }

    /// The input declaration (ImageNet mean/std).
    pub fn input(&self) -> InputSpec {
        InputSpec::rgb(self.side as u32, self.side as u32).normalised(&IMAGENET_MEAN, &IMAGENET_STD)
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.fc.last().copied().unwrap_or(self.projection)
    }
}

fn unknown(config: &str) -> PluginError {
    PluginError::UnknownConfig {
        config: config.into(),
        known: "paper, cpu, effnet, each optionally followed by ,avg (averaging) or ,concat".into(),
    }
}

/// The fused network.
#[derive(Debug, Clone)]
pub struct Fused {
    cfg: FusedConfig,
    backbones: [Backbone; 2],
    projections: [Linear; 2],
    fc: Vec<Linear>,
    /// Dropout masks while training (seeded by `Trainable::reseed`).
    rng: nn::TrainRng,
}

impl Fused {
    /// Builds it: backbones under their prefixes (`resnet50.`, `vgg19.`, `efficientnet.`), the
    /// rest under `head.`.
    pub fn new(cfg: &FusedConfig, vb: VarBuilder) -> CResult<Self> {
        let head = vb.pp("head");
        let mut backbones = Vec::new();
        let mut projections = Vec::new();
        for (i, kind) in cfg.backbones.iter().enumerate() {
            backbones.push(Backbone::new(kind, vb.pp(kind.prefix()))?);
            projections.push(candle_nn::linear(
                kind.out_dim(),
                cfg.projection,
                head.pp(format!("proj{i}")),
            )?);
        }
        let mut width = match cfg.fusion {
            Fusion::Concat => 2 * cfg.projection,
            Fusion::Average => cfg.projection,
        };
        let mut fc = Vec::new();
        for (i, &w) in cfg.fc.iter().enumerate() {
            fc.push(candle_nn::linear(width, w, head.pp(format!("fc{i}")))?);
            width = w;
        }
        let [b0, b1]: [Backbone; 2] = backbones
            .try_into()
            .map_err(|_| lookalike_plugin::candle_core::Error::Msg("two backbones".into()))?;
        let [p0, p1]: [Linear; 2] = projections
            .try_into()
            .map_err(|_| lookalike_plugin::candle_core::Error::Msg("two projections".into()))?;
        Ok(Fused {
            cfg: cfg.clone(),
            backbones: [b0, b1],
            projections: [p0, p1],
            fc,
            rng: nn::TrainRng::default(),
        })
    }

    /// L2-normalised embeddings, N x dim.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let mut feats = Vec::with_capacity(2);
        for ((b, p), kind) in self
            .backbones
            .iter()
            .zip(&self.projections)
            .zip(&self.cfg.backbones)
        {
            let input = if *kind == BackboneKind::EfficientNetLite0 {
                imagenet_to_tflite(x)?
            } else {
                x.clone()
            };
            feats.push(p.forward(&b.pooled(&input, train)?)?);
        }
        let mut h = match self.cfg.fusion {
            Fusion::Concat => Tensor::cat(&feats, 1)?,
            Fusion::Average => ((&feats[0] + &feats[1])? * 0.5)?,
        };
        for l in &self.fc {
            h = h.relu()?;
            if train {
                h = nn::dropout(&h, 0.2, &self.rng)?;
            }
            h = l.forward(&h)?;
        }
        nn::l2_normalize(&h)
    }
}

/// Re-normalises ImageNet mean/std input to EfficientNet-Lite's `(pixel - 127) / 128`.
fn imagenet_to_tflite(x: &Tensor) -> CResult<Tensor> {
    let dev = x.device();
    let std = Tensor::new(&IMAGENET_STD, dev)?.reshape((1, 3, 1, 1))?;
    let mean = Tensor::new(&IMAGENET_MEAN, dev)?.reshape((1, 3, 1, 1))?;
    let raw = x.broadcast_mul(&std)?.broadcast_add(&mean)?;
    (raw - 127.0 / 255.0)? / (128.0 / 255.0)
}

/// Cosine similarity of unit rows mapped to [0, 1]: `(cos + 1) / 2`.
pub fn similarity(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    ((a * b)?.sum(D::Minus1)? + 1.0)? * 0.5
}

/// The paper's loss: mean over anchors of `max(0, max_k S(anchor, neg_k) - S(anchor, pos) + m)`.
pub fn one_vs_many_loss(
    anchor: &Tensor,
    positive: &Tensor,
    negatives: &Tensor,
    margin: f64,
) -> CResult<Tensor> {
    let s_pos = similarity(anchor, positive)?;
    let s_neg = similarity(
        &anchor.unsqueeze(1)?.broadcast_as(negatives.shape())?,
        negatives,
    )?;
    let hardest = s_neg.max(D::Minus1)?;
    ((hardest - s_pos)? + margin)?.relu()?.mean_all()
}

/// Loads weights into `varmap`: a full restore when `bytes` holds the head (`head.*`, as saved
/// by this plugin); otherwise pretrained backbones, from tensors named with the backbone's
/// prefix or unprefixed as torchvision (or the EfficientNet package) names them, so that a
/// union of torchvision's ResNet50 and VGG19 state dicts loads as it is.
pub fn load_weights(cfg: &FusedConfig, varmap: &VarMap, bytes: &[u8]) -> Result<(), PluginError> {
    let tensors: HashMap<String, Tensor> = nn::read_safetensors(bytes)?;
    if tensors.keys().any(|k| k.starts_with("head.")) {
        return nn::load_prefixed(varmap, &tensors, "", "the");
    }
    for (kind, pretrained) in cfg.backbones.iter().zip(cfg.pretrained) {
        if pretrained {
            let prefix = format!("{}.", kind.prefix());
            nn::load_prefixed(
                varmap,
                &tensors,
                &prefix,
                &format!("pretrained {}", kind.prefix()),
            )?;
        }
    }
    Ok(())
}

/// A fused network for inference.
pub struct FusedExtractor {
    net: Fused,
    cfg: FusedConfig,
    weights: Vec<u8>,
}

impl std::fmt::Debug for FusedExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedExtractor")
            .field("dim", &self.cfg.dim())
            .finish_non_exhaustive()
    }
}

impl Extractor for FusedExtractor {
    fn name(&self) -> &str {
        "fused"
    }

    fn spec(&self) -> ExtractorSpec {
        ExtractorSpec {
            input: self.cfg.input(),
            dim: self.cfg.dim(),
            metric: Metric::Cosine,
        }
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        check_batch(batch, &self.cfg.input())?;
        Ok(self.net.forward_t(batch, false)?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(self.weights.clone())
    }
}

/// A fused network being trained. Pretrained backbones stay frozen: only the head (and
/// backbones trained from scratch) are in [`Trainable::vars`].
pub struct FusedTrainable {
    net: Fused,
    cfg: FusedConfig,
    varmap: VarMap,
}

impl std::fmt::Debug for FusedTrainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedTrainable")
            .field("dim", &self.cfg.dim())
            .finish_non_exhaustive()
    }
}

impl FusedTrainable {
    /// Fresh, or from weights (see [`load_weights`]). A preset with a pretrained backbone
    /// needs weights.
    pub fn new(cfg: &FusedConfig, weights: Option<&[u8]>) -> Result<Self, PluginError> {
        let (varmap, vb) = nn::new_varmap();
        let net = Fused::new(cfg, vb)?;
        match weights {
            Some(w) => load_weights(cfg, &varmap, w)?,
            None if cfg.pretrained.iter().any(|p| *p) => {
                return Err(PluginError::Weights(format!(
                    "this preset fuses pretrained backbones ({}): give their weights \
                     (torchvision names; see docs/plugins.md)",
                    cfg.backbones
                        .iter()
                        .zip(cfg.pretrained)
                        .filter(|(_, p)| *p)
                        .map(|(b, _)| b.prefix())
                        .collect::<Vec<_>>()
                        .join(" + ")
                )))
            }
            None => {}
        }
        Ok(FusedTrainable {
            net,
            cfg: cfg.clone(),
            varmap,
        })
    }

    /// The parameter map.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

impl Trainable for FusedTrainable {
    fn forward_train(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        check_batch(batch, &self.cfg.input())?;
        Ok(self.net.forward_t(batch, true)?)
    }

    fn loss(&self, batch: TrainingBatch<'_>) -> Result<Tensor, PluginError> {
        Ok(match batch {
            TrainingBatch::OneVsMany {
                anchor,
                positive,
                negatives,
            } => one_vs_many_loss(anchor, positive, negatives, MARGIN)?,
            TrainingBatch::Pairs { a, b, dissimilar } => {
                nn::contrastive_loss(a, b, dissimilar, MARGIN)?
            }
            TrainingBatch::Labelled { embeddings, labels } => {
                nn::supcon_loss(embeddings, labels, nn::SUPCON_TEMPERATURE)?
            }
            other => {
                return Err(PluginError::UnsupportedBatch {
                    got: other.kind(),
                    takes: "one-vs-many, pairs, labelled".into(),
                })
            }
        })
    }

    fn vars(&self) -> Vec<Var> {
        let frozen: Vec<String> = self
            .cfg
            .backbones
            .iter()
            .zip(self.cfg.pretrained)
            .filter(|(_, p)| *p)
            .map(|(b, _)| format!("{}.", b.prefix()))
            .collect();
        nn::sorted_vars(&self.varmap, &frozen)
    }

    fn reseed(&self, seed: u64) {
        self.net.rng.reseed(seed);
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.varmap)
    }

    fn freeze(&self) -> Result<Box<dyn Extractor>, PluginError> {
        let weights = self.save_weights()?;
        let net = Fused::new(&self.cfg, nn::frozen_builder(&self.varmap)?)?;
        Ok(Box::new(FusedExtractor {
            net,
            cfg: self.cfg.clone(),
            weights,
        }))
    }
}

/// Registered as `"fused"`; configurations `cpu` (default), `paper`, `effnet`, optionally
/// `,avg`.
#[derive(Debug, Default)]
pub struct FusedPlugin;

impl ExtractorPlugin for FusedPlugin {
    fn name(&self) -> &str {
        "fused"
    }

    fn build(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError> {
        FusedTrainable::new(&FusedConfig::preset(config)?, weights)?.freeze()
    }

    fn trainable(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn Trainable>, PluginError>> {
        Some(
            FusedConfig::preset(config)
                .and_then(|c| FusedTrainable::new(&c, weights))
                .map(|t| Box::new(t) as Box<dyn Trainable>),
        )
    }
}
