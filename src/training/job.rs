//! The training job: see the module docs of [`super`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use lookalike_plugin::candle_core::{Device, Tensor, Var};
use lookalike_plugin::nn::{self, Adam, Optimiser, SgdNesterov, TrainRng};
use lookalike_plugin::{Extractor, ExtractorSpec, Trainable, TrainingBatch};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::bank::FeatureBank;
use super::eval::{self, Metrics};
use super::loader::{derive_seed, plan_epoch, Batch, Loader};
use super::miners::{self, Distances, Mined};
use super::{EpochRecord, OptimiserKind, Phase, Progress, TrainOptions, TrainReport};
use crate::db::now_unix;
use crate::error::{Error, Result};
use crate::store::{CheckpointRecord, ModelRecord};
use crate::{Db, ImageId};

fn plugin_err(name: &str) -> impl Fn(lookalike_plugin::PluginError) -> Error + '_ {
    move |e| Error::plugin(name, e)
}

fn candle_err(name: &str) -> impl Fn(lookalike_plugin::candle_core::Error) -> Error + '_ {
    move |e| Error::plugin(name, e.into())
}

/// The queries and gallery every evaluation of a job uses.
struct EvalSet {
    queries: Vec<(ImageId, u32)>,
    gallery: Vec<(ImageId, u32)>,
}

impl EvalSet {
    /// Metrics of `extractor` (declaring `spec`) on the set, embedding the images afresh.
    fn evaluate(
        &self,
        db: &Db,
        name: &str,
        extractor: &dyn Extractor,
        spec: &ExtractorSpec,
    ) -> Result<Metrics> {
        let embed = |items: &[(ImageId, u32)]| -> Result<Vec<(Vec<f32>, u32)>> {
            let labels: BTreeMap<ImageId, u32> = items.iter().copied().collect();
            let ids: Vec<ImageId> = items.iter().map(|x| x.0).collect();
            Ok(db
                .embed_stored(name, extractor, spec, &ids)?
                .into_iter()
                .filter_map(|(id, v)| labels.get(&id).map(|l| (v, *l)))
                .collect())
        };
        eval::retrieval(&embed(&self.queries)?, &embed(&self.gallery)?, spec.metric)
    }

    /// Metrics of the head of a trainable with frozen layers, on the bank's unaugmented rows.
    fn evaluate_bank(
        &self,
        name: &str,
        bank: &FeatureBank,
        trainable: &dyn Trainable,
        metric: lookalike_plugin::Metric,
    ) -> Result<Metrics> {
        let embed = |items: &[(ImageId, u32)]| -> Result<Vec<(Vec<f32>, u32)>> {
            let labels: BTreeMap<ImageId, u32> = items.iter().copied().collect();
            let ids: Vec<ImageId> = items.iter().map(|x| x.0).collect();
            let (found, rows) = bank.plain(&ids);
            let x = Tensor::from_vec(rows, (found.len(), bank.dim()), &Device::Cpu)
                .map_err(candle_err(name))?;
            let emb = trainable
                .forward_features(&x, false)
                .map_err(plugin_err(name))?;
            let dim = emb.dim(1).map_err(candle_err(name))?;
            let values: Vec<f32> = emb
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(candle_err(name))?;
            Ok(found
                .iter()
                .zip(values.chunks_exact(dim))
                .filter_map(|(id, v)| labels.get(id).map(|l| (v.to_vec(), *l)))
                .collect())
        };
        eval::retrieval(&embed(&self.queries)?, &embed(&self.gallery)?, metric)
    }

    /// Metrics of the model being trained: on the feature bank when there is one, otherwise
    /// embedding the images afresh.
    fn evaluate_trained(
        &self,
        db: &Db,
        name: &str,
        trainable: &dyn Trainable,
        spec: &ExtractorSpec,
        bank: Option<&FeatureBank>,
    ) -> Result<Metrics> {
        match bank {
            Some(b) => self.evaluate_bank(name, b, trainable, spec.metric),
            None => {
                let frozen = trainable.freeze().map_err(plugin_err(name))?;
                self.evaluate(db, name, frozen.as_ref(), spec)
            }
        }
    }

