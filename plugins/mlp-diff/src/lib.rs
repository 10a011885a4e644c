//! # lookalike-mlp-diff: is this the same thing? An MLP on |x1 - x2|
//!
//! The similarity model of *Image similarity using fully-connected networks on the absolute
//! difference of features* (the MLP paper, section 3.2, Fig. 4): the input is `|x1 - x2|` for two
//! embeddings of a chosen extractor; hidden layers halve in width (`D -> D/2 -> D/4` with the
//! default two); ReLU and 25 % dropout on every hidden layer; He initialisation; a 2-way softmax
//! whose second output is P(same). Trained with cross-entropy and Nesterov momentum 0.8
//! (section 4.4).

#![deny(missing_docs)]

use lookalike_plugin::candle_core::{DType, Module, Result as CResult, Tensor, Var, D};
use lookalike_plugin::candle_nn::{self, Linear, VarBuilder, VarMap};
use lookalike_plugin::{nn, PairScorer, PluginError, ScorerPlugin, TrainableScorer};

/// Dropout on hidden layers (section 3.2).
pub const DROPOUT: f32 = 0.25;
/// Nesterov momentum of the paper's optimiser (section 4.4).
pub const MOMENTUM: f64 = 0.8;
/// Hidden layers of the default configuration.
pub const HIDDEN_LAYERS: usize = 2;

/// The network.
#[derive(Debug, Clone)]
pub struct MlpDiff {
    layers: Vec<Linear>,
    dim: usize,
    rng: nn::TrainRng,
}

impl MlpDiff {
    /// `hidden` hidden layers for `dim`-dimensional embeddings (names `fc0`, `fc1`, ...,
    /// `out`). Weights are He-initialised (candle's Kaiming normal).
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> CResult<Self> {
        let mut layers = Vec::new();
        let mut width = dim;
        for i in 0..hidden {
            let next = (width / 2).max(2);
            layers.push(candle_nn::linear(width, next, vb.pp(format!("fc{i}")))?);
            width = next;
        }
        layers.push(candle_nn::linear(width, 2, vb.pp("out"))?);
        Ok(MlpDiff {
            layers,
            dim,
            rng: nn::TrainRng::default(),
        })
    }

    /// Logits (N x 2) for rows of `a` and `b` (N x D).
    pub fn logits(&self, a: &Tensor, b: &Tensor, train: bool) -> CResult<Tensor> {
        let mut h = (a - b)?.abs()?;
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i < last {
                h = h.relu()?;
                if train {
                    h = nn::dropout(&h, DROPOUT, &self.rng)?;
                }
            }
        }
        Ok(h)
    }
}

fn parse_hidden(config: &str) -> Result<usize, PluginError> {
    match config {
        "" => Ok(HIDDEN_LAYERS),
        c => c
            .strip_prefix("hidden=")
            .and_then(|n| n.parse().ok())
            .filter(|n: &usize| (1..=6).contains(n))
            .ok_or_else(|| PluginError::UnknownConfig {
                config: c.into(),
                known: "\"\" (2 hidden layers) or hidden=N with N in 1..=6".into(),
            }),
    }
}

/// A trained scorer for inference.
pub struct MlpDiffScorer {
    net: MlpDiff,
    weights: Vec<u8>,
}

impl std::fmt::Debug for MlpDiffScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlpDiffScorer")
            .field("dim", &self.net.dim)
            .finish_non_exhaustive()
    }
}

impl PairScorer for MlpDiffScorer {
    fn name(&self) -> &str {
        "mlp-diff"
    }

    fn dim(&self) -> usize {
        self.net.dim
    }

