//! Training jobs on the bundled Fashion-MNIST sample (300 images, 10 labels): the job trains,
//! evaluates, switches atomically while queries run, resumes exactly after an interruption,
//! cancels cleanly, and refuses bad requests with typed errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lookalike::{Activate, CancelToken, Db, Error, OptimiserKind, Options, Phase, TrainOptions};

use crate::common::{open, relaxed, tempdir};

/// The bundled sample as (bytes, label), in a fixed order.
pub(crate) fn sample() -> Vec<(Vec<u8>, String)> {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let mut out = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    classes.sort_by_key(|e| e.file_name());
    for class in classes {
        let mut files: Vec<_> = std::fs::read_dir(class.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        files.sort_by_key(|e| e.file_name());
        for f in files {
            out.push((
                std::fs::read(f.path()).unwrap(),
                class.file_name().to_string_lossy().into_owned(),
            ));
        }
    }
    assert_eq!(out.len(), 300);
    out
}

fn filled(dir: &std::path::Path, opts: Options) -> Db {
    let db = open(dir, opts);
    let data = sample();
    db.insert_images(data.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap();
    db
}

/// Small, quick jobs: SimNet `cpu`, batches of 4 labels x 6 + 8 random.
fn quick() -> TrainOptions {
    TrainOptions::default()
        .epochs(2)
        .batch(32, 6, 8)
        .steps_per_epoch(3)
        .eval_sizes(60, 240)
        .seed(5)
}

#[test]
fn trains_switches_and_keeps_old_versions() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let query = sample()[0].0.clone();
    // Queries run on another thread for the whole job: every one must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let q = {
        let (db, stop, query) = (db.clone(), stop.clone(), query.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let hits = db.nearest(&query, 5).unwrap();
                assert_eq!(hits.len(), 5);
                n += 1;
            }
            n
        })
    };
    let phases = Arc::new(Mutex::new(Vec::new()));
    let seen = phases.clone();
    let report = db
        .train_extractor_with(
            "simnet",
            quick()
                .epochs(3)
                .activate(Activate::Always)
                .on_progress(move |p| {
                    let mut s = seen.lock().unwrap();
                    if s.last() != Some(&p.phase) {
                        s.push(p.phase);
                    }
                    assert!(p.loss.is_finite());
                }),
        )
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(q.join().unwrap() > 0);
    assert_eq!(report.version, 2);
    assert!(report.activated);
    assert_eq!(report.epochs, 3);
    assert_eq!(report.history.len(), 3);
    assert_eq!(report.steps, 9);
    assert!(report.pairs_seen > 0);
    assert!(report.after.accuracy_at_1 > 0.2, "after {:?}", report.after);
    assert!((0.0..=1.0).contains(&report.loader_wait_share));
    let phases = phases.lock().unwrap().clone();
    assert_eq!(phases.first(), Some(&Phase::Baseline));
    assert!(phases.contains(&Phase::Evaluating));
    assert!(phases.contains(&Phase::Training) && phases.contains(&Phase::Embedding));
    // The new model answers; the old one is listed and can come back.
    assert_eq!(db.active_model().extractor, "simnet");
    assert_eq!(db.active_model().dim, 128);
    assert_eq!(db.nearest(&query, 3).unwrap().len(), 3);
    assert_eq!(db.models().unwrap().len(), 2);
    assert_eq!(db.embedding(lookalike::ImageId(1)).unwrap().len(), 128);
    assert!(matches!(db.delete_model(2), Err(Error::ActiveModel(2))));
    db.use_model(1).unwrap();
    assert_eq!(db.active_model().extractor, "classic");
    db.delete_model(2).unwrap();
    assert_eq!(db.models().unwrap().len(), 1);
    assert!(matches!(db.use_model(2), Err(Error::UnknownModel(2))));
    // The choice survives a reopen.
    drop(db);
    let db = open(dir.path(), relaxed());
    assert_eq!(db.active_model().version, 1);
    assert_eq!(db.len(), 300);
}