    /// Metrics of the active model from its stored embeddings.
    fn evaluate_active(&self, db: &Db) -> Result<Metrics> {
        let metric = db.active_model().metric;
        let lookup = |items: &[(ImageId, u32)]| -> Result<Vec<(Vec<f32>, u32)>> {
            let labels: BTreeMap<ImageId, u32> = items.iter().copied().collect();
            let ids: Vec<ImageId> = items.iter().map(|x| x.0).collect();
            Ok(db
                .active_embeddings(&ids)?
                .into_iter()
                .filter_map(|(id, v)| labels.get(&id).map(|l| (v, *l)))
                .collect())
        };
        eval::retrieval(&lookup(&self.queries)?, &lookup(&self.gallery)?, metric)
    }
}

fn check_options(o: &TrainOptions) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if o.epochs == 0 {
        return bad("epochs must be at least 1".into());
    }
    if o.per_label < 2 {
        return bad(
            "per_label must be at least 2 (positive pairs need two images of a label)".into(),
        );
    }
    if o.batch_size < o.random + 2 * o.per_label {
        return bad(format!(
            "batch_size {} leaves room for fewer than two labels of {} images besides {} random ones",
            o.batch_size, o.per_label, o.random
        ));
    }
    if !(o.validation_share > 0.0 && o.validation_share < 1.0) {
        return bad(format!(
            "validation_share must be in (0, 1), got {}",
            o.validation_share
        ));
    }
    if !(o.proxy_weight >= 0.0 && o.proxy_weight.is_finite()) {
        return bad(format!(
            "proxy_weight must be 0 (off) or positive, got {}",
            o.proxy_weight
        ));
    }
    if o.eval_queries == 0 || o.eval_gallery == 0 {
        return bad("eval_queries and eval_gallery must be at least 1".into());
    }
    if let OptimiserKind::SgdNesterov { weight_decay, .. } = o.optimiser {
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return bad(format!(
                "weight_decay must be 0 (off) or positive, got {weight_decay}"
            ));
        }
    }
    let lr = o.optimiser.lr();
    if !(lr > 0.0 && lr.is_finite()) {
        return bad(format!("the learning rate must be positive, got {lr}"));
    }
    if !(0.0..1.0).contains(&o.warmup) {
        return bad(format!(
            "warmup is a share of the run, from 0 up to (not including) 1, got {}",
            o.warmup
        ));
    }
    Ok(())
}

