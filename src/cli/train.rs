//! `lookalike train`: a training job with a progress bar per phase, and its report.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use lookalike::Db;

use super::{existing, out};

/// Arguments of `lookalike train`.
#[derive(Debug, clap::Args)]
pub(super) struct TrainArgs {
    /// The database directory.
    db: PathBuf,
    /// The extractor plugin to train (for example simnet or fused), or auto: the job chooses
    /// for the database (a head on EfficientNet-Lite0 features where that model runs or its
    /// weights are given with --weights, SimNet otherwise) and says why.
    extractor: String,
    /// The plugin's configuration (preset).
    #[arg(long, default_value = "")]
    config: String,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Stop after this many minutes of training, keeping the weights reached.
    #[arg(long)]
    minutes: Option<f64>,
    /// Pair miner: supcon (the whole batch, supervised contrastive loss), opms, naive,
    /// balanced, one-vs-many.
    #[arg(long, default_value = "supcon")]
    miner: String,
    /// Weight of the proxy loss (one learned vector per label) added to the miner's
    /// objective; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    proxy_weight: f64,
    /// Learning rate (default 0.1 for SGD, 0.001 with --adam).
    #[arg(long)]
    lr: Option<f64>,
    /// Use Adam instead of SGD with Nesterov momentum 0.9.
    #[arg(long)]
    adam: bool,
    /// SGD's L2 weight decay (default 1e-4; 0 for none).
    #[arg(long, conflicts_with = "adam")]
    weight_decay: Option<f64>,
    /// Share of the run over which the rate warms up from 0 (default 0.05).
    #[arg(long)]
    warmup: Option<f64>,
    /// Keep the learning rate constant (no cosine annealing).
    #[arg(long)]
    constant_lr: bool,
    /// Seed of the job.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Resume the interrupted job stored in the database (same options).
    #[arg(long)]
    resume: bool,
    /// Start from these weights (safetensors): a pretrained backbone for presets that need one
    /// (`fused --config effnet` takes the EfficientNet-Lite0 file), or a model to fine-tune.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// When the new model becomes active: if-better (it must beat the active model's held-out
    /// accuracy@1, mAP@10 breaking a tie), always, or never (stored only; `use` activates it).
    #[arg(long, value_enum, default_value_t = ActivateArg::IfBetter)]
    activate: ActivateArg,
    /// The same as --activate never (kept for scripts written before --activate).
    #[arg(long, hide = true)]
    no_activate: bool,
    /// The default now (kept for scripts written before --activate).
    #[arg(long, hide = true)]
    if_better: bool,
}

/// `--activate`'s values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ActivateArg {
    IfBetter,
    Always,
    Never,
}

pub(super) fn run(a: TrainArgs, json: bool) -> lookalike::Result<ExitCode> {
    let TrainArgs {
        db,
        extractor,
        config,
        epochs,
        minutes,
        miner,
        proxy_weight,
        lr,
        adam,
        weight_decay,
        warmup,
        constant_lr,
        seed,
        resume,
        weights,
        activate,
        no_activate,
        if_better: _,
    } = a;
    let activate = match (no_activate, activate) {
        (true, _) | (_, ActivateArg::Never) => lookalike::Activate::Never,
        (_, ActivateArg::Always) => lookalike::Activate::Always,
        (_, ActivateArg::IfBetter) => lookalike::Activate::IfBetter,
    };
    let db = existing(&db)?;
    let mut optimiser = if adam {
        lookalike::OptimiserKind::DEFAULT_ADAM
    } else {
        lookalike::OptimiserKind::DEFAULT_SGD
    };
    if let Some(lr) = lr {
        optimiser = optimiser.with_lr(lr);
    }
    if let (Some(wd), lookalike::OptimiserKind::SgdNesterov { weight_decay, .. }) =
        (weight_decay, &mut optimiser)
    {
        *weight_decay = wd;
    }
    let defaults = lookalike::TrainOptions::default();
    let warmup = warmup.unwrap_or(defaults.warmup);
    let mut opts = defaults
        .warmup(warmup)
        .config(config)
        .epochs(epochs)
        .miner(miner)
        .proxy_weight(proxy_weight)
        .optimiser(optimiser)
        .cosine(!constant_lr)
        .seed(seed)
        .resume(resume)
        .activate(activate);
    if let Some(m) = minutes {
        opts = opts.max_minutes(m);
    }
    if let Some(path) = weights {
        let bytes = std::fs::read(&path).map_err(|source| lookalike::Error::Io { path, source })?;
        opts = opts.initial_weights(bytes);
    }
    train(&db, &extractor, opts, json).map(|()| ExitCode::SUCCESS)
}

