//! # lookalike-simnet: the multi-scale Siamese CNN of SimNet
//!
//! Appalaraju and Chaoji, *Image similarity using Deep CNN and Curriculum Learning* (GHCI 2017),
//! Fig. 5: a deep VGG-style branch on the full image and two shallow branches on down-sampled
//! copies; each branch's embedding is L2-normalised, the three are joined by a linear embedding
//! layer (with dropout) and the result is L2-normalised. Trained Siamese-style (shared weights)
//! with the contrastive loss of Eq. 1 (margin 1, Euclidean distance).
//!
//! Three presets, one code path ([`SimNetConfig`]):
//!
//! | preset | input | deep branch | shallow branches | joint |
//! |---|---|---|---|---|
//! | `paper` | 3 x 224 x 224, ImageNet mean/std | VGG16 conv stack + fc6/fc7, 4096-d | 4x and 8x down-sampled, conv 96 8x8/4, 512-d and 1024-d | 4096-d |
//! | `cpu` (default) | 3 x 32 x 32, [-1, 1] | VGG-BN `32,32,M,64,64,M,128,M` + fc, 256-d | 2x and 4x down-sampled, conv 32 3x3, 64-d each | 128-d |
//! | `cpu-gray` | 1 x 28 x 28, [-1, 1] | VGG-BN `32,32,M,64,64,M,192,M` + fc, 512-d | as `cpu` | 128-d, flip-averaged |
//!
//! The deep branch of `paper` uses torchvision's VGG16 names under `deep.` (`deep.features.0.weight`,
//! `deep.classifier.0.weight`, ...): [`load_torchvision_vgg16`] loads ImageNet weights into it.

#![deny(missing_docs)]

use lookalike_plugin::candle_core::{Module, Result as CResult, Tensor, Var};
use lookalike_plugin::candle_nn::{self, Linear, VarBuilder, VarMap};
use lookalike_plugin::nn::{self, Vgg};
use lookalike_plugin::{
    check_batch, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
    Trainable, TrainingBatch,
};

/// The contrastive loss margin `m` of Eq. 1.
pub const MARGIN: f64 = 1.0;

/// The temperature of the supervised contrastive loss on labelled batches (the `supcon`
/// miner): 0.1, Khosla et al.'s value, which also beat the contrastive loss in a 3-minute
/// Fashion-MNIST probe (`benches/objectives.rs`: accuracy@1 88.4 % against 84.7 %).
pub const TEMPERATURE: f64 = nn::SUPCON_TEMPERATURE;

/// A shallow branch: the input average-pooled by `factor`, one convolution, ReLU, max pool,
/// a linear layer to `dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShallowConfig {
    /// Down-sampling factor of the input.
    pub factor: usize,
    /// Convolution filters.
    pub channels: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Convolution stride.
    pub stride: usize,
    /// Zero padding.
    pub padding: usize,
    /// Max-pool kernel (stride 2).
    pub pool: usize,
    /// Embedding width.
    pub dim: usize,
}

/// Everything that differs between the presets.
#[derive(Debug, Clone, PartialEq)]
pub struct SimNetConfig {
    /// Input side (square).
    pub side: usize,
    /// Per-channel mean and std of the input normalisation: one value per input channel (three
    /// for RGB, one for grey), so their length is the input's channel count.
    pub mean: Vec<f32>,
    /// See `mean`.
    pub std: Vec<f32>,
    /// VGG configuration of the deep branch's convolutions (0 = max pool).
    pub deep_cfg: Vec<usize>,
    /// Batch norm after each deep convolution.
    pub deep_batch_norm: bool,
    /// Widths of the deep branch's fully connected layers; the last is its embedding.
    pub deep_fc: Vec<usize>,
    /// The two shallow branches.
    pub shallow: [ShallowConfig; 2],
    /// Width of the joint embedding.
    pub embed_dim: usize,
    /// Dropout before the joint embedding layer (training only).
    pub dropout: f32,
    /// Embed each image and its mirror image and return their normalised sum (test-time flip
    /// averaging): twice the work per embedding, for a network trained with flips.
    pub flip_average: bool,
}

