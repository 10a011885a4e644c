//! Scorer training jobs ([`crate::Db::train_scorer`]): the MLP paper's similarity network on
//! |x1 - x2| of the active model's stored embeddings. Balanced pairs (50/50, balanced over
//! labels, drawn afresh each epoch from the training images; §4.2) mixed with near-neighbour
//! pairs (an anchor and one of its nearest training images: the pairs re-ranking asks about,
//! which random pairs almost never are), Nesterov SGD (momentum 0.8)
//! with the paper's optional decay rule, and an evaluation that follows the paper's Table 2
//! when labels are held out of training entirely: accuracy for similar/dissimilar pairs of seen
//! and unseen labels, plus ROC-AUC and the ROC curve over every validation pair.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::nn::{Optimiser, SgdNesterov};
use lookalike_plugin::{PairScorer, TrainableScorer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::eval;
use super::loader::derive_seed;
use super::CancelToken;
use crate::error::{Error, Result};
use crate::{Db, ImageId};

/// How a scorer job runs.
#[derive(Debug, Clone)]
pub struct ScorerTrainOptions {
    /// The plugin's configuration (`""` or `hidden=N` for mlp-diff).
    pub config: String,
    /// Epochs.
    pub epochs: usize,
    /// Training pairs drawn per epoch.
    pub pairs_per_epoch: usize,
    /// Share of each epoch's pairs taken from near neighbours: an anchor and one of its
    /// `neighbours` nearest training images under the active model, similar or not as their
    /// labels say. These are the pairs re-ranking ([`crate::Query::rerank`]) asks the scorer
    /// about; the rest are the paper's balanced pairs (half similar). 0 gives the paper's
    /// recipe alone.
    pub neighbour_share: f64,
    /// How many nearest training images of an anchor its neighbour pairs come from.
    pub neighbours: usize,
    /// Anchors (a seeded sample of the training images) whose neighbours are searched once at
    /// the start of the job.
    pub neighbour_anchors: usize,
    /// Pairs per optimiser step.
    pub batch: usize,
    /// Learning rate of SGD with Nesterov momentum.
    pub lr: f64,
    /// Momentum (the paper: 0.8).
    pub momentum: f64,
    /// The MLP paper's decay rule with this alpha (the paper used 0.01 for the scorer).
    pub lr_decay: Option<f64>,
    /// Labels kept out of training entirely (the "unseen" classes of the paper's Table 2).
    pub held_out_labels: Vec<String>,
    /// Share of each seen label's images held out for validation.
    pub validation_share: f64,
    /// Validation pairs per case.
    pub pairs_per_case: usize,
    /// Seed.
    pub seed: u64,
    /// Cancels the job.
    pub cancel: Option<CancelToken>,
}

impl Default for ScorerTrainOptions {
    fn default() -> Self {
        ScorerTrainOptions {
            config: String::new(),
            epochs: 10,
            pairs_per_epoch: 20_000,
            neighbour_share: 0.5,
            neighbours: 20,
            neighbour_anchors: 20_000,
            batch: 256,
            lr: 0.05,
            momentum: 0.8,
            lr_decay: None,
            held_out_labels: Vec::new(),
            validation_share: 0.1,
            pairs_per_case: 2000,
            seed: 0,
            cancel: None,
        }
    }
}

/// One case of the paper's Table 2.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseAccuracy {
    /// `similar, seen`, `dissimilar, seen`, `similar, unseen`, `dissimilar, unseen`,
    /// `dissimilar, seen and unseen`.
    pub case: &'static str,
    /// Pairs evaluated.
    pub pairs: usize,
    /// Share classified right at P(same) 0.5.
    pub accuracy: f64,
}

/// What a scorer job produced.
#[derive(Debug, Clone)]
pub struct ScorerReport {
    /// The trained scorer, ready for [`crate::Query::rerank`] and [`crate::Db::same`].
    pub scorer: Arc<dyn PairScorer>,
    /// Its weights (safetensors): `ScorerPlugin::build(dim, config, Some(&weights))` restores
    /// it.
    pub weights: Vec<u8>,
    /// The scorer plugin and configuration.
    pub plugin: String,
    /// Its configuration.
    pub config: String,
    /// The embedding model version it was trained on (the active one).
    pub model_version: u32,
    /// Accuracy over every validation pair at P(same) 0.5.
    pub accuracy: f64,
    /// Area under the ROC curve over every validation pair.
    pub roc_auc: f64,
    /// The ROC curve: (false positive rate, true positive rate) points.
    pub roc: Vec<(f64, f64)>,
    /// Per-case accuracy (cases without pairs are left out).
    pub cases: Vec<CaseAccuracy>,
    /// Validation accuracy on seen labels after each epoch.
    pub history: Vec<f64>,
    /// Training pairs seen.
    pub pairs_seen: u64,
    /// Seconds in all.
    pub seconds: f64,
}

