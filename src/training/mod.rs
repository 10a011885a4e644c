//! In-database training jobs: [`crate::Db::train_extractor`] trains an extractor plugin from
//! the labelled images the database holds, evaluates it on a held-out split, re-embeds every
//! image with it, builds its index and switches to it in one step.
//!
//! The life cycle of a job (`job.rs`): snapshot the labelled images and split them (stratified,
//! seeded) -> evaluate the active model on the held-out split -> for each epoch, batches of
//! P labels x K images plus random others are loaded, decoded and augmented on worker threads
//! (`loader.rs`), embedded with the current weights, mined for pairs ([`miners`]; the default
//! `supcon` passes the whole labelled batch to the loss) and used for one optimiser step
//! (cosine-annealed rate) -> after each epoch: validation metrics, learning-rate decay,
//! a checkpoint in the store -> at the end, a new model version, re-embedding, index, switch.
//! See `docs/training.md`.

mod auto;
mod bank;
pub mod eval;
mod job;
pub(crate) mod loader;
pub mod miners;
mod scorer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use eval::{Holdout, Metrics};
pub(crate) use job::train_extractor;
pub(crate) use scorer::train_scorer;
pub use scorer::{CaseAccuracy, ScorerReport, ScorerTrainOptions};

/// Cancels a running job from another thread. The job stops at its next step (or between
/// re-embedding batches), removes its checkpoint and any model version it began writing, and
/// returns [`crate::Error::Cancelled`]: the database is as it was.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        CancelToken::default()
    }

    /// Asks the job to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The optimiser of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimiserKind {
    /// SGD with Nesterov momentum (the SimNet and MLP papers).
    SgdNesterov {
        /// Learning rate.
        lr: f64,
        /// Momentum.
        momentum: f64,
        /// L2 weight decay (added to every gradient; 0 for none).
        weight_decay: f64,
    },
    /// Adam (the fused paper).
    Adam {
        /// Learning rate.
        lr: f64,
    },
}

impl OptimiserKind {
    /// The jobs' default: SGD with Nesterov momentum 0.9, rate 0.1 and weight decay 1e-4
    /// (with a 5 % warm-up and cosine annealing, SGD beat Adam 1e-3 on Fashion-MNIST by about
    /// a point of accuracy@1; in the 15-minute job 0.1 scored 92.90 % against 0.05's 92.66 %,
    /// and weight decay 1e-4 93.07 % on average over three seeds against 5e-4's 92.96 %,
    /// docs/benchmarks.md).
    pub const DEFAULT_SGD: OptimiserKind = OptimiserKind::SgdNesterov {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
    };

    /// Adam at 1e-3, the rate measured best for it on Fashion-MNIST.
    pub const DEFAULT_ADAM: OptimiserKind = OptimiserKind::Adam { lr: 1e-3 };

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimiserKind::SgdNesterov { lr, .. } | OptimiserKind::Adam { lr } => lr,
        }
    }

    /// The same optimiser at learning rate `lr`.
    pub fn with_lr(mut self, new: f64) -> Self {
        match &mut self {
            OptimiserKind::SgdNesterov { lr, .. } | OptimiserKind::Adam { lr } => *lr = new,
        }
        self
    }
}