impl SimNetConfig {
    /// The paper's network: VGG16 at 224 px, 4096-d.
    pub fn paper() -> Self {
        SimNetConfig {
            side: 224,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            deep_cfg: nn::VGG16.to_vec(),
            deep_batch_norm: false,
            deep_fc: vec![4096, 4096],
            shallow: [
                ShallowConfig {
                    factor: 4,
                    channels: 96,
                    kernel: 8,
                    stride: 4,
                    padding: 2,
                    pool: 3,
                    dim: 512,
                },
                ShallowConfig {
                    factor: 8,
                    channels: 96,
                    kernel: 8,
                    stride: 4,
                    padding: 2,
                    pool: 3,
                    dim: 1024,
                },
            ],
            embed_dim: 4096,
            dropout: 0.5,
            flip_average: false,
        }
    }

    /// A network that trains in minutes on 2 CPU cores: 32 px, 128-d.
    pub fn cpu() -> Self {
        SimNetConfig {
            side: 32,
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
            deep_cfg: vec![32, 32, 0, 64, 64, 0, 128, 0],
            deep_batch_norm: true,
            deep_fc: vec![256],
            shallow: [
                ShallowConfig {
                    factor: 2,
                    channels: 32,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                    pool: 2,
                    dim: 64,
                },
                ShallowConfig {
                    factor: 4,
                    channels: 32,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                    pool: 2,
                    dim: 64,
                },
            ],
            embed_dim: 128,
            // No dropout before the joint layer: with 0.25 a 300-step Fashion-MNIST probe
            // left nearest-neighbour accuracy where it started (0.800 -> 0.800); without, it
            // learned (0.798 -> 0.834). The paper's 0.5 is for days of training.
            dropout: 0.0,
            flip_average: false,
        }
    }

    /// A network for greyscale images at 28 px (Fashion-MNIST, MNIST): 1 x 28 x 28 input, so
    /// no resize to 32 px and a third of the first convolution's work, spent instead on a
    /// wider last convolution (192 filters) and fully connected layer (512), and embeddings
    /// averaged over the image and its mirror image (`flip_average`). On Fashion-MNIST it
    /// trains 1.2x as many images per second as `cpu` and reached 93.24 % accuracy@1 in the
    /// 15-minute job (docs/benchmarks.md). Colour images are turned grey on the way in.
    pub fn cpu_gray() -> Self {
        SimNetConfig {
            side: 28,
            mean: vec![0.5],
            std: vec![0.5],
            deep_cfg: vec![32, 32, 0, 64, 64, 0, 192, 0],
            deep_fc: vec![512],
            flip_average: true,
            ..Self::cpu()
        }
    }

    /// The preset named `config` (`""` is `cpu`).
    pub fn preset(config: &str) -> Result<Self, PluginError> {
        match config {
            "" | "cpu" => Ok(Self::cpu()),
            "cpu-gray" => Ok(Self::cpu_gray()),
            "paper" => Ok(Self::paper()),
            other => Err(PluginError::UnknownConfig {
                config: other.into(),
                known: "cpu, cpu-gray, paper".into(),
            }),
        }
    }

    /// Input channels: the length of `mean` (3 for RGB, 1 for grey).
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// The input declaration.
    pub fn input(&self) -> InputSpec {
        let side = self.side as u32;
        let input = if self.channels() == 1 {
            InputSpec::luma(side, side)
        } else {
            InputSpec::rgb(side, side)
        };
        input.normalised(&self.mean, &self.std)
    }
}

#[derive(Debug, Clone)]
struct Shallow {
    conv: nn::Conv2d,
    fc: Linear,
    cfg: ShallowConfig,
}