/// Runs a `quick()` job on `db` and interrupts it at the start of its second epoch (a panic
/// stands in for a crash: the job's thread unwinds, the epoch-1 checkpoint stays in the store).
fn interrupt_in_epoch_1(db: &Db) {
    let interrupted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.train_extractor_with(
            "simnet",
            quick().on_progress(|p| {
                if p.phase == Phase::Training && p.epoch == 1 {
                    panic!("simulated crash");
                }
            }),
        )
    }));
    assert!(interrupted.is_err(), "the job was not interrupted");
}

#[test]
fn a_resumed_job_ends_where_an_uninterrupted_one_does() {
    let (d1, d2) = (tempdir(), tempdir());
    let whole = filled(d1.path(), relaxed());
    let cut = filled(d2.path(), relaxed());
    let full = whole.train_extractor_with("simnet", quick()).unwrap();
    interrupt_in_epoch_1(&cut);
    assert_eq!(cut.active_model().version, 1, "nothing switched");
    assert_eq!(
        cut.pending_job().unwrap(),
        Some(("simnet".into(), String::new(), 1))
    );
    // Resuming with other options is refused; with the same ones it finishes the job.
    assert!(matches!(
        cut.train_extractor_with("simnet", quick().seed(6).resume(true)),
        Err(Error::InvalidArgument(_))
    ));
    let resumed = cut
        .train_extractor_with("simnet", quick().resume(true))
        .unwrap();
    assert_eq!(resumed.resumed_from, Some(1));
    assert_eq!(cut.pending_job().unwrap(), None);
    assert_eq!(resumed.steps, full.steps);
    assert_eq!(resumed.after, full.after);
    for id in [1u64, 77, 300] {
        let id = lookalike::ImageId(id);
        assert_eq!(
            whole.embedding(id).unwrap(),
            cut.embedding(id).unwrap(),
            "image {id}"
        );
    }
}

#[test]
fn cancelling_leaves_the_database_as_it_was() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let token = CancelToken::new();
    let t = token.clone();
    let err = db
        .train_extractor_with(
            "simnet",
            quick().cancel_token(token).on_progress(move |p| {
                if p.phase == Phase::Training && p.epoch == 1 {
                    t.cancel();
                }
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(db.models().unwrap().len(), 1);
    assert_eq!(db.active_model().version, 1);
    assert_eq!(db.pending_job().unwrap(), None);
    // And the database trains normally afterwards.
    assert!(db.train_extractor_with("simnet", quick().epochs(1)).is_ok());
}

#[test]
fn every_miner_trains_through_the_job() {
    // The default is `supcon`; the paper's miners go through the same job end to end, each
    // with its own batch kind (pairs, one-vs-many) reaching the plugin's loss.
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    for miner in lookalike::training::miners::MINERS {
        let r = db
            .train_extractor_with(
                "simnet",
                quick().epochs(1).miner(*miner).activate(Activate::Never),
            )
            .unwrap_or_else(|e| panic!("{miner}: {e}"));
        assert_eq!(r.miner, *miner);
        assert!(r.pairs_seen > 0, "{miner} saw no pairs");
        assert!(r.after.accuracy_at_1.is_finite(), "{miner}");
    }
    // Without the proxy loss (the papers' objectives alone) too.
    let r = db
        .train_extractor_with(
            "simnet",
            quick()
                .epochs(1)
                .proxy_weight(0.0)
                .activate(Activate::Never),
        )
        .unwrap();
    assert!(r.after.accuracy_at_1.is_finite());
    // Models were stored, never activated.
    assert_eq!(db.active_model().version, 1);
}

#[test]
fn a_resume_after_the_labels_changed_is_refused_and_keeps_the_checkpoint() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    interrupt_in_epoch_1(&db);
    // A new label with enough images: the job's label proxies no longer fit.
    let data = sample();
    for (bytes, _) in data.iter().take(4) {
        db.insert_image(bytes, Some("new-label")).unwrap();
    }
    let e = db
        .train_extractor_with("simnet", quick().resume(true))
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("labels"),
        "{e}"
    );
    assert_eq!(
        db.pending_job().unwrap(),
        Some(("simnet".into(), String::new(), 1)),
        "the refused resume left the checkpoint"
    );
}

