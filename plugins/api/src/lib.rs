//! # lookalike-plugin: the traits a lookalike plugin implements
//!
//! A plugin turns preprocessed images into embeddings (an [`Extractor`]) or says whether two
//! embeddings show the same thing (a [`PairScorer`]). The database owns everything else:
//! decoding, resizing, normalisation, batching, storage (sled), the vector index (FAISS),
//! threads and devices. A plugin never touches storage.
//!
//! This crate depends on `candle-core` and `thiserror` only, and re-exports [`candle_core`] so
//! that a plugin builds against the same candle version as the database.
//!
//! ## Writing an extractor
//!
//! An extractor has four required methods:
//!
//! * [`Extractor::name`]: the registry name, stored with every model version;
//! * [`Extractor::spec`]: what it expects (input size, channels, mean/std) and what it returns
//!   (dimension, metric). The database prepares every batch from this declaration;
//! * [`Extractor::embed`]: `N x C x H x W` in, `N x D` out;
//! * [`Extractor::save_weights`]: safetensors bytes (empty for a training-free extractor).
//!
//! It is built by an [`ExtractorPlugin`] (the factory the registry holds), which makes a fresh
//! extractor from a configuration string, or restores one from the weights it saved. Loading
//! what was saved must give bit-identical embeddings.
//!
//! ```
//! use lookalike_plugin::{candle_core::Tensor, Extractor, ExtractorPlugin, ExtractorSpec,
//!                        InputSpec, Metric, PluginError};
//!
//! /// Mean brightness per channel: a (useless) 3-d embedding.
//! #[derive(Debug)]
//! struct MeanColour;
//!
//! impl Extractor for MeanColour {
//!     fn name(&self) -> &str { "mean-colour" }
//!     fn spec(&self) -> ExtractorSpec {
//!         ExtractorSpec { input: InputSpec::rgb(8, 8), dim: 3, metric: Metric::L2 }
//!     }
//!     fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
//!         Ok(batch.mean((2, 3))?)
//!     }
//!     fn save_weights(&self) -> Result<Vec<u8>, PluginError> { Ok(Vec::new()) }
//! }
//!
//! #[derive(Debug)]
//! struct MeanColourPlugin;
//!
//! impl ExtractorPlugin for MeanColourPlugin {
//!     fn name(&self) -> &str { "mean-colour" }
//!     fn build(&self, _config: &str, _weights: Option<&[u8]>)
//!         -> Result<Box<dyn Extractor>, PluginError> {
//!         Ok(Box::new(MeanColour))
//!     }
//! }
//!
//! let e = MeanColourPlugin.build("", None)?;
//! let batch = Tensor::ones((2, 3, 8, 8), lookalike_plugin::candle_core::DType::F32,
//!                          &lookalike_plugin::candle_core::Device::Cpu)?;
//! assert_eq!(e.embed(&batch)?.dims(), &[2, 3]);
//! # Ok::<(), PluginError>(())
//! ```
//!
//! Register it when opening a database: `Options::default().register(Arc::new(MeanColourPlugin))`.

#![deny(missing_docs)]

use std::fmt::Debug;

pub use candle_core;
use candle_core::Tensor;

pub mod conformance;
#[cfg(feature = "nn")]
pub mod nn;
pub mod ops;
#[cfg(feature = "nn")]
pub mod optim;
#[cfg(feature = "nn")]
pub use candle_nn;

/// How distances between two embeddings are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `1 - cos(a, b)`, in `[0, 2]`. The database L2-normalises embeddings for this metric.
    Cosine,
    /// Squared Euclidean distance `|a - b|^2`.
    L2,
}

impl Metric {
    /// The stable name of the metric, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
        }
    }
}

/// What the database must feed an extractor: the size, the channels and the normalisation of
/// every image in a batch.
///
/// The database decodes an image (turned upright by its EXIF orientation), composites any
/// transparency over [`InputSpec::background`], converts it to `channels` (1 = luma, 3 = RGB),
/// resizes it to exactly `width x height` (aspect ratio not kept), scales pixel values to
/// `[0, 1]`, then computes `(x - mean[c]) / std[c]` per channel. Training batches, stored
/// images and queries all go through the same steps.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Width in pixels of the tensor fed to [`Extractor::embed`].
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 1 (luma) or 3 (RGB).
    pub channels: u32,
    /// Per-channel mean subtracted after scaling to `[0, 1]`; one value per channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by; one value per channel.
    pub std: Vec<f32>,
    /// The colour (8-bit RGB) that transparent pixels are composited over before conversion.
    /// White ([`InputSpec::WHITE`]) in the constructors: icons, logos and product cut-outs are
    /// drawn to be seen on white. It is part of the model's preprocessing, stored with it.
    pub background: [u8; 3],
}

