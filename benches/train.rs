//! Training benchmark on Fashion-MNIST: fills a database with the 60,000 training images
//! (labelled), trains an extractor in it (`Db::train_extractor_with`, default SimNet `cpu`
//! with the supervised contrastive loss over whole batches) within a time budget, and measures the switched-to model the way the database
//! benchmark measures extractors: the 10,000 test images as queries against the stored train
//! images, accuracy@1 and mAP@10. Prints the validation curve (accuracy@1 against training
//! minutes), training throughput (images/s, pairs/s) and the share of training time spent
//! waiting on the loader threads; writes the curve as an SVG with `--plot FILE`.
//!
//! ```text
//! cargo bench --bench train -- --minutes 15 --epochs 4 --plot docs/figures/simnet-fashion-mnist.svg
//! cargo bench --bench train -- --train 6000 --test 1000 --minutes 2 --miner naive   # smaller
//! options: --epochs N --miner supcon|opms|naive|balanced|one-vs-many --proxy-weight W
//!          --extractor NAME
//!          --config C --lr SGD_LR [--weight-decay WD] | --adam LR --constant-lr --warmup SHARE
//!          --batch SIZE,PER_LABEL,RANDOM --shift PIXELS (random shifts; default 0)
//!          --seed S --workers W
//!          --scorer [--roc-plot FILE]: then train the MLP scorer (Table 2 with two held-out
//!          labels, ROC) and re-rank the test queries with it
//!          --no-train: no extractor training (with --scorer: the scorer on the default
//!          extractor's features)
//! ```
//!
//! Prints figures only; nothing here asserts a quality.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lookalike::datasets::{fashion_mnist, LabelledImages, Split, FASHION_MNIST_CLASSES};
use lookalike::{
    Augment, Db, Durability, IndexKind, OptimiserKind, Options, Phase, Query, TrainOptions,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    data: PathBuf,
    train: usize,
    test: usize,
    minutes: f64,
    epochs: usize,
    miner: String,
    proxy_weight: f64,
    extractor: String,
    config: String,
    lr: Option<f64>,
    adam: Option<f64>,
    weight_decay: f64,
    warmup: f64,
    batch: (usize, usize, usize),
    seed: u64,
    plot: Option<PathBuf>,
    workers: usize,
    /// Random shifts of up to this many pixels (the jobs' default augmentation: none).
    shift: u32,
    constant_lr: bool,
    /// Skip the extractor training (the default extractor stays active).
    no_train: bool,
    /// Also train the MLP scorer: Table 2 cases with two held-out labels, ROC, re-ranking.
    scorer: bool,
    roc_plot: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        data: PathBuf::from("../shared/data/fashion-mnist"),
        train: 60_000,
        test: 10_000,
        minutes: 15.0,
        epochs: 4,
        miner: "supcon".into(),
        proxy_weight: TrainOptions::default().proxy_weight,
        extractor: "simnet".into(),
        config: String::new(),
        lr: None,
        adam: None,
        weight_decay: 0.0,
        warmup: 0.0,
        batch: (128, 8, 8),
        seed: 0,
        plot: None,
        workers: 1,
        shift: 0,
        constant_lr: false,
        no_train: false,
        scorer: false,
        roc_plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--data" => a.data = PathBuf::from(val()),
            "--train" => a.train = val().parse().unwrap_or(a.train),
            "--test" => a.test = val().parse().unwrap_or(a.test),
            "--minutes" => a.minutes = val().parse().unwrap_or(a.minutes),
            "--epochs" => a.epochs = val().parse().unwrap_or(a.epochs),
            "--miner" => a.miner = val(),
            "--proxy-weight" => a.proxy_weight = val().parse().unwrap_or(a.proxy_weight),
            "--extractor" => a.extractor = val(),
            "--config" => a.config = val(),
            "--lr" => a.lr = val().parse().ok(),
            "--adam" => a.adam = val().parse().ok(),
            "--weight-decay" => a.weight_decay = val().parse().unwrap_or(a.weight_decay),
            "--warmup" => a.warmup = val().parse().unwrap_or(a.warmup),
            "--batch" => {
                let v: Vec<usize> = val().split(',').filter_map(|x| x.parse().ok()).collect();
                if let [b, k, r] = v[..] {
                    a.batch = (b, k, r);
                }
            }
            "--seed" => a.seed = val().parse().unwrap_or(0),
            "--plot" => a.plot = Some(PathBuf::from(val())),
            "--workers" => a.workers = val().parse().unwrap_or(1),
            "--shift" => a.shift = val().parse().unwrap_or(a.shift),
            "--scorer" => a.scorer = true,
            "--constant-lr" => a.constant_lr = true,
            "--no-train" => a.no_train = true,
            "--roc-plot" => a.roc_plot = Some(PathBuf::from(val())),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

fn label(set: &LabelledImages, i: usize) -> &'static str {
    FASHION_MNIST_CLASSES[set.labels[i] as usize % 10]
}