/// Runs a training job for extractor `name`; see [`crate::Db::train_extractor_with`].
pub(crate) fn train_extractor(db: &Db, name: &str, opts: TrainOptions) -> Result<TrainReport> {
    let _guard = db.start_job()?;
    let (name, opts, chosen) = if name == AUTO {
        let c = super::auto::choose(db, opts)?;
        (c.extractor, c.options, Some(c.reason))
    } else {
        (name.to_string(), opts, None)
    };
    let name = name.as_str();
    let started = Instant::now();
    check_options(&opts)?;
    let plugin = db.registry().plugin(name)?.clone();
    let mut miner = miners::by_name(&opts.miner).ok_or_else(|| Error::UnknownMiner {
        name: opts.miner.clone(),
        known: miners::MINERS.iter().map(|s| s.to_string()).collect(),
    })?;
    let cancelled = || opts.cancel.as_ref().is_some_and(|c| c.is_cancelled());
    let report = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(&p)
        }
    };
    let progress_at = |phase, epoch, step, steps, loss, validation, embedded| Progress {
        phase,
        epoch,
        epochs: opts.epochs,
        step,
        steps,
        loss,
        lambda: None,
        images_per_second: 0.0,
        pairs_per_second: 0.0,
        validation,
        embedded,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    };

    // The labelled images, their labels as indices, the split.
    let labelled = db.labelled()?;
    let mut label_index: BTreeMap<String, u32> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, l) in &labelled {
        *counts.entry(l.clone()).or_default() += 1;
    }
    // Every label takes part: one with a single image as a negative for the others.
    for (i, l) in counts.keys().enumerate() {
        label_index.insert(l.clone(), i as u32);
    }
    let indexed: Vec<(ImageId, u32)> = labelled
        .iter()
        .filter_map(|(id, l)| label_index.get(l).map(|i| (*id, *i)))
        .collect();
    // At most `eval_queries` held out: more would be training images no query uses.
    let split = eval::split(
        &indexed,
        opts.validation_share,
        opts.eval_queries,
        opts.per_label,
        opts.seed,
    );
    let with_pairs = split.train.values().filter(|ids| ids.len() >= 2).count();
    if with_pairs < 2 || split.queries.is_empty() {
        return Err(Error::NotEnoughData(format!(
            "{} labelled images with {} labels; training needs at least two labels with two or \
             more training images each (a positive pair) besides the held-out images (at least \
             one label with three or more images, or three labels with two or more)",
            labelled.len(),
            counts.len()
        )));
    }
    let train = split.train;
    let train_all: Vec<(ImageId, u32)> = train
        .iter()
        .flat_map(|(l, ids)| ids.iter().map(move |id| (*id, *l)))
        .collect();
    // Whole-label queries need their answers in the gallery; training images fill the rest.
    let mut gallery = split.answers;
    gallery.extend(eval::sample(
        &train_all,
        opts.eval_gallery.saturating_sub(gallery.len()),
        opts.seed ^ 2,
    ));
    let evalset = EvalSet {
        queries: eval::sample(&split.queries, opts.eval_queries, opts.seed ^ 1),
        gallery,
    };
    let holdout = split.holdout;
    let labelled_per_batch = opts.batch_size.saturating_sub(opts.random);
    let steps = opts
        .steps_per_epoch
        .unwrap_or_else(|| train_all.len().div_ceil(opts.batch_size))
        .max(1);

    // The model, fresh or from the checkpoint.
    let fingerprint = opts.fingerprint();
    // A new job discards any old checkpoint unread (it may be of an older layout).
    let checkpoint = if opts.resume {
        let c = db.store().checkpoint()?.ok_or_else(|| {
            Error::InvalidArgument("resume asked for, but no checkpoint is stored".into())
        })?;
        if c.plugin != name || c.config != opts.config || c.fingerprint != fingerprint {
            return Err(Error::InvalidArgument(format!(
                "the stored checkpoint is of another job ({} {:?}, {}); resume with the same \
                 extractor, configuration and options, or start afresh without resume",
                c.plugin, c.config, c.fingerprint
            )));
        }
        Some(c)
    } else {
        db.store().clear_checkpoint()?;
        None
    };
    let weights = match &checkpoint {
        Some(c) => Some(c.weights.as_slice()),
        None => opts.initial_weights.as_deref().map(Vec::as_slice),
    };
    // Built under the job's seed, so that one seed gives one initial model.
    let trainable: Box<dyn Trainable> =
        lookalike_plugin::nn::with_init_seed(opts.seed, || plugin.trainable(&opts.config, weights))
            .ok_or_else(|| Error::NotTrainable(name.to_string()))?
            .map_err(plugin_err(name))?;
    let spec = trainable.freeze().map_err(plugin_err(name))?.spec();
    // Frozen pretrained layers: their features are computed once per image and view.
    let input = &spec.input;
    let probe = Tensor::zeros(
        (
            1,
            input.channels as usize,
            input.height as usize,
            input.width as usize,
        ),
        lookalike_plugin::candle_core::DType::F32,
        &Device::Cpu,
    )
    .map_err(candle_err(name))?;
    let has_frozen = trainable.frozen_features(&probe).is_some();
    // The proxy loss's label proxies: trained with the network, after its parameters in the
    // optimiser's order, and checkpointed with it.
    let proxies = if opts.proxy_weight > 0.0 {
        let shape = (label_index.len(), spec.dim);
        let p = match &checkpoint {
            Some(c) if c.proxies.len() != shape.0 * shape.1 => {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint holds proxies for {} values, this job needs {} labels x {}; \
                     the labelled images changed since it was written: start afresh without resume",
                    c.proxies.len(),
                    shape.0,
                    shape.1
                )))
            }
            Some(c) => Var::from_vec(c.proxies.clone(), shape, &Device::Cpu),
            None => TrainRng::seeded(derive_seed(opts.seed, 0, 0, 5))
                .randn(0f32, 1f32, shape, &Device::Cpu)
                .and_then(|t| Var::from_tensor(&t)),
        };
        Some(p.map_err(candle_err(name))?)
    } else {
        None
    };
    let mut vars = trainable.vars();
    vars.extend(proxies.iter().cloned());
    let mut optimiser: Box<dyn Optimiser> = match opts.optimiser {
        OptimiserKind::SgdNesterov {
            lr,
            momentum,
            weight_decay,
        } => Box::new(SgdNesterov::new(vars, lr, momentum, weight_decay)),
        OptimiserKind::Adam { lr } => Box::new(Adam::new(vars, lr)),
    };

    // Counters, restored from the checkpoint. `base_lr` is the rate before the cosine
    // annealing (the one the decay rule halves).
    let mut base_lr = optimiser.learning_rate();
    let mut start_epoch = 0;
    let mut since_decay = 0u32;
    let mut history: Vec<(f64, f64, f64)> = Vec::new(); // (minutes, acc@1, mAP@10)
    let (mut steps_done, mut pairs_seen, mut images_seen) = (0u64, 0u64, 0u64);
    let mut vanished = 0usize;
    let (mut train_seconds, mut wait_seconds) = (0f64, 0f64);
    let before = match &checkpoint {
        Some(c) => {
            optimiser
                .load_state(&c.optimiser)
                .map_err(plugin_err(name))?;
            base_lr = c.lr;
            start_epoch = c.epochs_done as usize;
            since_decay = c.since_decay;
            history = c.history.clone();
            steps_done = c.steps;
            pairs_seen = c.pairs_seen;
            images_seen = c.images_seen;
            train_seconds = c.train_seconds;
            wait_seconds = c.loader_wait_seconds;
            Metrics {
                accuracy_at_1: c.before.0,
                map_at_10: c.before.1,
                queries: evalset.queries.len(),
            }
        }
        None => {
            report(progress_at(Phase::Baseline, 0, 0, steps, 0.0, None, (0, 0)));
            evalset.evaluate_active(db)?
        }
    };
    report(progress_at(
        Phase::Baseline,
        0,
        0,
        steps,
        0.0,
        Some(before),
        (0, 0),
    ));
    let bank = if has_frozen {
        let t = Instant::now();
        let train_ids: Vec<ImageId> = train_all.iter().map(|x| x.0).collect();
        let eval_ids: Vec<ImageId> = evalset
            .queries
            .iter()
            .chain(&evalset.gallery)
            .map(|x| x.0)
            .collect();
        let bank = match FeatureBank::build(
            db,
            name,
            trainable.as_ref(),
            &spec,
            &opts,
            &train_ids,
            &eval_ids,
            &cancelled,
            &mut |done, total| {
                report(progress_at(
                    Phase::Features,
                    start_epoch,
                    0,
                    steps,
                    0.0,
                    None,
                    (done, total),
                ))
            },
        ) {
            Ok(b) => b,
            Err(e) => {
                // A cancelled job leaves no checkpoint behind, as at any other point.
                if matches!(e, Error::Cancelled) {
                    db.store().clear_checkpoint()?;
                }
                return Err(e);
            }
        };
        // The bank is the slow part of such a job: it counts as training time (the budget).
        train_seconds += t.elapsed().as_secs_f64();
        Some(bank)
    } else {
        None
    };
    let resumed_from = checkpoint.as_ref().map(|_| start_epoch);
    let run_started = Instant::now();
    let (run_images0, run_pairs0) = (images_seen, pairs_seen);
    let budget = opts.max_minutes.map(|m| m * 60.0);
    let mut out_of_time = false;
    let mut epochs_done = start_epoch;
    let mut last_eval: Option<(usize, Metrics)> = None;
    let c_err = candle_err(name);
    let (c, h, w) = (
        spec.input.channels as usize,
        spec.input.height as usize,
        spec.input.width as usize,
    );

    let result: Result<()> = (|| {
        for epoch in start_epoch..opts.epochs {
            miner.start_epoch(epoch, opts.epochs);
            let plan = plan_epoch(
                &train,
                opts.seed,
                epoch,
                steps,
                labelled_per_batch,
                opts.per_label,
                opts.random,
            );
            let mut loader = match &bank {
                Some(bank) => Batches::Bank {
                    bank,
                    plan: plan.into_iter(),
                    seed: derive_seed(opts.seed, epoch, 0, 6),
                },
                None => Batches::Images(Loader::start(
                    db.clone(),
                    spec.input.clone(),
                    opts.augment,
                    plan,
                    opts.seed,
                    epoch,
                    opts.workers,
                )),
            };
            for step in 0..steps {
                if cancelled() {
                    return Err(Error::Cancelled);
                }
                if budget.is_some_and(|b| train_seconds >= b) {
                    out_of_time = true;
                    break;
                }
                let t = Instant::now();
                let by_steps = steps_done as f64 / (opts.epochs * steps).max(1) as f64;
                let by_time = budget.map_or(0.0, |b| train_seconds / b);
                optimiser.set_learning_rate(scheduled(
                    base_lr,
                    by_steps.max(by_time),
                    opts.warmup,
                    opts.cosine,
                ));
                let batch = loader
                    .next_batch()
                    .ok_or_else(|| Error::Index("the loader stopped early".into()))??;
                let waited = t.elapsed().as_secs_f64();
                wait_seconds += waited;
                let n = batch.labels.len();
                if n == 0 {
                    // Every image of this batch was removed while the job ran.
                    continue;
                }
                trainable.reseed(derive_seed(opts.seed, epoch, step, 3));
                let emb = match &bank {
                    Some(b) => {
                        let x = Tensor::from_vec(batch.pixels, (n, b.dim()), &Device::Cpu)
                            .map_err(&c_err)?;
                        trainable.forward_features(&x, true)
                    }
                    None => {
                        let x = Tensor::from_vec(batch.pixels, (n, c, h, w), &Device::Cpu)
                            .map_err(&c_err)?;
                        trainable.forward_train(&x)
                    }
                }
                .map_err(plugin_err(name))?;
                let dim = emb.dim(1).map_err(&c_err)?;
                let flat: Vec<f32> = emb
                    .detach()
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(&c_err)?;
                let dist = Distances::new(&flat, dim);
                let mut rng = StdRng::seed_from_u64(derive_seed(opts.seed, epoch, step, 4));
                let mined = miner.mine(&batch.labels, &dist, &mut rng);
                let pairs = mined.pairs();
                let mut loss_value = 0.0;
                let labels = Tensor::new(batch.labels.as_slice(), &Device::Cpu).map_err(&c_err)?;
                let mined_loss = if pairs > 0 {
                    Some(loss_of(
                        name,
                        trainable.as_ref(),
                        &emb,
                        &labels,
                        &mined,
                        dim,
                    )?)
                } else {
                    None
                };
                let proxy_loss = match &proxies {
                    Some(p) => Some(
                        nn::proxy_loss(&emb, &labels, p.as_tensor(), nn::PROXY_TEMPERATURE)
                            .and_then(|l| l * opts.proxy_weight)
                            .map_err(&c_err)?,
                    ),
                    None => None,
                };
                let loss = match (mined_loss, proxy_loss) {
                    (Some(a), Some(b)) => Some((a + b).map_err(&c_err)?),
                    (a, b) => a.or(b),
                };
                if let Some(loss) = loss {
                    loss_value = loss.to_scalar::<f32>().map_err(&c_err)?;
                    if !loss_value.is_finite() {
                        return Err(Error::Diverged {
                            epoch,
                            step,
                            loss: loss_value,
                        });
                    }
                    optimiser.backward_step(&loss).map_err(&c_err)?;
                }
                train_seconds += t.elapsed().as_secs_f64();
                steps_done += 1;
                pairs_seen += pairs as u64;
                images_seen += n as u64;
                let run = run_started.elapsed().as_secs_f64().max(1e-9);
                let mut p = progress_at(
                    Phase::Training,
                    epoch,
                    step,
                    steps,
                    loss_value,
                    None,
                    (0, 0),
                );
                p.lambda = miner.lambda();
                p.images_per_second = (images_seen - run_images0) as f64 / run;
                p.pairs_per_second = (pairs_seen - run_pairs0) as f64 / run;
                report(p);
            }
            vanished += loader.vanished();
            drop(loader);
            epochs_done = epoch + 1;
            if out_of_time {
                break;
            }
            if opts.eval_every_epoch || epoch + 1 == opts.epochs {
                report(progress_at(
                    Phase::Evaluating,
                    epoch,
                    steps,
                    steps,
                    0.0,
                    None,
                    (0, 0),
                ));
                let m =
                    evalset.evaluate_trained(db, name, trainable.as_ref(), &spec, bank.as_ref())?;
                last_eval = Some((epochs_done, m));
                history.push((train_seconds / 60.0, m.accuracy_at_1, m.map_at_10));
                report(progress_at(
                    Phase::Evaluating,
                    epoch,
                    steps,
                    steps,
                    0.0,
                    Some(m),
                    (0, 0),
                ));
                // The MLP paper's decay rule on the running means of validation accuracy.
                if let Some(alpha) = opts.lr_decay {
                    since_decay += 1;
                    let k = history.len();
                    if k > 3 && since_decay >= 3 {
                        let mean = |upto: usize| {
                            history[..upto].iter().map(|x| x.1).sum::<f64>() / upto as f64
                        };
                        let gain = mean(k) - (mean(k - 1) + mean(k - 2) + mean(k - 3)) / 3.0;
                        if gain < alpha {
                            base_lr *= 0.5;
                            optimiser.set_learning_rate(base_lr);
                            since_decay = 0;
                        }
                    }
                }
            }
            db.store().put_checkpoint(&CheckpointRecord {
                format: 1,
                plugin: name.to_string(),
                config: opts.config.clone(),
                fingerprint: fingerprint.clone(),
                epochs_done: epochs_done as u32,
                weights: trainable.save_weights().map_err(plugin_err(name))?,
                optimiser: optimiser.state().map_err(plugin_err(name))?,
                lr: base_lr,
                since_decay,
                history: history.clone(),
                steps: steps_done,
                pairs_seen,
                images_seen,
                train_seconds,
                loader_wait_seconds: wait_seconds,
                before: (before.accuracy_at_1, before.map_at_10),
                created_unix: now_unix(),
                proxies: match &proxies {
                    Some(p) => p
                        .as_tensor()
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(&c_err)?,
                    None => Vec::new(),
                },
            })?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        if matches!(e, Error::Cancelled) {
            db.store().clear_checkpoint()?;
        }
        return Err(e);
    }
    if steps_done == 0 {
        // The budget ran out before the first step (a feature bank that took it all): the
        // model is the one the job started from; storing it and re-embedding every image
        // would cost minutes for nothing.
        db.store().clear_checkpoint()?;
        return Err(Error::InvalidArgument(format!(
            "the time budget of {:.1} minutes ran out before the first training step: computing \
             the frozen layers' features took {:.1} minutes; give more minutes (at least twice \
             that) or none",
            opts.max_minutes.unwrap_or(0.0),
            train_seconds / 60.0
        )));
    }

    // The new model: evaluate (unless the last epoch just did), store, embed, switch.
    let frozen: Arc<dyn Extractor> = Arc::from(trainable.freeze().map_err(plugin_err(name))?);
    let after = match last_eval {
        Some((e, m)) if e == epochs_done && !out_of_time => m,
        _ => {
            // The last epoch, cut short by the time budget (or not yet evaluated).
            report(progress_at(
                Phase::Evaluating,
                epochs_done.saturating_sub(1),
                0,
                steps,
                0.0,
                None,
                (0, 0),
            ));
            let m = evalset.evaluate_trained(db, name, trainable.as_ref(), &spec, bank.as_ref())?;
            history.push((train_seconds / 60.0, m.accuracy_at_1, m.map_at_10));
            report(progress_at(
                Phase::Evaluating,
                epochs_done.saturating_sub(1),
                steps,
                steps,
                0.0,
                Some(m),
                (0, 0),
            ));
            m
        }
    };
    let record = ModelRecord {
        format: 1,
        plugin: name.to_string(),
        plugin_version: frozen.version(),
        config: opts.config.clone(),
        dim: spec.dim as u32,
        metric: spec.metric.as_str().to_string(),
        weights: frozen.save_weights().map_err(plugin_err(name))?,
        created_unix: now_unix(),
    };
    let mut on_embed = |done: usize, total: usize| {
        report(progress_at(
            Phase::Embedding,
            epochs_done,
            0,
            steps,
            0.0,
            None,
            (done, total),
        ))
    };
    let embedding_started = std::time::Instant::now();
    let stored_features = bank.as_ref().map_or(0, |b| b.from_store);
    let installed = match db.install_model(record, frozen, &mut on_embed, &cancelled) {
        Ok(v) => v,
        Err(e) => {
            if matches!(e, Error::Cancelled) {
                db.store().clear_checkpoint()?;
            }
            return Err(e);
        }
    };
    let embed_seconds = embedding_started.elapsed().as_secs_f64();
    let version = installed.version;
    let (activate, decision) = opts.activate.decide(&before, &after);
    if activate {
        db.use_model(version)?;
    }
    db.store().clear_checkpoint()?;
    db.flush()?;
    let history = history
        .iter()
        .enumerate()
        .map(|(i, (minutes, acc, map))| EpochRecord {
            epoch: i,
            minutes: *minutes,
            validation: Some(Metrics {
                accuracy_at_1: *acc,
                map_at_10: *map,
                queries: evalset.queries.len(),
            }),
        })
        .collect();
    Ok(TrainReport {
        version,
        activated: activate,
        decision,
        holdout,
        extractor: name.to_string(),
        config: opts.config.clone(),
        miner: miner.name().to_string(),
        before,
        after,
        epochs: epochs_done,
        steps: steps_done,
        pairs_seen,
        images_seen,
        train_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        loader_wait_share: if train_seconds > 0.0 {
            wait_seconds / train_seconds
        } else {
            0.0
        },
        resumed_from,
        history,
        vanished,
        chosen,
        embed_seconds,
        embedded_from_features: installed.from_features,
        stored_features,
    })
}

/// The extractor name that asks the job to choose ([`super::auto`]).
pub(crate) const AUTO: &str = "auto";

/// Where an epoch's batches come from: images decoded and augmented on loader threads, or
/// rows of the feature bank (one random view per image).
enum Batches<'a> {
    Images(Loader),
    Bank {
        bank: &'a FeatureBank,
        plan: std::vec::IntoIter<Vec<(ImageId, u32)>>,
        seed: u64,
    },
}

