//! `train_extractor("auto")`: the best trainable extractor for the database at hand.
//!
//! * The active model is EfficientNet-Lite0 (pretrained or already fine-tuned), or the job's
//!   [`TrainOptions::initial_weights`] are EfficientNet-Lite0 weights: a head trained on its
//!   frozen features (`efficientnet-lite0`, configuration `head`), starting from those
//!   weights. Pretrained features are the best start for colour photos and drawings.
//! * Otherwise, the labelled images are greyscale and small (a sample of up to
//!   [`SAMPLE`] images, every one with R = G = B and no side over 64 pixels): SimNet
//!   `cpu-gray` (the Fashion-MNIST recipe).
//! * Otherwise SimNet `cpu` from scratch.
//!
//! Options the caller left at their defaults are set to what suits the choice (the head:
//! augmented views for the feature bank, Adam, more epochs); options the caller set are kept.

use lookalike_plugin::InputSpec;

use super::{Augment, OptimiserKind, TrainOptions};
use crate::error::{Error, Result};
use crate::Db;

/// Labelled images looked at to tell greyscale and small images apart.
pub(crate) const SAMPLE: usize = 64;
/// The largest side of a "small" image.
const SMALL_SIDE: u32 = 64;

/// What `auto` chose: the extractor, the options to train it with and why.
pub(crate) struct Choice {
    pub extractor: String,
    pub options: TrainOptions,
    pub reason: String,
}

/// Chooses for `db`; `options` are the caller's.
pub(crate) fn choose(db: &Db, options: TrainOptions) -> Result<Choice> {
    const EFFNET: &str = "efficientnet-lite0";
    let defaults = TrainOptions::default();
    let active = db.active_model();
    let effnet_here = db.registry().plugin(EFFNET).is_ok();
    let given_effnet = options
        .initial_weights
        .as_ref()
        .is_some_and(|w| effnet_here && is_effnet(db, w));
    let runs_effnet = effnet_here && active.extractor == EFFNET;
    if runs_effnet && options.initial_weights.is_some() && !given_effnet {
        return Err(Error::InvalidArgument(
            "the weights given are not EfficientNet-Lite0's, and auto trains a head on the \
             EfficientNet-Lite0 model this database runs; give no weights (the active model's \
             are used), or name the extractor those weights belong to instead of auto"
                .into(),
        ));
    }
    if runs_effnet || given_effnet {
        let mut o = options;
        let reason = if given_effnet {
            "EfficientNet-Lite0 weights were given: a head trained on their frozen features"
        } else {
            o.initial_weights = Some(std::sync::Arc::new(db.active_weights()));
            "the active model is EfficientNet-Lite0: a head trained on its frozen features, \
             starting from the active model"
        };
        o.config = "head".into();
        if o.augment == defaults.augment {
            o.augment = Augment::colour(EFFNET_SIDE);
        }
        if o.optimiser == defaults.optimiser {
            o.optimiser = OptimiserKind::Adam { lr: HEAD_LR };
        }
        if o.epochs == defaults.epochs {
            o.epochs = HEAD_EPOCHS;
        }
        if o.warmup == defaults.warmup {
            o.warmup = 0.0;
        }
        return Ok(Choice {
            extractor: EFFNET.into(),
            options: o,
            reason: reason.into(),
        });
    }
    let (grey, small, looked) = grey_and_small(db)?;
    let mut o = options;
    let reason = if grey && small {
        o.config = "cpu-gray".into();
        format!(
            "{looked} labelled images looked at are greyscale and at most {SMALL_SIDE} pixels: \
             SimNet cpu-gray from scratch"
        )
    } else {
        o.config = "cpu".into();
        format!(
            "{looked} labelled images looked at are {} and no pretrained EfficientNet-Lite0 \
             runs here: SimNet cpu from scratch",
            match (grey, small) {
                (true, _) => "greyscale but larger than 64 pixels",
                (false, true) => "in colour",
                (false, false) => "in colour and larger than 64 pixels",
            }
        )
    };
    Ok(Choice {
        extractor: "simnet".into(),
        options: o,
        reason,
    })
}

/// The head's learning rate (Adam), measured on the icon-theme set (docs/training.md).
const HEAD_LR: f64 = 1e-3;
/// The head's epochs: each is a pass over the feature bank, seconds long.
const HEAD_EPOCHS: usize = 40;

/// EfficientNet-Lite0's input side.
const EFFNET_SIDE: u32 = 224;

/// Whether `weights` build the pretrained EfficientNet-Lite0.
fn is_effnet(db: &Db, weights: &[u8]) -> bool {
    db.registry()
        .plugin("efficientnet-lite0")
        .is_ok_and(|p| p.build("", Some(weights)).is_ok())
}

/// Whether a sample of the labelled images is all greyscale and all small, and its size.
fn grey_and_small(db: &Db) -> Result<(bool, bool, usize)> {
    let labelled = db.labelled()?;
    let step = (labelled.len() / SAMPLE).max(1);
    let spec = InputSpec::rgb(16, 16);
    let (mut grey, mut small, mut looked) = (true, true, 0);
    for (id, _) in labelled.iter().step_by(step).take(SAMPLE) {
        let Some(thumb) = db.store().thumb(*id, &spec)? else {
            continue; // removed meanwhile
        };
        looked += 1;
        small &= thumb.width.max(thumb.height) <= SMALL_SIDE;
        grey &= thumb
            .into_pixels()
            .chunks_exact(3)
            .all(|p| p[0].abs_diff(p[1]) <= 2 && p[1].abs_diff(p[2]) <= 2);
    }
    Ok((grey && looked > 0, small && looked > 0, looked))
}