type Pair = (usize, usize, bool);

/// Balanced pairs over `groups` (indices into the embedding table, by label): half similar
/// (a label drawn uniformly, two different images), half dissimilar (two different labels).
fn balanced_pairs(groups: &[Vec<usize>], n: usize, rng: &mut StdRng) -> Vec<Pair> {
    let with_two: Vec<&Vec<usize>> = groups.iter().filter(|g| g.len() >= 2).collect();
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        if k % 2 == 0 && !with_two.is_empty() {
            let g = with_two[rng.random_range(0..with_two.len())];
            let i = rng.random_range(0..g.len());
            let mut j = rng.random_range(0..g.len() - 1);
            if j >= i {
                j += 1;
            }
            out.push((g[i], g[j], true));
        } else if groups.len() >= 2 {
            let a = rng.random_range(0..groups.len());
            let mut b = rng.random_range(0..groups.len() - 1);
            if b >= a {
                b += 1;
            }
            let (ga, gb) = (&groups[a], &groups[b]);
            if !ga.is_empty() && !gb.is_empty() {
                out.push((
                    ga[rng.random_range(0..ga.len())],
                    gb[rng.random_range(0..gb.len())],
                    false,
                ));
            }
        }
    }
    out.shuffle(rng);
    out
}

/// Pairs between two pools of groups: one image from a group of `a`, one from a group of `b`.
fn cross_pairs(a: &[Vec<usize>], b: &[Vec<usize>], n: usize, rng: &mut StdRng) -> Vec<Pair> {
    let (a, b): (Vec<&Vec<usize>>, Vec<&Vec<usize>>) = (
        a.iter().filter(|g| !g.is_empty()).collect(),
        b.iter().filter(|g| !g.is_empty()).collect(),
    );
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    (0..n)
        .map(|_| {
            let (ga, gb) = (
                a[rng.random_range(0..a.len())],
                b[rng.random_range(0..b.len())],
            );
            (
                ga[rng.random_range(0..ga.len())],
                gb[rng.random_range(0..gb.len())],
                false,
            )
        })
        .collect()
}

/// P(same) of `scorer` for `pairs` of rows of `table`.
fn scores(scorer: &dyn PairScorer, table: &[Vec<f32>], pairs: &[Pair]) -> Result<Vec<f32>> {
    let dim = scorer.dim();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(1024) {
        let (a, b) = rows(table, chunk, dim)?;
        let p = scorer
            .score(&a, &b)
            .map_err(|e| Error::plugin(scorer.name(), e))?;
        out.extend(
            p.to_vec1::<f32>()
                .map_err(|e| Error::plugin(scorer.name(), e.into()))?,
        );
    }
    Ok(out)
}

fn rows(table: &[Vec<f32>], pairs: &[Pair], dim: usize) -> Result<(Tensor, Tensor)> {
    let to = |e: lookalike_plugin::candle_core::Error| Error::plugin("scorer training", e.into());
    let a: Vec<f32> = pairs
        .iter()
        .flat_map(|p| table[p.0].iter().copied())
        .collect();
    let b: Vec<f32> = pairs
        .iter()
        .flat_map(|p| table[p.1].iter().copied())
        .collect();
    Ok((
        Tensor::from_vec(a, (pairs.len(), dim), &Device::Cpu).map_err(to)?,
        Tensor::from_vec(b, (pairs.len(), dim), &Device::Cpu).map_err(to)?,
    ))
}

fn accuracy(scores: &[f32], pairs: &[Pair]) -> f64 {
    if pairs.is_empty() {
        return f64::NAN;
    }
    let right = scores
        .iter()
        .zip(pairs)
        .filter(|(s, p)| (**s >= 0.5) == p.2)
        .count();
    right as f64 / pairs.len() as f64
}