impl InputSpec {
    /// The default [`InputSpec::background`]: white.
    pub const WHITE: [u8; 3] = [255, 255, 255];

    /// RGB input of the given size with values in `[0, 1]` (mean 0, std 1), transparency
    /// composited over white.
    pub fn rgb(width: u32, height: u32) -> Self {
        InputSpec {
            width,
            height,
            channels: 3,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            background: Self::WHITE,
        }
    }

    /// Single-channel (luma) input of the given size with values in `[0, 1]`, transparency
    /// composited over white.
    pub fn luma(width: u32, height: u32) -> Self {
        InputSpec {
            width,
            height,
            channels: 1,
            mean: vec![0.0],
            std: vec![1.0],
            background: Self::WHITE,
        }
    }

    /// The same input with `mean` and `std` (one value per channel).
    pub fn normalised(mut self, mean: &[f32], std: &[f32]) -> Self {
        self.mean = mean.to_vec();
        self.std = std.to_vec();
        self
    }

    /// The same input composited over `background` (8-bit RGB) instead of white.
    pub fn background(mut self, background: [u8; 3]) -> Self {
        self.background = background;
        self
    }

    /// Checks that the declaration is usable: non-zero size, 1 or 3 channels, one mean and
    /// one non-zero std per channel.
    pub fn validate(&self) -> Result<(), PluginError> {
        let c = self.channels as usize;
        let bad = |reason: String| Err(PluginError::InvalidSpec(reason));
        if self.width == 0 || self.height == 0 {
            return bad(format!(
                "input size {}x{} is empty",
                self.width, self.height
            ));
        }
        if c != 1 && c != 3 {
            return bad(format!(
                "{c} channels; only 1 (luma) or 3 (RGB) are supported"
            ));
        }
        if self.mean.len() != c || self.std.len() != c {
            return bad(format!(
                "{} means and {} stds for {c} channels",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return bad("a std of zero or not finite".to_string());
        }
        Ok(())
    }
}

/// The full declaration of an extractor: its input and its output.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractorSpec {
    /// What each image must look like when it reaches [`Extractor::embed`].
    pub input: InputSpec,
    /// Length of one embedding.
    pub dim: usize,
    /// How embeddings are compared.
    pub metric: Metric,
}

/// Turns a batch of preprocessed images into embeddings.
///
/// Object safe: the database holds extractors as `Arc<dyn Extractor>` and calls them from
/// many threads at once, so `embed` takes `&self`.
pub trait Extractor: Send + Sync + Debug + 'static {
    /// The registry name of the plugin that built this extractor.
    fn name(&self) -> &str;

    /// Version of the extractor's own code and weight layout. Stored with each model; bump it
    /// when embeddings of the same weights would change.
    fn version(&self) -> u32 {
        1
    }

    /// The input the extractor expects and the output it returns.
    fn spec(&self) -> ExtractorSpec;

    /// Embeds a batch: `N x C x H x W` (f32, as [`Extractor::spec`] declares) to `N x D`.
    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError>;

    /// The weights as safetensors bytes; empty for an extractor without weights.
    fn save_weights(&self) -> Result<Vec<u8>, PluginError>;

    /// What this extractor's embeddings are, when other extractors are computed from them
    /// (see [`Extractor::derived_from`]): equal ids mean equal embeddings of every image.
    /// `None` (the default) for an extractor nothing is derived from.
    fn features(&self) -> Option<FeaturesId> {
        None
    }

    /// When this extractor's embedding is a function of another extractor's embeddings as
    /// the database stores them (L2-normalised for [`Metric::Cosine`]): that extractor's
    /// [`Extractor::features`]. A database installing this extractor over a model whose
    /// extractor answers the same id (and decodes images the same way) then computes every
    /// image's embedding from the stored one with [`Extractor::embed_features`], without
    /// decoding the image again: a head trained on a frozen backbone takes seconds to
    /// install instead of a pass of the backbone over every stored image. `None` (the
    /// default) otherwise.
    fn derived_from(&self) -> Option<FeaturesId> {
        None
    }

    /// The embeddings of rows of the features [`Extractor::derived_from`] names: `N x D'` to
    /// `N x D`. Called only when `derived_from` answers; the default is an error.
    fn embed_features(&self, _features: &Tensor) -> Result<Tensor, PluginError> {
        Err(PluginError::InvalidSpec(format!(
            "{} computes no embeddings from stored features",
            self.name()
        )))
    }
}

/// Names what an extractor's embeddings are (see [`Extractor::features`]), for example a
/// fingerprint of a frozen backbone's weights ([`nn::fingerprint`] with the `nn` feature).
/// Compared within one process, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeaturesId(pub u64);