fn main() -> Res<()> {
    let a = args();
    if !a.data.join("train-images-idx3-ubyte.gz").exists() {
        println!("SKIP: Fashion-MNIST not found in {}", a.data.display());
        return Ok(());
    }
    let train = fashion_mnist(&a.data, Split::Train)?;
    let test = fashion_mnist(&a.data, Split::Test)?;
    let (n_train, n_test) = (a.train.min(train.len()), a.test.min(test.len()));
    let tmp = tempfile::tempdir()?;
    let db = Db::open_with(
        tmp.path().join("fm"),
        Options::default()
            .durability(Durability::Relaxed)
            .index(IndexKind::Exact),
    )?;
    let t = Instant::now();
    for chunk in (0..n_train).collect::<Vec<_>>().chunks(1000) {
        let pngs: Vec<Vec<u8>> = chunk
            .iter()
            .map(|&i| train.png(i))
            .collect::<Result<_, _>>()?;
        db.insert_images(
            pngs.iter()
                .zip(chunk)
                .map(|(b, &i)| (b.as_slice(), Some(label(&train, i)))),
        )?;
    }
    println!(
        "stored {n_train} Fashion-MNIST train images in {:.0} s (default extractor)",
        t.elapsed().as_secs_f64()
    );
    // The protocol below measures the trained model: it is activated whatever it scored.
    let mut opts = TrainOptions::default()
        .activate(lookalike::Activate::Always)
        .config(a.config.clone())
        .epochs(a.epochs)
        .max_minutes(a.minutes)
        .miner(a.miner.clone())
        .proxy_weight(a.proxy_weight)
        .batch(a.batch.0, a.batch.1, a.batch.2)
        .seed(a.seed)
        .cosine(!a.constant_lr)
        .warmup(a.warmup)
        .augment(Augment {
            shift: a.shift,
            ..Augment::flips()
        })
        .workers(a.workers);
    if let Some(lr) = a.lr {
        opts = opts.optimiser(OptimiserKind::SgdNesterov {
            lr,
            momentum: 0.9,
            weight_decay: a.weight_decay,
        });
    }
    if let Some(lr) = a.adam {
        opts = opts.optimiser(OptimiserKind::Adam { lr });
    }
    let last = Arc::new(Mutex::new(Instant::now()));
    let opts = opts.on_progress(move |p| {
        let mut l = match last.lock() {
            Ok(l) => l,
            Err(e) => e.into_inner(),
        };
        if let Some(m) = &p.validation {
            println!(
                "  epoch {} validation: accuracy@1 {:.2} %, mAP@10 {:.2} % ({:.1} min elapsed)",
                p.epoch,
                m.accuracy_at_1 * 100.0,
                m.map_at_10 * 100.0,
                p.elapsed_seconds / 60.0
            );
        } else if p.phase == Phase::Training && l.elapsed().as_secs() >= 30 {
            *l = Instant::now();
            println!(
                "  epoch {} step {}/{} loss {:.4} lambda {:?} {:.0} images/s {:.0} pairs/s",
                p.epoch, p.step, p.steps, p.loss, p.lambda, p.images_per_second, p.pairs_per_second
            );
        }
    });
    if a.no_train {
        // The active (default) extractor, untrained: for the scorer on features whose metric
        // was not learned from these labels.
        let (acc, map, secs) = protocol(&db, &test, n_test, &Query::k(10))?;
        println!(
            "no extractor training; {} active. Fashion-MNIST protocol ({n_test} test queries against {n_train} stored): accuracy@1 {:.2} %, mAP@10 {:.2} % ({secs:.0} s)",
            db.active_model().extractor,
            acc * 100.0,
            map * 100.0,
        );
        if a.scorer {
            scorer_section(&db, &test, n_test, &a, (acc, map))?;
        }
        return Ok(());
    }
    println!(
        "training {} {:?} with {} (proxy weight {}): {} epochs, at most {} minutes of training",
        a.extractor, a.config, a.miner, a.proxy_weight, a.epochs, a.minutes
    );
    let r = db.train_extractor_with(&a.extractor, opts)?;
    println!(
        "trained: {} epochs, {} steps, {} pairs, {} images in {:.1} min of training ({:.1} min in all)",
        r.epochs,
        r.steps,
        r.pairs_seen,
        r.images_seen,
        r.train_seconds / 60.0,
        r.total_seconds / 60.0
    );
    println!(
        "throughput: {:.1} images/s, {:.1} pairs/s; loader wait {:.2} % of training time",
        r.images_seen as f64 / r.train_seconds,
        r.pairs_seen as f64 / r.train_seconds,
        r.loader_wait_share * 100.0
    );
    println!(
        "held-out split ({} queries): before (active model) accuracy@1 {:.2} % mAP@10 {:.2} %, after {:.2} % / {:.2} %",
        r.after.queries,
        r.before.accuracy_at_1 * 100.0,
        r.before.map_at_10 * 100.0,
        r.after.accuracy_at_1 * 100.0,
        r.after.map_at_10 * 100.0
    );
    println!("| training minutes | validation accuracy@1 | validation mAP@10 |");
    println!("|---|---|---|");
    for e in &r.history {
        if let Some(m) = &e.validation {
            println!(
                "| {:.2} | {:.2} % | {:.2} % |",
                e.minutes,
                m.accuracy_at_1 * 100.0,
                m.map_at_10 * 100.0
            );
        }
    }
    let (acc, map, secs) = protocol(&db, &test, n_test, &Query::k(10))?;
    println!(
        "Fashion-MNIST protocol ({n_test} test queries against {n_train} stored): accuracy@1 {:.2} %, mAP@10 {:.2} % ({secs:.0} s)",
        acc * 100.0,
        map * 100.0,
    );
    if let Some(path) = &a.plot {
        plot(path, &r, &a)?;
        println!("curve written to {}", path.display());
    }
    if a.scorer {
        scorer_section(&db, &test, n_test, &a, (acc, map))?;
    }
    Ok(())
}