/// Data augmentation applied to every training image (the papers' lists). Values are in the
/// [0, 1] pixel scale before the extractor's normalisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Random shift by up to this many pixels (a random crop of the image padded by repeating
    /// its border: black around a Fashion-MNIST garment, the composited background around a
    /// transparent icon).
    pub shift: u32,
    /// Random horizontal flip.
    pub flip: bool,
    /// Random rotation within +- this many degrees.
    pub rotate_degrees: f32,
    /// Colour jitter: brightness and contrast changed by up to this fraction.
    pub jitter: f32,
    /// Gaussian noise with this standard deviation.
    pub noise: f32,
    /// Per-channel colour jitter: each of R, G and B scaled by its own factor within 1 +- this
    /// fraction (a colour cast; brightness and contrast are [`Augment::jitter`]'s).
    pub colour: f32,
    /// Random zoom-in by up to this fraction (1 + zoom times larger, the centre moved by the
    /// shift): a random crop of 1 / (1 + zoom) of the side or more, resized back.
    pub zoom: f32,
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Self {
        Augment {
            shift: 0,
            flip: false,
            rotate_degrees: 0.0,
            jitter: 0.0,
            noise: 0.0,
            colour: 0.0,
            zoom: 0.0,
        }
    }

    /// For colour images (icons, photos, products): flips, shifts of up to 4 % of the side,
    /// zoom-ins of up to 15 %, brightness and contrast within 10 % and a colour cast within
    /// 10 % per channel. The views of a feature bank (pretrained features) use it.
    pub fn colour(width: u32) -> Self {
        Augment {
            flip: true,
            shift: (width as f32 * 0.04).round() as u32,
            zoom: 0.15,
            jitter: 0.1,
            colour: 0.1,
            ..Augment::none()
        }
    }

    /// The augmentation as the checkpoint fingerprint spells it: the fields before
    /// `colour` and `zoom` as they always were, those two only when used (so that a
    /// checkpoint written before they existed still resumes).
    fn fingerprint(&self) -> String {
        let mut s = format!(
            "Augment {{ shift: {:?}, flip: {:?}, rotate_degrees: {:?}, jitter: {:?}, noise: {:?}",
            self.shift, self.flip, self.rotate_degrees, self.jitter, self.noise
        );
        if self.colour != 0.0 || self.zoom != 0.0 {
            s.push_str(&format!(
                ", colour: {:?}, zoom: {:?}",
                self.colour, self.zoom
            ));
        }
        s + " }"
    }

    /// The default: horizontal flips only. Measured on Fashion-MNIST (docs/benchmarks.md): the
    /// 15-minute job scored 92.66 % accuracy@1 with flips alone against 91.64 % with
    /// [`Augment::light`]'s shifts added; a network trained for minutes under-fits, and
    /// shifts made it fit less.
    pub fn flips() -> Self {
        Augment {
            flip: true,
            ..Augment::none()
        }
    }

    /// Shifts of up to 2 pixels and horizontal flips (the default until session 5).
    pub fn light() -> Self {
        Augment {
            shift: 2,
            flip: true,
            ..Augment::none()
        }
    }

    /// Everything the papers list: shift 3, flip, rotation 10 degrees, jitter 0.2, noise 0.02.
    pub fn full() -> Self {
        Augment {
            shift: 3,
            flip: true,
            rotate_degrees: 10.0,
            jitter: 0.2,
            noise: 0.02,
            ..Augment::none()
        }
    }
}

impl Default for Augment {
    fn default() -> Self {
        Augment::flips()
    }
}

/// What a job is doing when it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Evaluating the active model on the held-out split before training: the report after
    /// it carries its metrics (the start of the validation curve; also reported on resume).
    Baseline,
    /// Evaluating the model being trained on the held-out split; `epoch` is the epoch just
    /// finished (from 0).
    Evaluating,
    /// Optimiser steps.
    Training,
    /// Embedding every stored image with the new model.
    Embedding,
    /// Computing the frozen pretrained layers' features of the training and validation images
    /// once per view, before training (a head on a pretrained backbone, see
    /// [`TrainOptions::feature_views`]); `embedded` counts the images of the view under way.
    Features,
}

/// A progress report, passed to [`TrainOptions::on_progress`]'s callback.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What the job is doing.
    pub phase: Phase,
    /// Epoch (from 0) and the job's epoch count.
    pub epoch: usize,
    /// Epochs planned.
    pub epochs: usize,
    /// Step within the epoch (from 0) and steps per epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// The last step's loss.
    pub loss: f32,
    /// OPMS's lambda, for miners that have one.
    pub lambda: Option<f32>,
    /// Training throughput since the job (or its resumption) started.
    pub images_per_second: f64,
    /// Mined pairs per second since the job (or its resumption) started.
    pub pairs_per_second: f64,
    /// Validation metrics, when the report follows an evaluation.
    pub validation: Option<Metrics>,
    /// Images embedded so far and in all (the embedding phase).
    pub embedded: (usize, usize),
    /// Seconds since the job started.
    pub elapsed_seconds: f64,
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// When a finished job's model becomes the active one. Whatever the choice, the model is
/// evaluated on the held-out split, stored and listed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activate {
    /// Only when it beats the active model on the held-out split: a higher accuracy@1, or the
    /// same accuracy@1 and a higher mAP@10 (the default).
    #[default]
    IfBetter,
    /// Always, even when it scored worse.
    Always,
    /// Never: [`crate::Db::use_model`] activates it later.
    Never,
}