/// Runs a scorer job; see [`crate::Db::train_scorer`].
pub(crate) fn train_scorer(db: &Db, name: &str, opts: ScorerTrainOptions) -> Result<ScorerReport> {
    let _guard = db.start_job()?;
    let started = Instant::now();
    let plugin = crate::extractors::builtin_scorers()
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown scorer {name:?}; known: {}",
                crate::extractors::builtin_scorers()
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if opts.epochs == 0 || opts.batch == 0 || opts.pairs_per_epoch == 0 {
        return Err(Error::InvalidArgument(
            "epochs, batch and pairs_per_epoch must be at least 1".into(),
        ));
    }
    let model = db.active_model();
    // The active model's embeddings of every labelled image, grouped by label.
    let labelled = db.labelled()?;
    let ids: Vec<ImageId> = labelled.iter().map(|x| x.0).collect();
    let label_of: BTreeMap<ImageId, &String> = labelled.iter().map(|(i, l)| (*i, l)).collect();
    let mut table = Vec::new();
    let mut by_label: BTreeMap<String, Vec<(ImageId, usize)>> = BTreeMap::new();
    for (id, v) in db.active_embeddings(&ids)? {
        if let Some(l) = label_of.get(&id) {
            by_label
                .entry((*l).clone())
                .or_default()
                .push((id, table.len()));
            table.push(v);
        }
    }
    for l in &opts.held_out_labels {
        if !by_label.contains_key(l) {
            return Err(Error::InvalidArgument(format!(
                "held-out label {l:?} is not in the database"
            )));
        }
    }
    let mut rng = StdRng::seed_from_u64(derive_seed(opts.seed, 0, 0, 7));
    let (mut train, mut val, mut unseen) = (Vec::new(), Vec::new(), Vec::new());
    for (l, mut items) in by_label {
        if opts.held_out_labels.contains(&l) {
            unseen.push(items.into_iter().map(|x| x.1).collect::<Vec<_>>());
            continue;
        }
        items.shuffle(&mut rng);
        let n_val = ((items.len() as f64 * opts.validation_share).round() as usize)
            .clamp(usize::from(items.len() >= 3), items.len().saturating_sub(2));
        val.push(items[..n_val].iter().map(|x| x.1).collect::<Vec<_>>());
        train.push(items[n_val..].iter().map(|x| x.1).collect::<Vec<_>>());
    }
    if train.iter().filter(|g| g.len() >= 2).count() < 2 {
        return Err(Error::NotEnoughData(
            "a scorer needs at least two seen labels with two or more training images each".into(),
        ));
    }
    // Validation pairs, fixed for the job: the paper's five cases.
    let half = opts.pairs_per_case;
    let seen_pairs = balanced_pairs(&val, 2 * half, &mut rng);
    let unseen_pairs = balanced_pairs(&unseen, 2 * half, &mut rng);
    let mixed = cross_pairs(&val, &unseen, half, &mut rng);
    let case = |pairs: &[Pair], similar: bool| -> Vec<Pair> {
        pairs.iter().copied().filter(|p| p.2 == similar).collect()
    };
    let cases: Vec<(&'static str, Vec<Pair>)> = vec![
        ("similar, seen", case(&seen_pairs, true)),
        ("dissimilar, seen", case(&seen_pairs, false)),
        ("similar, unseen", case(&unseen_pairs, true)),
        ("dissimilar, unseen", case(&unseen_pairs, false)),
        ("dissimilar, seen and unseen", mixed),
    ];
    if seen_pairs.is_empty() {
        return Err(Error::NotEnoughData(
            "no validation pairs: too few images per label to hold some out".into(),
        ));
    }

    let trainable: Box<dyn TrainableScorer> =
        lookalike_plugin::nn::with_init_seed(opts.seed, || {
            plugin.trainable(model.dim, &opts.config, None)
        })
        .ok_or_else(|| Error::NotTrainable(name.to_string()))?
        .map_err(|e| Error::plugin(name, e))?;
    let mut optimiser = SgdNesterov::new(trainable.vars(), opts.lr, opts.momentum, 0.0);
    // Near-neighbour pairs: each sampled anchor's nearest training images, found once.
    let mut group_of = vec![usize::MAX; table.len()];
    for (g, rows) in train.iter().enumerate() {
        for r in rows {
            group_of[*r] = g;
        }
    }
    let pool: Vec<usize> = train.iter().flatten().copied().collect();
    let mut neighbour_pairs = ((opts.pairs_per_epoch as f64 * opts.neighbour_share.clamp(0.0, 1.0))
        .round() as usize)
        .min(opts.pairs_per_epoch);
    let neighbourhoods: Vec<(usize, Vec<usize>)> = if neighbour_pairs > 0 && opts.neighbours > 0 {
        let mut anchors = pool.clone();
        anchors.shuffle(&mut rng);
        anchors.truncate(opts.neighbour_anchors.max(1));
        let queries: Vec<&[f32]> = anchors.iter().map(|a| table[*a].as_slice()).collect();
        let gallery: Vec<&[f32]> = pool.iter().map(|r| table[*r].as_slice()).collect();
        let near = eval::nearest(&queries, &gallery, opts.neighbours, model.metric, |q, g| {
            pool[g] == anchors[q]
        })?;
        anchors
            .iter()
            .zip(near)
            .filter(|(_, n)| !n.is_empty())
            .map(|(a, n)| (*a, n.into_iter().map(|g| pool[g]).collect()))
            .collect()
    } else {
        Vec::new()
    };
    if neighbourhoods.is_empty() {
        neighbour_pairs = 0;
    }
    let c_err = |e: lookalike_plugin::candle_core::Error| Error::plugin(name, e.into());
    let mut history = Vec::new();
    let mut since_decay = 0;
    let mut pairs_seen = 0u64;
    for epoch in 0..opts.epochs {
        let mut rng = StdRng::seed_from_u64(derive_seed(opts.seed, epoch, 0, 8));
        let mut pairs = balanced_pairs(&train, opts.pairs_per_epoch - neighbour_pairs, &mut rng);
        for _ in 0..neighbour_pairs {
            let (a, n) = &neighbourhoods[rng.random_range(0..neighbourhoods.len())];
            let b = n[rng.random_range(0..n.len())];
            pairs.push((*a, b, group_of[*a] == group_of[b]));
        }
        pairs.shuffle(&mut rng);
        for (step, chunk) in pairs.chunks(opts.batch).enumerate() {
            if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(Error::Cancelled);
            }
            trainable.reseed(derive_seed(opts.seed, epoch, step, 9));
            let (a, b) = rows(&table, chunk, model.dim)?;
            let same: Vec<f32> = chunk.iter().map(|p| if p.2 { 1.0 } else { 0.0 }).collect();
            let same = Tensor::from_vec(same, chunk.len(), &Device::Cpu).map_err(c_err)?;
            let loss = trainable
                .loss(&a, &b, &same)
                .map_err(|e| Error::plugin(name, e))?;
            let value = loss.to_scalar::<f32>().map_err(c_err)?;
            if !value.is_finite() {
                return Err(Error::Diverged {
                    epoch,
                    step,
                    loss: value,
                });
            }
            optimiser.backward_step(&loss).map_err(c_err)?;
            pairs_seen += chunk.len() as u64;
        }
        let frozen = trainable.freeze().map_err(|e| Error::plugin(name, e))?;
        let acc = accuracy(&scores(frozen.as_ref(), &table, &seen_pairs)?, &seen_pairs);
        history.push(acc);
        if let Some(alpha) = opts.lr_decay {
            since_decay += 1;
            let k = history.len();
            if k > 3 && since_decay >= 3 {
                let mean = |upto: usize| history[..upto].iter().sum::<f64>() / upto as f64;
                if mean(k) - (mean(k - 1) + mean(k - 2) + mean(k - 3)) / 3.0 < alpha {
                    optimiser.set_learning_rate(optimiser.learning_rate() * 0.5);
                    since_decay = 0;
                }
            }
        }
    }
    let scorer: Arc<dyn PairScorer> =
        Arc::from(trainable.freeze().map_err(|e| Error::plugin(name, e))?);
    let mut all_scores = Vec::new();
    let mut case_acc = Vec::new();
    for (case, pairs) in &cases {
        if pairs.is_empty() {
            continue;
        }
        let s = scores(scorer.as_ref(), &table, pairs)?;
        case_acc.push(CaseAccuracy {
            case,
            pairs: pairs.len(),
            accuracy: accuracy(&s, pairs),
        });
        all_scores.extend(s.into_iter().zip(pairs.iter().map(|p| p.2)));
    }
    let right = all_scores
        .iter()
        .filter(|(s, same)| (*s >= 0.5) == *same)
        .count();
    let (roc_auc, roc) = eval::roc(&all_scores);
    Ok(ScorerReport {
        weights: scorer.save_weights().map_err(|e| Error::plugin(name, e))?,
        scorer,
        plugin: name.to_string(),
        config: opts.config.clone(),
        model_version: model.version,
        accuracy: right as f64 / all_scores.len().max(1) as f64,
        roc_auc,
        roc,
        cases: case_acc,
        history,
        pairs_seen,
        seconds: started.elapsed().as_secs_f64(),
    })
}