impl Shallow {
    fn new(cfg: &ShallowConfig, channels: usize, side: usize, vb: VarBuilder) -> CResult<Self> {
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: cfg.padding,
            stride: cfg.stride,
            ..Default::default()
        };
        let conv = nn::conv2d(channels, cfg.channels, cfg.kernel, conv_cfg, vb.pp("conv"))?;
        let s = side / cfg.factor;
        let c = (s + 2 * cfg.padding - cfg.kernel) / cfg.stride + 1;
        let p = (c - cfg.pool) / 2 + 1;
        let fc = candle_nn::linear(cfg.channels * p * p, cfg.dim, vb.pp("fc"))?;
        Ok(Shallow {
            conv,
            fc,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let x = if self.cfg.factor > 1 {
            x.avg_pool2d(self.cfg.factor)?
        } else {
            x.clone()
        };
        let h = self.conv.forward(&x)?.relu()?;
        let h = nn::max_pool2d(&h, self.cfg.pool, 2, 0)?;
        self.fc.forward(&h.flatten_from(1)?)
    }
}

/// The multi-scale network.
#[derive(Debug, Clone)]
pub struct SimNet {
    cfg: SimNetConfig,
    deep: Vgg,
    deep_fc: Vec<Linear>,
    shallow: [Shallow; 2],
    joint: Linear,
    /// Dropout masks while training (seeded by `Trainable::reseed`).
    rng: nn::TrainRng,
}

impl SimNet {
    /// Builds the network under `vb` (names: `deep.features.*`, `deep.classifier.*`,
    /// `shallow1.*`, `shallow2.*`, `joint.*`).
    pub fn new(cfg: &SimNetConfig, vb: VarBuilder) -> CResult<Self> {
        let deep = Vgg::new(
            &cfg.deep_cfg,
            cfg.channels(),
            cfg.deep_batch_norm,
            vb.pp("deep").pp("features"),
        )?;
        let pools = cfg.deep_cfg.iter().filter(|c| **c == 0).count();
        let s = cfg.side >> pools;
        let mut width = Vgg::out_channels(&cfg.deep_cfg) * s * s;
        let mut deep_fc = Vec::new();
        for (i, &w) in cfg.deep_fc.iter().enumerate() {
            // torchvision's classifier indices: Linear, ReLU, Dropout -> 0, 3, 6.
            deep_fc.push(candle_nn::linear(
                width,
                w,
                vb.pp("deep").pp("classifier").pp((3 * i).to_string()),
            )?);
            width = w;
        }
        let shallow = [
            Shallow::new(&cfg.shallow[0], cfg.channels(), cfg.side, vb.pp("shallow1"))?,
            Shallow::new(&cfg.shallow[1], cfg.channels(), cfg.side, vb.pp("shallow2"))?,
        ];
        let joint_in = width + cfg.shallow[0].dim + cfg.shallow[1].dim;
        let joint = candle_nn::linear(joint_in, cfg.embed_dim, vb.pp("joint"))?;
        Ok(SimNet {
            cfg: cfg.clone(),
            deep,
            deep_fc,
            shallow,
            joint,
            rng: nn::TrainRng::default(),
        })
    }

    /// Embeds `x` (N x channels x side x side): N x embed_dim, L2-normalised.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let mut d = self.deep.forward_t(x, train)?.flatten_from(1)?;
        for (i, fc) in self.deep_fc.iter().enumerate() {
            d = fc.forward(&d)?;
            if i + 1 < self.deep_fc.len() {
                d = d.relu()?;
                if train {
                    d = nn::dropout(&d, 0.5, &self.rng)?;
                }
            }
        }
        let parts = [
            nn::l2_normalize(&d)?,
            nn::l2_normalize(&self.shallow[0].forward(x)?)?,
            nn::l2_normalize(&self.shallow[1].forward(x)?)?,
        ];
        let mut joint = Tensor::cat(&parts, 1)?;
        if train && self.cfg.dropout > 0.0 {
            joint = nn::dropout(&joint, self.cfg.dropout, &self.rng)?;
        }
        nn::l2_normalize(&self.joint.forward(&joint)?)
    }
}

/// Loads torchvision VGG16 weights (`features.*`, `classifier.0/3.*`) into the deep branch of
/// a `paper` SimNet held in `varmap`; other parameters keep their values. The classifier's last
/// layer (`classifier.6`, the 1000 ImageNet classes) is not used.
pub fn load_torchvision_vgg16(varmap: &VarMap, bytes: &[u8]) -> Result<(), PluginError> {
    nn::load_prefixed(varmap, &nn::read_safetensors(bytes)?, "deep.", "VGG16")
}

/// A SimNet for inference, from frozen weights.
pub struct SimNetExtractor {
    net: SimNet,
    cfg: SimNetConfig,
    weights: Vec<u8>,
}

impl std::fmt::Debug for SimNetExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetExtractor")
            .field("embed_dim", &self.cfg.embed_dim)
            .finish_non_exhaustive()
    }
}

impl Extractor for SimNetExtractor {
    fn name(&self) -> &str {
        "simnet"
    }

    fn spec(&self) -> ExtractorSpec {
        ExtractorSpec {
            input: self.cfg.input(),
            dim: self.cfg.embed_dim,
            metric: Metric::Cosine,
        }
    }