/// The MLP scorer on the trained model's embeddings: the paper's Table 2 with two labels held
/// out, then a scorer on all labels re-ranking the test queries' 50 nearest.
fn scorer_section(
    db: &Db,
    test: &LabelledImages,
    n_test: usize,
    a: &Args,
    plain: (f64, f64),
) -> Res<()> {
    let held = vec!["sandal".to_string(), "shirt".to_string()];
    let r = db.train_scorer(
        "mlp-diff",
        lookalike::ScorerTrainOptions {
            held_out_labels: held.clone(),
            seed: a.seed,
            ..Default::default()
        },
    )?;
    println!(
        "\nMLP scorer on model v{} embeddings, labels {held:?} held out of training ({} pairs, {:.0} s):",
        r.model_version, r.pairs_seen, r.seconds
    );
    println!("| case | pairs | accuracy |");
    println!("|---|---|---|");
    for c in &r.cases {
        println!("| {} | {} | {:.2} % |", c.case, c.pairs, c.accuracy * 100.0);
    }
    println!(
        "all validation pairs: accuracy {:.2} %, ROC-AUC {:.4}",
        r.accuracy * 100.0,
        r.roc_auc
    );
    if let Some(path) = &a.roc_plot {
        roc_plot(path, &r)?;
        println!("ROC curve written to {}", path.display());
    }
    // Re-ranking, the paper's pairs alone against the default mix with near-neighbour pairs.
    for (what, share) in [
        ("balanced pairs only (paper)", 0.0),
        ("with near-neighbour pairs (default)", 0.5),
    ] {
        let all = db.train_scorer(
            "mlp-diff",
            lookalike::ScorerTrainOptions {
                seed: a.seed,
                neighbour_share: share,
                ..Default::default()
            },
        )?;
        let q = Query::k(10).rerank(all.scorer.clone(), 50);
        let (acc, map, secs) = protocol(db, test, n_test, &q)?;
        println!(
            "re-ranking the 50 nearest with the MLP scorer, {what}, all labels ({:.0} s to train): accuracy@1 {:.2} % ({:+.2}), mAP@10 {:.2} % ({:+.2}) ({secs:.0} s)",
            all.seconds,
            acc * 100.0,
            (acc - plain.0) * 100.0,
            map * 100.0,
            (map - plain.1) * 100.0
        );
    }
    Ok(())
}