impl Activate {
    /// Whether a model scoring `after` replaces one scoring `before`, and why, in words.
    ///
    /// ```
    /// use lookalike::{Activate, Metrics};
    /// let m = |acc, map| Metrics { accuracy_at_1: acc, map_at_10: map, queries: 100 };
    /// assert!(Activate::IfBetter.decide(&m(0.80, 0.70), &m(0.81, 0.60)).0);
    /// assert!(!Activate::IfBetter.decide(&m(0.80, 0.70), &m(0.79, 0.90)).0);
    /// // Equal accuracy@1: mAP@10 breaks the tie; equal both: not better.
    /// assert!(Activate::IfBetter.decide(&m(0.80, 0.70), &m(0.80, 0.71)).0);
    /// assert!(!Activate::IfBetter.decide(&m(0.80, 0.70), &m(0.80, 0.70)).0);
    /// assert!(Activate::Always.decide(&m(0.80, 0.70), &m(0.10, 0.10)).0);
    /// assert!(!Activate::Never.decide(&m(0.10, 0.10), &m(0.80, 0.70)).0);
    /// ```
    pub fn decide(self, before: &Metrics, after: &Metrics) -> (bool, String) {
        let pct = |x: f64| format!("{:.2} %", x * 100.0);
        let better = after.accuracy_at_1 > before.accuracy_at_1
            || (after.accuracy_at_1 == before.accuracy_at_1 && after.map_at_10 > before.map_at_10);
        let comparison = if after.accuracy_at_1 != before.accuracy_at_1 {
            format!(
                "held-out accuracy@1 {} against the active model's {}",
                pct(after.accuracy_at_1),
                pct(before.accuracy_at_1)
            )
        } else {
            format!(
                "held-out accuracy@1 equal ({}), mAP@10 {} against {}",
                pct(after.accuracy_at_1),
                pct(after.map_at_10),
                pct(before.map_at_10)
            )
        };
        match (self, better) {
            (Activate::IfBetter, true) => (true, format!("activated: better, {comparison}")),
            (Activate::IfBetter, false) => (
                false,
                format!(
                    "stored, not activated: not better, {comparison} (switch to it with \
                     Db::use_model or `lookalike use`)"
                ),
            ),
            (Activate::Always, _) => (true, format!("activated as asked (always): {comparison}")),
            (Activate::Never, _) => (
                false,
                format!("stored, not activated as asked (never): {comparison}"),
            ),
        }
    }
}