    fn score(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, PluginError> {
        for t in [a, b] {
            if t.rank() != 2 || t.dim(1)? != self.net.dim {
                return Err(PluginError::BadInput {
                    expected: format!("N x {}", self.net.dim),
                    got: t.dims().to_vec(),
                });
            }
        }
        let p = candle_nn::ops::softmax(&self.net.logits(a, b, false)?, D::Minus1)?;
        Ok(p.narrow(1, 1, 1)?.squeeze(1)?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(self.weights.clone())
    }
}

/// A scorer being trained.
pub struct MlpDiffTrainable {
    net: MlpDiff,
    hidden: usize,
    varmap: VarMap,
}

impl std::fmt::Debug for MlpDiffTrainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlpDiffTrainable")
            .field("dim", &self.net.dim)
            .finish_non_exhaustive()
    }
}

impl MlpDiffTrainable {
    /// A fresh scorer for `dim`-dimensional embeddings, or one restored from `weights`.
    pub fn new(dim: usize, config: &str, weights: Option<&[u8]>) -> Result<Self, PluginError> {
        let hidden = parse_hidden(config)?;
        let (varmap, vb) = nn::new_varmap();
        let net = MlpDiff::new(dim, hidden, vb)?;
        if let Some(w) = weights {
            nn::load_varmap(&varmap, w)?;
        }
        Ok(MlpDiffTrainable {
            net,
            hidden,
            varmap,
        })
    }

    /// Mean cross-entropy over pairs; `same[i]` is 1 (u32) when `a[i]` and `b[i]` show the
    /// same thing. Dropout is on.
    pub fn loss(&self, a: &Tensor, b: &Tensor, same: &Tensor) -> Result<Tensor, PluginError> {
        let logits = self.net.logits(a, b, true)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits,
            &same.to_dtype(DType::U32)?,
        )?)
    }

    /// The parameters, in name order.
    pub fn vars(&self) -> Vec<Var> {
        nn::sorted_vars(&self.varmap, &[])
    }

    /// Seeds the dropout masks of the following steps.
    pub fn reseed(&self, seed: u64) {
        self.net.rng.reseed(seed);
    }

    /// The paper's optimiser for these parameters: Nesterov momentum 0.8 at `lr`.
    pub fn optimizer(&self, lr: f64) -> nn::SgdNesterov {
        nn::SgdNesterov::new(self.vars(), lr, MOMENTUM, 0.0)
    }

    /// The weights as safetensors bytes.
    pub fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.varmap)
    }

    /// An inference scorer with the current weights.
    pub fn freeze(&self) -> Result<MlpDiffScorer, PluginError> {
        let net = MlpDiff::new(self.net.dim, self.hidden, nn::frozen_builder(&self.varmap)?)?;
        Ok(MlpDiffScorer {
            net,
            weights: self.save_weights()?,
        })
    }
}

/// Registered as `"mlp-diff"`; configuration `""` (two hidden layers) or `hidden=N`.
#[derive(Debug, Default)]
pub struct MlpDiffPlugin;

impl ScorerPlugin for MlpDiffPlugin {
    fn name(&self) -> &str {
        "mlp-diff"
    }

    fn build(
        &self,
        dim: usize,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn PairScorer>, PluginError> {
        Ok(Box::new(
            MlpDiffTrainable::new(dim, config, weights)?.freeze()?,
        ))
    }

    fn trainable(
        &self,
        dim: usize,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn TrainableScorer>, PluginError>> {
        Some(
            MlpDiffTrainable::new(dim, config, weights)
                .map(|t| Box::new(t) as Box<dyn TrainableScorer>),
        )
    }
}

impl TrainableScorer for MlpDiffTrainable {
    fn loss(&self, a: &Tensor, b: &Tensor, same: &Tensor) -> Result<Tensor, PluginError> {
        MlpDiffTrainable::loss(self, a, b, same)
    }

    fn vars(&self) -> Vec<Var> {
        MlpDiffTrainable::vars(self)
    }

    fn reseed(&self, seed: u64) {
        MlpDiffTrainable::reseed(self, seed)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        MlpDiffTrainable::save_weights(self)
    }

    fn freeze(&self) -> Result<Box<dyn PairScorer>, PluginError> {
        Ok(Box::new(MlpDiffTrainable::freeze(self)?))
    }
}