#[test]
fn bad_requests_are_typed_errors() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let e = db
        .train_extractor_with("simnet", quick().miner("hardest"))
        .unwrap_err();
    assert!(
        matches!(e, Error::UnknownMiner { .. }) && e.to_string().contains("opms"),
        "{e}"
    );
    assert!(matches!(
        db.train_extractor("nope"),
        Err(Error::UnknownExtractor { .. })
    ));
    assert!(matches!(
        db.train_extractor("classic"),
        Err(Error::NotTrainable(_))
    ));
    assert!(matches!(
        db.train_extractor_with("simnet", quick().batch(8, 6, 0)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        db.train_extractor_with("simnet", quick().resume(true)),
        Err(Error::InvalidArgument(_))
    ));
    // A job refused as InvalidArgument whose message names the option.
    let refused_naming = |opts: TrainOptions, option: &str| {
        let e = db.train_extractor_with("simnet", opts).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains(option)),
            "{e}"
        );
    };
    for w in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            db.train_extractor_with("simnet", quick().proxy_weight(w)),
            Err(Error::InvalidArgument(_))
        ));
        let sgd = OptimiserKind::SgdNesterov {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: w,
        };
        refused_naming(quick().optimiser(sgd), "weight_decay");
    }
    for share in [-0.1, 1.0, f64::NAN] {
        refused_naming(quick().warmup(share), "warmup");
    }
    // Nothing was trained by the refused jobs.
    assert_eq!(db.models().unwrap().len(), 1);
    // A second job while one runs.
    let second = Arc::new(Mutex::new(None));
    let (db2, slot) = (db.clone(), second.clone());
    db.train_extractor_with(
        "simnet",
        quick().epochs(1).on_progress(move |p| {
            let mut s = slot.lock().unwrap();
            if p.phase == Phase::Training && s.is_none() {
                *s = Some(matches!(
                    db2.train_extractor("simnet"),
                    Err(Error::JobRunning)
                ));
            }
        }),
    )
    .unwrap();
    assert_eq!(*second.lock().unwrap(), Some(true));
    // Too little data: two labels of two images.
    let small = tempdir();
    let db = open(small.path(), relaxed());
    let data = sample();
    for i in [0, 1, 30, 31] {
        db.insert_image(&data[i].0, Some(&data[i].1)).unwrap();
    }
    let e = db.train_extractor("simnet").unwrap_err();
    assert!(matches!(e, Error::NotEnoughData(_)), "{e}");
    // Every label with one image; one label only: nothing to learn similarity from.
    for (dir, labels) in [
        (
            tempdir(),
            (0..20).map(|i| format!("l{i}")).collect::<Vec<_>>(),
        ),
        (tempdir(), vec!["one".to_string(); 20]),
    ] {
        let db = open(dir.path(), relaxed());
        for (i, l) in labels.iter().enumerate() {
            db.insert_image(&data[i * 13].0, Some(l)).unwrap();
        }
        let e = db.train_extractor("simnet").unwrap_err();
        assert!(matches!(e, Error::NotEnoughData(_)), "{e}");
        assert_eq!(db.models().unwrap().len(), 1);
    }
}