/// Builds extractors of one kind: the entry the database's registry holds.
pub trait ExtractorPlugin: Send + Sync + Debug + 'static {
    /// The registry name (`"classic"`, `"simnet"`, ...). Unique within a database.
    fn name(&self) -> &str;

    /// Builds an extractor from a plugin-defined configuration string (a preset name, say;
    /// empty for the default) and, when restoring a stored model, the weights it saved.
    fn build(
        &self,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError>;

    /// A trainable copy, for the training jobs: fresh, or from saved weights. `None` (the
    /// default) for an extractor that cannot be trained.
    fn trainable(
        &self,
        _config: &str,
        _weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn Trainable>, PluginError>> {
        None
    }
}

/// The embeddings a training objective compares, computed by [`Trainable::forward_train`].
/// New kinds may be added: a plugin's `loss` answers kinds it has no objective for with
/// [`PluginError::UnsupportedBatch`].
#[derive(Debug)]
#[non_exhaustive]
pub enum TrainingBatch<'a> {
    /// Pairs of rows: `a[i]` against `b[i]`; `dissimilar[i]` is 1 for a negative pair, 0 for
    /// a positive one (the SimNet paper's `Y`).
    Pairs {
        /// N x D.
        a: &'a Tensor,
        /// N x D.
        b: &'a Tensor,
        /// N values, 0 or 1 (f32).
        dissimilar: &'a Tensor,
    },
    /// The whole batch with its labels, for objectives that weigh every pair of the batch
    /// at once (the supervised contrastive loss: `nn::supcon_loss` with the `nn` feature).
    Labelled {
        /// N x D.
        embeddings: &'a Tensor,
        /// N integer labels (u32).
        labels: &'a Tensor,
    },
    /// One positive and K negatives per anchor (the fused paper's 1 + N batch).
    OneVsMany {
        /// N x D.
        anchor: &'a Tensor,
        /// N x D.
        positive: &'a Tensor,
        /// N x K x D.
        negatives: &'a Tensor,
    },
}

impl TrainingBatch<'_> {
    /// The kind's name: `pairs`, `labelled` or `one-vs-many`.
    pub fn kind(&self) -> &'static str {
        match self {
            TrainingBatch::Pairs { .. } => "pairs",
            TrainingBatch::Labelled { .. } => "labelled",
            TrainingBatch::OneVsMany { .. } => "one-vs-many",
        }
    }
}

/// A model being trained: forward with gradients, its objective, its parameters.
pub trait Trainable: Send + Debug {
    /// Embeds a batch in training mode (dropout on, batch norm on batch statistics), keeping
    /// the graph for backpropagation. `N x C x H x W` in, `N x D` out.
    fn forward_train(&self, batch: &Tensor) -> Result<Tensor, PluginError>;

    /// Pretrained layers that training leaves alone: when the network starts with such a
    /// frozen part, its output for a batch of images (`N x C x H x W` in, `N x F` out,
    /// computed without a gradient graph); `None` (the default) when every layer trains.
    ///
    /// The training jobs then compute each training image's features once per augmented view
    /// (a feature bank), and train and evaluate with [`Trainable::forward_features`] on rows
    /// of it instead of running the frozen layers at every step: a head on a pretrained
    /// backbone trains in seconds instead of hours.
    fn frozen_features(&self, _images: &Tensor) -> Option<Result<Tensor, PluginError>> {
        None
    }

    /// When the rows of [`Trainable::frozen_features`] are, up to their L2 norm, the stored
    /// embeddings of an extractor whose [`Extractor::features`] answers this id (for images
    /// decoded for the same input), and [`Trainable::forward_features`] gives the same for a
    /// row and for its normalised copy: that id. The training jobs then take the unaugmented
    /// features of stored images from the database's stored embeddings instead of running
    /// the frozen layers over every image. `None` (the default) otherwise.
    fn frozen_features_id(&self) -> Option<FeaturesId> {
        None
    }

    /// The trained part on rows of [`Trainable::frozen_features`]' output: with `train`, the
    /// training forward (graph kept, dropout on); without, exactly the embeddings that
    /// [`Trainable::freeze`]'s extractor gives for the same images. Called only when
    /// `frozen_features` answers; the default is an error.
    fn forward_features(&self, _features: &Tensor, _train: bool) -> Result<Tensor, PluginError> {
        Err(PluginError::InvalidSpec(
            "this trainable has no frozen features to train on".into(),
        ))
    }