/// Runs a training job with a progress bar per phase; prints the report.
fn train(
    db: &Db,
    extractor: &str,
    opts: lookalike::TrainOptions,
    json: bool,
) -> lookalike::Result<()> {
    use lookalike::Phase;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let opts = opts.on_progress(move |p| match p.phase {
        Phase::Training => {
            b.set_prefix(format!("epoch {}/{}", p.epoch + 1, p.epochs));
            b.set_length(p.steps as u64);
            b.set_position(p.step as u64 + 1);
            let lambda = p
                .lambda
                .map(|l| format!(" lambda {l:.2}"))
                .unwrap_or_default();
            b.set_message(format!(
                "loss {:.4}{lambda} {:.0} images/s {:.0} pairs/s",
                p.loss, p.images_per_second, p.pairs_per_second
            ));
        }
        Phase::Baseline => {
            if let (Some(m), true) = (&p.validation, json) {
                out!(
                    "{}",
                    serde_json::json!({"epoch": 0, "accuracy_at_1": m.accuracy_at_1,
                                       "map_at_10": m.map_at_10})
                );
            } else if let Some(m) = &p.validation {
                b.suspend(|| {
                    out!(
                        "before training: validation accuracy@1 {:.2} %, mAP@10 {:.2} %",
                        m.accuracy_at_1 * 100.0,
                        m.map_at_10 * 100.0
                    )
                });
            } else {
                b.set_prefix("evaluating");
                b.set_message("the active model");
            }
        }
        Phase::Evaluating => {
            if let (Some(m), true) = (&p.validation, json) {
                out!(
                    "{}",
                    serde_json::json!({"epoch": p.epoch + 1, "accuracy_at_1": m.accuracy_at_1,
                                       "map_at_10": m.map_at_10})
                );
            } else if let Some(m) = &p.validation {
                b.suspend(|| {
                    out!(
                        "epoch {}: validation accuracy@1 {:.2} %, mAP@10 {:.2} %",
                        p.epoch + 1,
                        m.accuracy_at_1 * 100.0,
                        m.map_at_10 * 100.0
                    )
                });
            } else {
                b.set_prefix("evaluating");
                b.set_message("");
            }
        }
        Phase::Features => {
            b.set_prefix("features");
            b.set_length(p.embedded.1 as u64);
            b.set_position(p.embedded.0 as u64);
            b.set_message("images through the frozen layers");
        }
        Phase::Embedding => {
            b.set_prefix("embedding");
            b.set_length(p.embedded.1 as u64);
            b.set_position(p.embedded.0 as u64);
            b.set_message("images");
        }
    });
    let r = db.train_extractor_with(extractor, opts)?;
    bar.finish_and_clear();
    if json {
        out!(
            "{}",
            serde_json::json!({"model": {
                "version": r.version, "extractor": r.extractor, "config": r.config,
                "miner": r.miner, "activated": r.activated, "decision": r.decision,
                "before": {"accuracy_at_1": r.before.accuracy_at_1, "map_at_10": r.before.map_at_10},
                "after": {"accuracy_at_1": r.after.accuracy_at_1, "map_at_10": r.after.map_at_10,
                          "queries": r.after.queries},
                "holdout": r.holdout.as_str(),
                "epochs": r.epochs, "steps": r.steps, "pairs": r.pairs_seen,
                "train_seconds": r.train_seconds, "total_seconds": r.total_seconds,
                "vanished": r.vanished, "chosen": r.chosen,
                "embed_seconds": r.embed_seconds,
                "embedded_from_features": r.embedded_from_features,
                "stored_features": r.stored_features,
            }})
        );
        return Ok(());
    }
    if let Some(why) = &r.chosen {
        out!("auto chose {} {:?}: {why}", r.extractor, r.config);
    }
    out!(
        "model v{} ({} {:?}, miner {}) {}",
        r.version,
        r.extractor,
        r.config,
        r.miner,
        r.decision
    );
    out!(
        "held-out accuracy@1 {:.2} % -> {:.2} %, mAP@10 {:.2} % -> {:.2} % ({} queries, {})",
        r.before.accuracy_at_1 * 100.0,
        r.after.accuracy_at_1 * 100.0,
        r.before.map_at_10 * 100.0,
        r.after.map_at_10 * 100.0,
        r.after.queries,
        match r.holdout {
            lookalike::Holdout::Images => "held-out images of every label",
            lookalike::Holdout::Labels => "held-out labels, each against its other images",
        }
    );
    out!(
        "{} epochs, {} steps, {} pairs in {:.1} min of training ({:.1} min in all)",
        r.epochs,
        r.steps,
        r.pairs_seen,
        r.train_seconds / 60.0,
        r.total_seconds / 60.0
    );
    if r.stored_features > 0 {
        out!(
            "features of {} images read from the active model's stored embeddings",
            r.stored_features
        );
    }
    out!(
        "stored images embedded with the new model in {:.1} s{}",
        r.embed_seconds,
        if r.embedded_from_features {
            " (from the active model's stored features: no image decoded)"
        } else {
            ""
        }
    );
    if r.vanished > 0 {
        out!(
            "{} training images were removed while the job ran and were skipped",
            r.vanished
        );
    }
    Ok(())
}