#[test]
fn scorer_training_reports_the_papers_cases() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let r = db
        .train_scorer(
            "mlp-diff",
            lookalike::ScorerTrainOptions {
                epochs: 3,
                pairs_per_epoch: 2048,
                pairs_per_case: 200,
                held_out_labels: vec!["bag".into(), "sneaker".into()],
                seed: 2,
                ..Default::default()
            },
        )
        .unwrap();
    let cases: Vec<&str> = r.cases.iter().map(|c| c.case).collect();
    assert_eq!(
        cases,
        [
            "similar, seen",
            "dissimilar, seen",
            "similar, unseen",
            "dissimilar, unseen",
            "dissimilar, seen and unseen"
        ]
    );
    assert_eq!(r.history.len(), 3);
    assert!(r.roc_auc > 0.6, "ROC-AUC {}", r.roc_auc);
    assert_eq!(r.roc.first(), Some(&(0.0, 0.0)));
    assert_eq!(r.roc.last(), Some(&(1.0, 1.0)));
    // The scorer plugs into queries and `same`.
    let q = sample()[0].0.clone();
    let hits = db
        .nearest_with(&q, &lookalike::Query::k(5).rerank(r.scorer.clone(), 20))
        .unwrap();
    assert!(hits.iter().all(|h| h.score.is_some()));
    let p = db
        .same(
            lookalike::ImageId(1),
            lookalike::ImageId(2),
            r.scorer.as_ref(),
        )
        .unwrap();
    assert!((0.0..=1.0).contains(&p));
    // Typed errors.
    assert!(matches!(
        db.train_scorer("nope", Default::default()),
        Err(Error::InvalidArgument(_))
    ));
    let bad = lookalike::ScorerTrainOptions {
        held_out_labels: vec!["unicorn".into()],
        ..Default::default()
    };
    assert!(matches!(
        db.train_scorer("mlp-diff", bad),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn by_default_a_worse_model_is_stored_but_not_activated() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    // One tiny epoch cannot beat the default extractor on this sample.
    let r = db
        .train_extractor_with("simnet", quick().epochs(1).steps_per_epoch(1))
        .unwrap();
    assert!(r.after.accuracy_at_1 <= r.before.accuracy_at_1, "{r:?}");
    assert!(!r.activated);
    assert!(
        r.decision.starts_with("stored, not activated: not better"),
        "{}",
        r.decision
    );
    assert_eq!(db.active_model().version, 1);
    assert_eq!(
        db.models().unwrap().len(),
        2,
        "stored and listed all the same"
    );
}

mod pairs_only {
    //! SimNet under another name whose loss takes pairs only, as a third-party plugin written
    //! before the `labelled` batch kind might.
    use lookalike::lookalike_plugin::candle_core::{Tensor, Var};
    use lookalike::lookalike_plugin::{
        Extractor, ExtractorPlugin, PluginError, Trainable, TrainingBatch,
    };
    use lookalike::simnet::SimNetPlugin;

    #[derive(Debug)]
    pub struct PairsOnly;

    #[derive(Debug)]
    struct PairsOnlyTrainable(Box<dyn Trainable>);

    impl Trainable for PairsOnlyTrainable {
        fn forward_train(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
            self.0.forward_train(batch)
        }
        fn loss(&self, batch: TrainingBatch<'_>) -> Result<Tensor, PluginError> {
            match batch {
                TrainingBatch::Pairs { .. } => self.0.loss(batch),
                other => Err(PluginError::UnsupportedBatch {
                    got: other.kind(),
                    takes: "pairs".into(),
                }),
            }
        }
        fn vars(&self) -> Vec<Var> {
            self.0.vars()
        }
        fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
            self.0.save_weights()
        }
        fn freeze(&self) -> Result<Box<dyn Extractor>, PluginError> {
            self.0.freeze()
        }
    }

    impl ExtractorPlugin for PairsOnly {
        fn name(&self) -> &str {
            "pairs-only"
        }
        fn build(
            &self,
            config: &str,
            weights: Option<&[u8]>,
        ) -> Result<Box<dyn Extractor>, PluginError> {
            SimNetPlugin.build(config, weights)
        }
        fn trainable(
            &self,
            config: &str,
            weights: Option<&[u8]>,
        ) -> Option<Result<Box<dyn Trainable>, PluginError>> {
            SimNetPlugin
                .trainable(config, weights)
                .map(|r| r.map(|t| Box::new(PairsOnlyTrainable(t)) as Box<dyn Trainable>))
        }
    }
}

#[test]
fn a_plugin_without_a_loss_for_the_miners_batches_stops_the_job_and_changes_nothing() {
    let dir = tempdir();
    let db = open(
        dir.path(),
        relaxed().register(Arc::new(pairs_only::PairsOnly)),
    );
    let data = sample();
    db.insert_images(data.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap();
    let e = db.train_extractor_with("pairs-only", quick()).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Plugin {
                source: lookalike::lookalike_plugin::PluginError::UnsupportedBatch { .. },
                ..
            }
        ) && text.contains("pairs-only"),
        "{text}"
    );
    assert_eq!(db.models().unwrap().len(), 1);
    assert_eq!(db.active_model().version, 1);
    assert_eq!(db.pending_job().unwrap(), None);
    // The same plugin trains with a miner whose batches it takes.
    let r = db
        .train_extractor_with("pairs-only", quick().epochs(1).miner("opms"))
        .unwrap();
    assert!(r.pairs_seen > 0);
}