    /// The plugin's training objective over embeddings from [`Trainable::forward_train`].
    fn loss(&self, batch: TrainingBatch<'_>) -> Result<Tensor, PluginError>;

    /// The parameters an optimiser updates, in a stable order (the same on every call and in
    /// every process for one configuration: optimiser state is checkpointed by position).
    fn vars(&self) -> Vec<candle_core::Var>;

    /// Seeds the model's training-time randomness (dropout) before a step. The training jobs
    /// call it with a seed derived from the job's seed, epoch and step, so that a resumed job
    /// repeats an uninterrupted one exactly. The default does nothing (no randomness).
    fn reseed(&self, _seed: u64) {}

    /// The current weights as safetensors bytes, loadable by `ExtractorPlugin::build`.
    fn save_weights(&self) -> Result<Vec<u8>, PluginError>;

    /// An inference extractor with the current weights.
    fn freeze(&self) -> Result<Box<dyn Extractor>, PluginError>;
}

/// Says how likely two embeddings are to show the same thing.
pub trait PairScorer: Send + Sync + Debug + 'static {
    /// The registry name of the plugin that built this scorer.
    fn name(&self) -> &str;

    /// Dimension of the embeddings the scorer was trained on.
    fn dim(&self) -> usize;

    /// P(same) for each row pair: `a` and `b` are `N x D`, the result has `N` values in `[0, 1]`.
    fn score(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, PluginError>;

    /// The weights as safetensors bytes.
    fn save_weights(&self) -> Result<Vec<u8>, PluginError>;
}

/// Builds pair scorers of one kind.
pub trait ScorerPlugin: Send + Sync + Debug + 'static {
    /// The registry name (`"mlp-diff"`).
    fn name(&self) -> &str;

    /// Builds a scorer for `dim`-dimensional embeddings from a configuration string and, when
    /// restoring a trained one, its weights.
    fn build(
        &self,
        dim: usize,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Box<dyn PairScorer>, PluginError>;

    /// A trainable scorer for `dim`-dimensional embeddings, for `Db::train_scorer`: fresh, or
    /// from saved weights. `None` (the default) for a scorer that cannot be trained.
    fn trainable(
        &self,
        _dim: usize,
        _config: &str,
        _weights: Option<&[u8]>,
    ) -> Option<Result<Box<dyn TrainableScorer>, PluginError>> {
        None
    }
}

/// A pair scorer being trained.
pub trait TrainableScorer: Send + Debug {
    /// The training objective (dropout on) for pairs of rows of `a` and `b` (`N x D`);
    /// `same` holds N values, 1 for a pair showing the same thing, 0 otherwise (f32).
    fn loss(&self, a: &Tensor, b: &Tensor, same: &Tensor) -> Result<Tensor, PluginError>;

    /// The parameters an optimiser updates, in a stable order.
    fn vars(&self) -> Vec<candle_core::Var>;

    /// Seeds training-time randomness (dropout) before a step; see [`Trainable::reseed`].
    fn reseed(&self, _seed: u64) {}

    /// The current weights as safetensors bytes, loadable by [`ScorerPlugin::build`].
    fn save_weights(&self) -> Result<Vec<u8>, PluginError>;

    /// An inference scorer with the current weights.
    fn freeze(&self) -> Result<Box<dyn PairScorer>, PluginError>;
}

/// What a plugin can get wrong. The database converts it into its own error at the boundary,
/// keeping the plugin's name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The configuration string is not one the plugin knows.
    #[error("unknown configuration {config:?}; known: {known}")]
    UnknownConfig {
        /// What was asked for.
        config: String,
        /// What the plugin accepts, comma-separated.
        known: String,
    },
    /// A weight file lacks a tensor or holds one of the wrong shape.
    #[error("weights do not fit the model: {0}")]
    Weights(String),
    /// A batch of the wrong shape was passed in.
    #[error("expected input of shape {expected}, got {got:?}")]
    BadInput {
        /// The shape the extractor declared.
        expected: String,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// The extractor's declaration is unusable.
    #[error("invalid extractor declaration: {0}")]
    InvalidSpec(String),
    /// The plugin's loss does not take this kind of training batch (choose another miner).
    #[error("this plugin's loss does not take {got} batches; it takes {takes}")]
    UnsupportedBatch {
        /// The kind passed ([`TrainingBatch::kind`]).
        got: &'static str,
        /// The kinds the plugin takes, comma-separated.
        takes: String,
    },
}

/// Checks that `batch` is `N x C x H x W` as `spec` declares; a helper for implementers.
pub fn check_batch(batch: &Tensor, spec: &InputSpec) -> Result<usize, PluginError> {
    let dims = batch.dims();
    let ok = dims.len() == 4
        && dims[1] == spec.channels as usize
        && dims[2] == spec.height as usize
        && dims[3] == spec.width as usize;
    if ok {
        Ok(dims[0])
    } else {
        Err(PluginError::BadInput {
            expected: format!("N x {} x {} x {}", spec.channels, spec.height, spec.width),
            got: dims.to_vec(),
        })
    }
}