    fn version(&self) -> u32 {
        // Flip averaging changes what the same weights embed to.
        if self.cfg.flip_average {
            2
        } else {
            1
        }
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        check_batch(batch, &self.cfg.input())?;
        let e = self.net.forward_t(batch, false)?;
        if !self.cfg.flip_average {
            return Ok(e);
        }
        let mirrored = self.net.forward_t(&nn::flip_horizontal(batch)?, false)?;
        Ok(nn::l2_normalize(&(e + mirrored)?)?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(self.weights.clone())
    }
}

/// A SimNet being trained: parameters in a `VarMap`.
pub struct SimNetTrainable {
    net: SimNet,
    cfg: SimNetConfig,
    varmap: VarMap,
}

impl std::fmt::Debug for SimNetTrainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetTrainable")
            .field("embed_dim", &self.cfg.embed_dim)
            .finish_non_exhaustive()
    }
}

impl SimNetTrainable {
    /// A fresh network (random initialisation), one restored from `weights` saved by this
    /// plugin, or, when `weights` holds no `joint.*` tensor, a fresh network whose deep branch
    /// is loaded from a torchvision VGG16 file (see [`load_torchvision_vgg16`]).
    pub fn new(cfg: &SimNetConfig, weights: Option<&[u8]>) -> Result<Self, PluginError> {
        let (varmap, vb) = nn::new_varmap();
        let net = SimNet::new(cfg, vb)?;
        if let Some(w) = weights {
            // Parse once; the names say which kind of file it is.
            let tensors = nn::read_safetensors(w)?;
            if tensors.keys().any(|k| k.starts_with("joint.")) {
                nn::load_prefixed(&varmap, &tensors, "", "the")?;
            } else {
                nn::load_prefixed(&varmap, &tensors, "deep.", "VGG16")?;
            }
        }
        Ok(SimNetTrainable {
            net,
            cfg: cfg.clone(),
            varmap,
        })
    }

    /// The parameter map (to load torchvision weights into, say).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

impl Trainable for SimNetTrainable {
    fn forward_train(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        check_batch(batch, &self.cfg.input())?;
        Ok(self.net.forward_t(batch, true)?)
    }

    fn loss(&self, batch: TrainingBatch<'_>) -> Result<Tensor, PluginError> {
        match batch {
            TrainingBatch::Pairs { a, b, dissimilar } => {
                Ok(nn::contrastive_loss(a, b, dissimilar, MARGIN)?)
            }
            TrainingBatch::Labelled { embeddings, labels } => {
                Ok(nn::supcon_loss(embeddings, labels, TEMPERATURE)?)
            }
            TrainingBatch::OneVsMany {
                anchor,
                positive,
                negatives,
            } => {
                // Expand 1 + K into K + 1 pairs per anchor.
                let (n, k, d) = negatives.dims3()?;
                let anchors = anchor
                    .unsqueeze(1)?
                    .broadcast_as((n, k, d))?
                    .reshape((n * k, d))?;
                let a = Tensor::cat(&[anchor, &anchors], 0)?;
                let b = Tensor::cat(&[positive, &negatives.reshape((n * k, d))?], 0)?;
                let y = Tensor::cat(
                    &[
                        Tensor::zeros(n, a.dtype(), a.device())?,
                        Tensor::ones(n * k, a.dtype(), a.device())?,
                    ],
                    0,
                )?;
                Ok(nn::contrastive_loss(&a, &b, &y, MARGIN)?)
            }
            other => Err(PluginError::UnsupportedBatch {
                got: other.kind(),
                takes: "pairs, labelled, one-vs-many".into(),
            }),
        }
    }

    fn vars(&self) -> Vec<Var> {
        nn::sorted_vars(&self.varmap, &[])
    }

    fn reseed(&self, seed: u64) {
        self.net.rng.reseed(seed);
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.varmap)
    }

    fn freeze(&self) -> Result<Box<dyn Extractor>, PluginError> {
        let weights = self.save_weights()?;
        let net = SimNet::new(&self.cfg, nn::frozen_builder(&self.varmap)?)?;
        Ok(Box::new(SimNetExtractor {
            net,
            cfg: self.cfg.clone(),
            weights,
        }))
    }
}

/// Registered as `"simnet"`; configurations `cpu` (default), `cpu-gray` and `paper`.
#[derive(Debug, Default)]
pub struct SimNetPlugin;

impl ExtractorPlugin for SimNetPlugin {
    fn name(&self) -> &str {
        "simnet"
    }

    fn build(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError> {
        let cfg = SimNetConfig::preset(config)?;
        SimNetTrainable::new(&cfg, weights)?.freeze()
    }

    fn trainable(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn Trainable>, PluginError>> {
        Some(
            SimNetConfig::preset(config)
                .and_then(|cfg| SimNetTrainable::new(&cfg, weights))
                .map(|t| Box::new(t) as Box<dyn Trainable>),
        )
    }
}