#[test]
fn images_removed_during_a_job_are_skipped_not_fatal() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let ids = db.ids();
    let remover = db.clone();
    let removed = Arc::new(AtomicBool::new(false));
    let flag = removed.clone();
    // At the first training step, remove a third of the images (every label loses some).
    let opts = quick().on_progress(move |p| {
        if p.phase == Phase::Training && !flag.swap(true, Ordering::SeqCst) {
            for id in ids.iter().step_by(3) {
                remover.remove(*id).unwrap();
            }
        }
    });
    let report = db.train_extractor_with("simnet", opts).unwrap();
    assert!(removed.load(Ordering::SeqCst));
    assert!(report.vanished > 0, "{report:?}");
    assert_eq!(db.len(), 200);
    // The new model holds exactly the images that are left.
    assert_eq!(db.index_info().len, 200);
}

/// Many labels with three images each, every label one object in three styles: the shape of
/// product photos per SKU or the same icon in several themes.
#[test]
fn few_images_per_label_train_on_more_labels_and_hold_out_whole_labels() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    for label in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(label);
        let cells: Vec<[u8; 3]> = (0..16).map(|_| rng.random()).collect();
        for style in 0..3u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let c = cells[((y / 8) * 4 + x / 8) as usize];
                match style {
                    0 => image::Rgb(c),
                    1 => image::Rgb(c.map(|v| v / 2 + 64)),
                    _ => image::Rgb(c.map(|v| v.saturating_add(((x + y) % 7) as u8 * 6))),
                }
            });
            let png = crate::common::encode(&img, image::ImageFormat::Png);
            db.insert_image(&png, Some(&format!("sku-{label}")))
                .unwrap();
        }
    }
    // Two images of a label that has no third: a negative-only label would have one.
    db.insert_image(&crate::common::noise_png(5, 32), Some("single"))
        .unwrap();
    let r = db
        .train_extractor_with("simnet", quick().epochs(2).activate(Activate::Never))
        .unwrap();
    assert_eq!(r.holdout, lookalike::Holdout::Labels);
    // 10 % of the 40 labels with pairs, one query each against its two other images.
    assert_eq!(r.after.queries, 4);
    assert_eq!(r.before.queries, 4);
    assert_eq!(r.epochs, 2);
    assert!(r.images_seen > 0 && r.pairs_seen > 0);
    assert!(r.decision.contains("never"), "{}", r.decision);
}

#[test]
fn initial_weights_of_another_architecture_stop_the_job_before_training() {
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    for weights in [b"not safetensors".to_vec(), {
        // Well-formed safetensors with tensors SimNet does not have.
        use lookalike::lookalike_plugin::candle_core::{DType, Device, Tensor};
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let f = dir.path().join("other.safetensors");
        lookalike::lookalike_plugin::candle_core::safetensors::save(
            &std::collections::HashMap::from([("features.0.weight".to_string(), t)]),
            &f,
        )
        .unwrap();
        std::fs::read(&f).unwrap()
    }] {
        let e = db
            .train_extractor_with("simnet", quick().initial_weights(weights))
            .unwrap_err();
        assert!(matches!(e, Error::Plugin { .. }), "{e}");
        assert_eq!(
            db.models().unwrap().len(),
            1,
            "no model stored, none activated"
        );
        assert_eq!(db.pending_job().unwrap(), None);
    }
}

/// Random EfficientNet-Lite0 weights of the right architecture, as a file.
fn random_effnet(dir: &std::path::Path) -> std::path::PathBuf {
    use lookalike::lookalike_plugin::nn;
    let (varmap, vb) = nn::new_varmap();
    nn::with_init_seed(9, || {
        lookalike_fused::efficientnet::EfficientNetLite0::new(vb)
    })
    .unwrap();
    let f = dir.join("effnet.safetensors");
    std::fs::write(&f, nn::save_varmap(&varmap).unwrap()).unwrap();
    f
}