impl Batches<'_> {
    fn next_batch(&mut self) -> Option<Result<Batch>> {
        match self {
            Batches::Images(l) => l.next_batch(),
            Batches::Bank { bank, plan, seed } => {
                let items = plan.next()?;
                *seed = derive_seed(*seed, 0, 0, 7);
                let (pixels, labels) = bank.gather(&items, &mut StdRng::seed_from_u64(*seed));
                Some(Ok(Batch { pixels, labels }))
            }
        }
    }

    fn vanished(&self) -> usize {
        match self {
            Batches::Images(l) => l.vanished(),
            Batches::Bank { .. } => 0,
        }
    }
}

/// The learning rate `done` (0 to 1) of the way through a run: rising linearly from 0 over
/// the first `warmup` share, then `base`, annealed along a half cosine to 0 over the rest when
/// `cosine` says so.
fn scheduled(base: f64, done: f64, warmup: f64, cosine: bool) -> f64 {
    let done = done.clamp(0.0, 1.0);
    if done < warmup {
        return base * done / warmup;
    }
    if !cosine {
        return base;
    }
    let rest = (done - warmup) / (1.0 - warmup);
    base * 0.5 * (1.0 + (std::f64::consts::PI * rest).cos())
}

/// The plugin's loss over the mined pairs or groups, on rows of `emb` (N x dim) whose labels
/// are `labels` (N, u32).
fn loss_of(
    name: &str,
    t: &dyn Trainable,
    emb: &Tensor,
    labels: &Tensor,
    mined: &Mined,
    dim: usize,
) -> Result<Tensor> {
    let c_err = |e: lookalike_plugin::candle_core::Error| Error::plugin(name, e.into());
    let rows = |idx: Vec<u32>| -> Result<Tensor> {
        let n = idx.len();
        let i = Tensor::from_vec(idx, n, &Device::Cpu).map_err(c_err)?;
        emb.index_select(&i, 0).map_err(c_err)
    };
    match mined {
        Mined::Pairs(p) => {
            let a = rows(p.iter().map(|x| x.0 as u32).collect())?;
            let b = rows(p.iter().map(|x| x.1 as u32).collect())?;
            let y: Vec<f32> = p.iter().map(|x| if x.2 { 1.0 } else { 0.0 }).collect();
            let y = Tensor::from_vec(y, p.len(), &Device::Cpu).map_err(c_err)?;
            t.loss(TrainingBatch::Pairs {
                a: &a,
                b: &b,
                dissimilar: &y,
            })
            .map_err(|e| Error::plugin(name, e))
        }
        Mined::OneVsMany(g) => {
            let k = g.first().map(|x| x.2.len()).unwrap_or(0);
            let anchor = rows(g.iter().map(|x| x.0 as u32).collect())?;
            let positive = rows(g.iter().map(|x| x.1 as u32).collect())?;
            let negatives = rows(
                g.iter()
                    .flat_map(|x| x.2.iter().map(|i| *i as u32))
                    .collect(),
            )?
            .reshape((g.len(), k, dim))
            .map_err(c_err)?;
            t.loss(TrainingBatch::OneVsMany {
                anchor: &anchor,
                positive: &positive,
                negatives: &negatives,
            })
            .map_err(|e| Error::plugin(name, e))
        }
        Mined::Labelled { .. } => t
            .loss(TrainingBatch::Labelled {
                embeddings: emb,
                labels,
            })
            .map_err(|e| Error::plugin(name, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::scheduled;

    #[test]
    fn cosine_annealing_starts_at_the_rate_and_ends_at_zero() {
        let cosine = |base, done| scheduled(base, done, 0.0, true);
        assert_eq!(cosine(0.1, 0.0), 0.1);
        assert!((cosine(0.1, 0.5) - 0.05).abs() < 1e-12);
        assert!(cosine(0.1, 1.0).abs() < 1e-12);
        // Past the end (a clock-limited run's last step) it stays at 0, never turns back up.
        assert!(cosine(0.1, 1.3).abs() < 1e-12);
        let rates: Vec<f64> = (0..=10).map(|i| cosine(1.0, i as f64 / 10.0)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]));
        assert_eq!(scheduled(0.1, 0.7, 0.0, false), 0.1);
    }

    #[test]
    fn warmup_rises_linearly_then_anneals_from_the_rate() {
        assert_eq!(scheduled(0.1, 0.0, 0.2, true), 0.0);
        assert!((scheduled(0.1, 0.1, 0.2, true) - 0.05).abs() < 1e-12);
        assert!((scheduled(0.1, 0.2, 0.2, true) - 0.1).abs() < 1e-12);
        // Halfway through what follows the warm-up: half the rate.
        assert!((scheduled(0.1, 0.6, 0.2, true) - 0.05).abs() < 1e-12);
        assert!(scheduled(0.1, 1.0, 0.2, true).abs() < 1e-12);
        // Without annealing the rate holds after the warm-up.
        assert_eq!(scheduled(0.1, 0.9, 0.2, false), 0.1);
    }
}