/// Test images against the stored train images: accuracy@1, mAP@10 and seconds.
fn protocol(db: &Db, test: &LabelledImages, n_test: usize, q: &Query) -> Res<(f64, f64, f64)> {
    let t = Instant::now();
    let (mut top1, mut ap_sum) = (0usize, 0f64);
    for i in 0..n_test {
        let hits = db.nearest_with(&test.png(i)?, q)?;
        let truth = label(test, i);
        if hits.first().and_then(|h| h.label.as_deref()) == Some(truth) {
            top1 += 1;
        }
        let (mut rel, mut ap) = (0usize, 0f64);
        for (rank, h) in hits.iter().enumerate() {
            if h.label.as_deref() == Some(truth) {
                rel += 1;
                ap += rel as f64 / (rank + 1) as f64;
            }
        }
        ap_sum += ap / 10.0;
    }
    Ok((
        top1 as f64 / n_test as f64,
        ap_sum / n_test as f64,
        t.elapsed().as_secs_f64(),
    ))
}

fn roc_plot(path: &std::path::Path, r: &lookalike::ScorerReport) -> Res<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (480, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("MLP scorer ROC (AUC {:.3})", r.roc_auc),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .draw()?;
    chart.draw_series(LineSeries::new(r.roc.iter().copied(), &BLUE))?;
    chart.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (1.0, 1.0)],
        &BLACK.mix(0.3),
    ))?;
    root.present()?;
    Ok(())
}

fn plot(path: &std::path::Path, r: &lookalike::TrainReport, a: &Args) -> Res<()> {
    use plotters::prelude::*;
    let points: Vec<(f64, f64)> = r
        .history
        .iter()
        .filter_map(|e| e.validation.map(|m| (e.minutes, m.accuracy_at_1 * 100.0)))
        .collect();
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymin = points
        .iter()
        .map(|p| p.1)
        .fold(r.before.accuracy_at_1 * 100.0, f64::min)
        .floor()
        - 1.0;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} {} on Fashion-MNIST ({}{}): validation accuracy@1",
                a.extractor,
                if a.config.is_empty() {
                    "cpu"
                } else {
                    &a.config
                },
                a.miner,
                if a.proxy_weight > 0.0 {
                    " + proxies"
                } else {
                    ""
                }
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..xmax, ymin..100f64)?;
    chart
        .configure_mesh()
        .x_desc("training minutes (2 cores)")
        .y_desc("accuracy@1 (%)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))?
        .label("trained model, after each epoch")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    let before = r.before.accuracy_at_1 * 100.0;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, before), (xmax, before)],
            &BLACK.mix(0.5),
        ))?
        .label("active model before the job (default extractor)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.5)));
    chart
        .draw_series(LineSeries::new(vec![(0.0, 93.0), (xmax, 93.0)], &RED))?
        .label("target 93 %")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// The command-line tool's allocator (src/main.rs), so the figures are the ones `lookalike
// train` gets.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