/// How a training job runs. `TrainOptions::default()` suits the `cpu` presets.
#[derive(Clone)]
pub struct TrainOptions {
    /// The plugin's configuration (preset); empty for its default.
    pub config: String,
    /// Epochs; OPMS's lambda grows by 1/epochs per epoch.
    pub epochs: usize,
    /// Stop after this much training time (minutes; evaluation and re-embedding not counted),
    /// keeping the weights reached: for "the best model in 15 minutes".
    pub max_minutes: Option<f64>,
    /// Images per batch.
    pub batch_size: usize,
    /// Images of each label in a batch (K); the batch holds (batch_size - random) / K labels.
    pub per_label: usize,
    /// Images drawn from anywhere (random others) per batch.
    pub random: usize,
    /// Steps per epoch; by default as many batches as it takes to see the training split once.
    pub steps_per_epoch: Option<usize>,
    /// Pair mining: `supcon` (default: the whole labelled batch to the plugin's supervised
    /// contrastive loss), `opms`, `naive`, `balanced`, `one-vs-many`.
    pub miner: String,
    /// Weight of the proxy loss added to the miner's objective (0 turns it off): the job keeps
    /// one learned proxy vector per label and adds `nn::proxy_loss` (normalised softmax over
    /// the proxies, temperature `nn::PROXY_TEMPERATURE`) on the whole batch to the plugin's
    /// loss. The proxies live in the job (and its checkpoints) only; the stored model is the
    /// plugin's network alone. Default 1.0 (measured on Fashion-MNIST, docs/benchmarks.md);
    /// 0.0 gives the papers' objectives unchanged.
    pub proxy_weight: f64,
    /// The optimiser.
    pub optimiser: OptimiserKind,
    /// The MLP paper's learning-rate decay (§4.5) with this alpha: halve the rate when the
    /// running mean of validation accuracy gained less than alpha over the last three epochs
    /// (from the fourth epoch, at most every third). `None`: constant rate.
    pub lr_decay: Option<f64>,
    /// Anneal the learning rate along a half cosine from its value to 0 over the run: over
    /// `epochs` x steps, or over `max_minutes` of training when that ends first. Applied on top
    /// of the decay rule. On by default (measured on Fashion-MNIST: +0.7 points accuracy@1 in
    /// a 3-minute probe, docs/benchmarks.md). Time-limited runs anneal by the clock, so two of
    /// them differ as their step rates differ.
    pub cosine: bool,
    /// Share of the run (0 to 1, measured as `cosine` measures it) over which the rate rises
    /// linearly from 0 to its value before the annealing starts. Default 0.05 (SGD at 0.1
    /// from the first step is what it smooths); 0 for none.
    pub warmup: f64,
    /// Share of each label's images held out for validation (at least one per label), but
    /// no more than about `eval_queries` images in all: held-out images no query uses would
    /// be training images lost. Default 0.1; with the default 1,000 queries a database of
    /// 60,000 labelled images holds out 1,000 of them, not 6,000.
    pub validation_share: f64,
    /// Validation queries evaluated (a seeded sample of the held-out split).
    pub eval_queries: usize,
    /// Gallery images the queries search (a seeded sample of the training split).
    pub eval_gallery: usize,
    /// Evaluate after every epoch (for the curve and the decay rule); otherwise only at the end.
    pub eval_every_epoch: bool,
    /// Data augmentation.
    pub augment: Augment,
    /// For a trainable with frozen pretrained layers (a head on EfficientNet-Lite0): how many
    /// views of each training image the feature bank holds, the first unaugmented, the others
    /// drawn from [`TrainOptions::augment`]. Fewer when they would not fit in 1 GiB or, with
    /// [`TrainOptions::max_minutes`], when the next view would end past half of the budget.
    /// Default 4.
    pub feature_views: usize,
    /// The seed of everything random in the job.
    pub seed: u64,
    /// Loader threads.
    pub workers: usize,
    /// Continue from the stored checkpoint of an interrupted job with the same plugin,
    /// configuration and options. Without it a new job discards any old checkpoint.
    pub resume: bool,
    /// When the new model becomes the active one ([`Activate::IfBetter`] by default: never a
    /// worse database without a word). It is stored and listed either way;
    /// [`TrainReport::activated`] and [`TrainReport::decision`] say what happened and why.
    pub activate: Activate,
    /// Weights (safetensors) the trainable starts from when the job does not resume: the
    /// pretrained backbone of a preset that needs one (`fused`'s `effnet` takes the
    /// EfficientNet-Lite0 file that `efficientnet-lite0` runs on) or an earlier model's
    /// weights to fine-tune. `None`: the plugin's own initialisation.
    pub initial_weights: Option<Arc<Vec<u8>>>,
    /// Called with progress reports (from the job's thread).
    pub progress: Option<ProgressFn>,
    /// Cancels the job from another thread.
    pub cancel: Option<CancelToken>,
}