#[test]
fn auto_chooses_simnet_presets_by_the_images() {
    // The bundled Fashion-MNIST sample: greyscale, 28 x 28.
    let dir = tempdir();
    let db = filled(dir.path(), relaxed());
    let r = db.train_extractor_with("auto", quick()).unwrap();
    assert_eq!(
        (r.extractor.as_str(), r.config.as_str()),
        ("simnet", "cpu-gray")
    );
    assert!(r.chosen.as_deref().unwrap().contains("greyscale"), "{r:?}");
    // Colour images: SimNet cpu.
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let images: Vec<(Vec<u8>, String)> = (0..48)
        .map(|i| {
            (
                crate::common::class_png(i % 4, i.into()),
                format!("c{}", i % 4),
            )
        })
        .collect();
    db.insert_images(images.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap();
    let r = db.train_extractor_with("auto", quick()).unwrap();
    assert_eq!((r.extractor.as_str(), r.config.as_str()), ("simnet", "cpu"));
    assert!(r.chosen.as_deref().unwrap().contains("colour"), "{r:?}");
    // SimNet's embeddings are not derived from the active model's: every image decoded.
    assert!(!r.embedded_from_features);
    // A named extractor is not a choice.
    let r = db.train_extractor_with("simnet", quick()).unwrap();
    assert_eq!(r.chosen, None);
}

#[test]
fn auto_on_an_efficientnet_database_trains_a_head_on_frozen_features() {
    let dir = tempdir();
    let weights = random_effnet(dir.path());
    let path = dir.path().join("db");
    let images: Vec<(Vec<u8>, String)> = (0..24)
        .map(|i| {
            (
                crate::common::class_png(i % 4, i.into()),
                format!("c{}", i % 4),
            )
        })
        .collect();
    let phases = Arc::new(Mutex::new(Vec::new()));
    let seen = phases.clone();
    let r = {
        let db = Db::open_with(
            &path,
            relaxed()
                .extractor("efficientnet-lite0", "")
                .extractor_weights(&weights),
        )
        .unwrap();
        db.insert_images(images.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
            .unwrap();
        let opts = quick()
            .batch(16, 3, 4)
            .activate(Activate::Always)
            .on_progress(move |p| seen.lock().unwrap().push((p.phase, p.embedded)));
        db.train_extractor_with("auto", opts).unwrap()
    };
    assert_eq!(
        (r.extractor.as_str(), r.config.as_str()),
        ("efficientnet-lite0", "head")
    );
    assert!(r.chosen.as_deref().unwrap().contains("EfficientNet-Lite0"));
    {
        let db = Db::open(&path).unwrap();
        // A budget the feature bank uses up: no step, so nothing stored or re-embedded.
        let e = db
            .train_extractor_with("auto", quick().max_minutes(1e-6))
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("before the first training step")),
            "{e}"
        );
        assert_eq!(db.models().unwrap().len(), 2);
        assert_eq!(db.pending_job().unwrap(), None);
        // Weights of something else given to auto on this database: refused, nothing stored.
        let e = db
            .train_extractor_with("auto", quick().initial_weights(b"not weights".to_vec()))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(db.models().unwrap().len(), 2);
    }
    assert!(r.activated && r.steps > 0 && r.images_seen > 0);
    // The head's embeddings came from the plain network's stored ones (checked against
    // queries, which run the whole network, below).
    assert!(r.embedded_from_features, "{r:?}");
    // So were the unaugmented features of the training and validation images.
    assert_eq!(r.stored_features, 24, "{r:?}");
    let phases = phases.lock().unwrap();
    // The frozen features were computed once per view, before any step.
    let features: Vec<_> = phases.iter().filter(|p| p.0 == Phase::Features).collect();
    assert!(!features.is_empty());
    let first_step = phases.iter().position(|p| p.0 == Phase::Training).unwrap();
    let last_features = phases.iter().rposition(|p| p.0 == Phase::Features).unwrap();
    assert!(last_features < first_step);
    // Stored, active and usable after reopening without the weights file.
    let db = Db::open(&path).unwrap();
    let m = db.active_model();
    assert_eq!(
        (m.extractor.as_str(), m.config.as_str(), m.dim),
        ("efficientnet-lite0", "head", 1280)
    );
    // Every image finds itself: its stored embedding (the head applied to the plain network's
    // stored features) is the one a query computes from its pixels.
    for (bytes, _) in &images {
        let hits = db.nearest(bytes, 1).unwrap();
        assert!(hits[0].distance < 1e-4, "an image finds itself: {hits:?}");
    }
}