impl std::fmt::Debug for TrainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            config: String::new(),
            epochs: 10,
            max_minutes: None,
            batch_size: 128,
            per_label: 8,
            random: 8,
            steps_per_epoch: None,
            // Measured on Fashion-MNIST (docs/benchmarks.md): the supervised contrastive loss
            // over the whole batch learned far more in the same minutes than OPMS pairs with
            // the contrastive loss.
            miner: "supcon".into(),
            proxy_weight: 1.0,
            // Measured on Fashion-MNIST (docs/benchmarks.md): with the proxy loss, SGD with
            // weight decay and a short warm-up beat Adam 1e-3 by about a point.
            optimiser: OptimiserKind::DEFAULT_SGD,
            lr_decay: None,
            cosine: true,
            warmup: 0.05,
            validation_share: 0.1,
            eval_queries: 1000,
            eval_gallery: 10_000,
            eval_every_epoch: true,
            augment: Augment::flips(),
            feature_views: 4,
            seed: 0,
            workers: 1,
            resume: false,
            activate: Activate::IfBetter,
            initial_weights: None,
            progress: None,
            cancel: None,
        }
    }
}

impl TrainOptions {
    /// Sets the plugin configuration (preset).
    pub fn config(mut self, config: impl Into<String>) -> Self {
        self.config = config.into();
        self
    }

    /// Sets the number of epochs.
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }

    /// Sets the training-time budget in minutes.
    pub fn max_minutes(mut self, minutes: f64) -> Self {
        self.max_minutes = Some(minutes);
        self
    }

    /// Sets the batch shape: `batch_size` images, `per_label` of each label, `random` others.
    pub fn batch(mut self, batch_size: usize, per_label: usize, random: usize) -> Self {
        self.batch_size = batch_size;
        self.per_label = per_label;
        self.random = random;
        self
    }

    /// Sets the steps per epoch.
    pub fn steps_per_epoch(mut self, steps: usize) -> Self {
        self.steps_per_epoch = Some(steps);
        self
    }

    /// Sets the miner by name.
    pub fn miner(mut self, name: impl Into<String>) -> Self {
        self.miner = name.into();
        self
    }

    /// Sets the weight of the proxy loss (0 turns it off).
    pub fn proxy_weight(mut self, weight: f64) -> Self {
        self.proxy_weight = weight;
        self
    }

    /// Sets the optimiser.
    pub fn optimiser(mut self, optimiser: OptimiserKind) -> Self {
        self.optimiser = optimiser;
        self
    }

    /// Turns on the MLP paper's learning-rate decay with `alpha`.
    pub fn lr_decay(mut self, alpha: f64) -> Self {
        self.lr_decay = Some(alpha);
        self
    }

    /// Turns the cosine annealing of the learning rate on or off.
    pub fn cosine(mut self, yes: bool) -> Self {
        self.cosine = yes;
        self
    }

    /// Sets the warm-up share of the run (see [`TrainOptions::warmup`]).
    pub fn warmup(mut self, share: f64) -> Self {
        self.warmup = share;
        self
    }

    /// Sets the number of feature-bank views (see [`TrainOptions::feature_views`]).
    pub fn feature_views(mut self, views: usize) -> Self {
        self.feature_views = views;
        self
    }

    /// Sets the augmentation.
    pub fn augment(mut self, augment: Augment) -> Self {
        self.augment = augment;
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the evaluation sizes (validation queries, gallery images).
    pub fn eval_sizes(mut self, queries: usize, gallery: usize) -> Self {
        self.eval_queries = queries;
        self.eval_gallery = gallery;
        self
    }

    /// Resumes an interrupted job from its checkpoint.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// When the new model becomes the active one (see [`Activate`]).
    pub fn activate(mut self, activate: Activate) -> Self {
        self.activate = activate;
        self
    }

    /// Sets the loader threads.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Starts the trainable from these weights (safetensors; see
    /// [`TrainOptions::initial_weights`]).
    pub fn initial_weights(mut self, weights: Vec<u8>) -> Self {
        self.initial_weights = Some(Arc::new(weights));
        self
    }

    /// Sets the progress callback.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Sets the cancel token.
    pub fn cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// The options that decide a job's course, as text: a checkpoint resumes only under the
    /// same fingerprint.
    pub(crate) fn fingerprint(&self) -> String {
        // "/capped": the split rule changed (at most `eval_queries` held out); "/labels": whole
        // labels held out when labels are small, and batches planned without repeats. So
        // checkpoints of an older rule, whose split or plan differs under the same options, do
        // not resume. "init": the initial weights' hash (they decide the run as much as the
        // seed).
        let init = self
            .initial_weights
            .as_ref()
            .map(|w| blake3::hash(w).to_hex().to_string());
        format!(
            "config={:?} epochs={} batch={}/{}/{} steps={:?} miner={} proxy={} optimiser={:?} decay={:?} \
             cosine={} warmup={} validation={}/capped/labels eval={}/{}/{} augment={} seed={} init={:?}{}",
            self.config,
            self.epochs,
            self.batch_size,
            self.per_label,
            self.random,
            self.steps_per_epoch,
            self.miner,
            self.proxy_weight,
            self.optimiser,
            self.lr_decay,
            self.cosine,
            self.warmup,
            self.validation_share,
            self.eval_queries,
            self.eval_gallery,
            self.eval_every_epoch,
            self.augment.fingerprint(),
            self.seed,
            init,
            // Only where it matters (frozen layers), and only when not the default: older
            // checkpoints keep their fingerprint.
            if self.feature_views == 4 {
                String::new()
            } else {
                format!(" views={}", self.feature_views)
            }
        )
    }
}

/// One epoch of a job's history.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// Epoch (from 0).
    pub epoch: usize,
    /// Training minutes at the end of the epoch.
    pub minutes: f64,
    /// Validation metrics after the epoch (when evaluated).
    pub validation: Option<Metrics>,
}

/// What a finished job did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The new model version.
    pub version: u32,
    /// Whether it is now the active model.
    pub activated: bool,
    /// Why it was activated or not, in words (see [`Activate::decide`]).
    pub decision: String,
    /// The extractor plugin and configuration trained.
    pub extractor: String,
    /// Its configuration.
    pub config: String,
    /// The miner used.
    pub miner: String,
    /// How the held-out split was made: some images of every label, or whole labels (when
    /// most labels have fewer images than [`TrainOptions::per_label`]).
    pub holdout: Holdout,
    /// The active model's metrics on the held-out split before the job.
    pub before: Metrics,
    /// The new model's metrics on the same queries and gallery.
    pub after: Metrics,
    /// Epochs completed (the last may be partial when the time budget ran out).
    pub epochs: usize,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Pairs the loss saw.
    pub pairs_seen: u64,
    /// Training images processed.
    pub images_seen: u64,
    /// Seconds of training (steps and loading; not evaluation or re-embedding).
    pub train_seconds: f64,
    /// Seconds from start to switch.
    pub total_seconds: f64,
    /// Share of training time the trainer waited for the loader threads.
    pub loader_wait_share: f64,
    /// The epoch this run resumed from, if it resumed.
    pub resumed_from: Option<usize>,
    /// Training images removed from the database while the job ran, skipped where their
    /// batches came (counted once per batch that wanted them).
    pub vanished: usize,
    /// Per-epoch history (validation curve).
    pub history: Vec<EpochRecord>,
    /// For a job asked for `"auto"`: why it chose [`TrainReport::extractor`] and
    /// [`TrainReport::config`], in words. `None` when the caller named the extractor.
    pub chosen: Option<String>,
    /// Seconds spent embedding every stored image with the new model.
    pub embed_seconds: f64,
    /// Whether those embeddings were computed from the active model's stored ones, without
    /// decoding the images (a head on the active model's frozen features:
    /// `lookalike_plugin::Extractor::derived_from`).
    pub embedded_from_features: bool,
    /// For a trainable with frozen layers: the training and validation images whose
    /// unaugmented features were read from the active model's stored embeddings instead of
    /// being computed (`lookalike_plugin::Trainable::frozen_features_id`).
    pub stored_features: usize,
}
