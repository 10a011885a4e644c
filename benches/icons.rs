//! Cross-style identity on the icon-theme development set (issue 18): the same icon names drawn
//! by Debian's icon themes (`scripts/icon-set.py` makes the set; it is not shipped).
//!
//! ```text
//! python3 scripts/icon-set.py target/icon-set
//! cargo bench --bench icons [-- --dir target/icon-set --held-out 360 --minutes 0 --seed 1
//!                               --data ../shared/data --extractor simnet --config cpu]
//! ```
//!
//! Names are split, seeded: `--held-out` names are new labels, the rest train. Every icon of a
//! training name is stored labelled with its name. For each held-out name two of the themes
//! that draw it are drawn at random: one icon is stored unlabelled (the answer), the other is
//! the query. Identity@1: the nearest stored image of a query is its answer (the training icons
//! are distractors). Measured with the default extractor, with EfficientNet-Lite0 untrained
//! (when its weights are in `--data`), and, with `--minutes M`, after a training job of M
//! minutes (activated whatever it scored, to measure it; the decision the default rule would
//! have made is printed): `--extractor simnet --config cpu` (default) from scratch on the
//! default-extractor database, or `--extractor fused --config effnet` on the EfficientNet-Lite0
//! database, starting from the EfficientNet-Lite0 weights (`TrainOptions::initial_weights`).
//!
//! Prints figures only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lookalike::{Activate, Db, Durability, ImageMeta, Options, TrainOptions};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    dir: PathBuf,
    held_out: usize,
    minutes: f64,
    seed: u64,
    data: PathBuf,
    extractor: String,
    config: String,
    cache: Option<PathBuf>,
    plot: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("target/icon-set"),
        held_out: 360,
        minutes: 0.0,
        seed: 1,
        data: PathBuf::from("../shared/data"),
        extractor: "simnet".into(),
        config: "cpu".into(),
        cache: None,
        plot: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--held-out" => a.held_out = v.parse().unwrap_or(a.held_out),
            "--minutes" => a.minutes = v.parse().unwrap_or(a.minutes),
            "--seed" => a.seed = v.parse().unwrap_or(a.seed),
            "--data" => a.data = PathBuf::from(v),
            "--extractor" => a.extractor = v,
            "--config" => a.config = v,
            "--cache" => a.cache = Some(PathBuf::from(v)),
            "--plot" => a.plot = Some(PathBuf::from(v)),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// name -> [(theme, PNG bytes)], themes in name order.
type Icons = BTreeMap<String, Vec<(String, Vec<u8>)>>;

fn load(dir: &Path) -> Res<Icons> {
    let mut icons: Icons = BTreeMap::new();
    let mut themes: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    themes.sort();
    for t in themes {
        let theme = t
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for f in std::fs::read_dir(&t)? {
            let p = f?.path();
            if let Some(name) = p.file_stem().map(|s| s.to_string_lossy().into_owned()) {
                icons
                    .entry(name)
                    .or_default()
                    .push((theme.clone(), std::fs::read(&p)?));
            }
        }
    }
    icons.retain(|_, v| v.len() >= 2);
    Ok(icons)
}

/// The held-out queries: (name, query bytes); and what to store: (bytes, meta).
struct Set {
    queries: Vec<(String, Vec<u8>)>,
    stored: Vec<(Vec<u8>, ImageMeta)>,
    train_names: usize,
}

fn make_set(icons: &Icons, held_out: usize, seed: u64) -> Set {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names: Vec<&String> = icons.keys().collect();
    names.shuffle(&mut rng);
    let held = held_out.min(names.len() / 2);
    let mut queries = Vec::new();
    let mut stored = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut variants: Vec<&(String, Vec<u8>)> = icons[*name].iter().collect();
        if i < held {
            variants.shuffle(&mut rng);
            let (answer, query) = (variants[0], variants[1]);
            queries.push(((*name).clone(), query.1.clone()));
            stored.push((
                answer.1.clone(),
                ImageMeta::default().source(format!("{}/{name}", answer.0)),
            ));
        } else {
            for (theme, bytes) in variants {
                stored.push((
                    bytes.clone(),
                    ImageMeta::label((*name).clone()).source(format!("{theme}/{name}")),
                ));
            }
        }
    }
    Set {
        queries,
        stored,
        train_names: names.len() - held,
    }
}

/// Share of queries whose nearest stored image is the same name (in another theme).
fn identity_at_1(db: &Db, queries: &[(String, Vec<u8>)]) -> Res<f64> {
    let q = lookalike::Query::k(1);
    let images: Vec<&[u8]> = queries.iter().map(|(_, b)| b.as_slice()).collect();
    let mut hits = 0;
    for ((name, _), r) in queries.iter().zip(db.nearest_batch(&images, &q)?) {
        let found = r?
            .first()
            .and_then(|h| h.source.clone())
            .and_then(|s| s.split_once('/').map(|(_, n)| n.to_string()));
        if found.as_deref() == Some(name.as_str()) {
            hits += 1;
        }
    }
    Ok(hits as f64 / queries.len().max(1) as f64)
}

/// The database at `path` holding `set`, filled afresh; or, with a cache folder, a copy of
/// the one filled there by an earlier run with the same seed and split (filling the
/// EfficientNet-Lite0 one takes minutes).
fn fill(path: &Path, options: Options, set: &Set, cache: Option<(&Path, String)>) -> Res<Db> {
    let _ = std::fs::remove_dir_all(path);
    let options = options.durability(Durability::Relaxed);
    let cached = cache.map(|(dir, key)| dir.join(key));
    if let Some(c) = &cached {
        if c.join("READY").exists() {
            copy_dir(c, path)?;
            return Ok(Db::open_with(path, options)?);
        }
    }
    let db = Db::open_with(path, options.clone())?;
    for chunk in set.stored.chunks(512) {
        db.insert_images_with(
            chunk.iter().map(|(b, m)| (b.as_slice(), m)),
            lookalike::InsertMode::Always,
        )?;
    }
    if let Some(c) = &cached {
        db.flush()?;
        drop(db); // the last handle closes the database
        let _ = std::fs::remove_dir_all(c);
        copy_dir(path, c)?;
        std::fs::write(c.join("READY"), b"")?;
        return Ok(Db::open_with(path, options)?);
    }
    Ok(db)
}

fn copy_dir(from: &Path, to: &Path) -> Res<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if e.file_name() != "READY" {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

fn main() -> Res<()> {
    let a = args();
    if !a.dir.is_dir() {
        println!(
            "SKIP: no icon set in {} (make it with scripts/icon-set.py)",
            a.dir.display()
        );
        return Ok(());
    }
    let icons = load(&a.dir)?;
    let set = make_set(&icons, a.held_out, a.seed);
    println!(
        "{} names drawn by 2+ themes: {} training names ({} icons stored labelled), {} held-out \
         names (one icon stored unlabelled, another as the query)",
        icons.len(),
        set.train_names,
        set.stored.len() - set.queries.len(),
        set.queries.len()
    );
    let work = tempfile::tempdir()?;
    println!();
    println!(
        "| model (seed {}) | cross-style identity@1 on held-out names |",
        a.seed
    );
    println!("|---|---|");
    let cache = |what: &str| {
        a.cache
            .as_deref()
            .map(|d| (d, format!("{what}-seed{}-held{}", a.seed, a.held_out)))
    };
    let classic = fill(
        &work.path().join("classic.db"),
        Options::default(),
        &set,
        cache("classic"),
    )?;
    let base = identity_at_1(&classic, &set.queries)?;
    println!("| `classic` (default, untrained) | {:.1} % |", base * 100.0);
    let weights = a
        .data
        .join("efficientnet-lite0/efficientnet-lite0.safetensors");
    let mut effnet_db = None;
    let mut effnet_identity = 0.0;
    if weights.exists() {
        let opts = Options::default()
            .extractor("efficientnet-lite0", "")
            .extractor_weights(&weights);
        let db = fill(&work.path().join("effnet.db"), opts, &set, cache("effnet"))?;
        let e = identity_at_1(&db, &set.queries)?;
        effnet_identity = e;
        println!(
            "| `efficientnet-lite0` (pretrained, untrained here) | {:.1} % |",
            e * 100.0
        );
        effnet_db = Some(db);
    }
    if a.minutes > 0.0 {
        // `fused effnet` fine-tunes on the EfficientNet-Lite0 database from its weights;
        // anything else trains from scratch on the `classic` one.
        let (db, base_name, opts) = match (&effnet_db, a.extractor.as_str()) {
            (Some(db), "fused") => (
                db,
                "efficientnet-lite0",
                // 224 px through two backbones: batches of 128 do not fit in 24 GiB.
                TrainOptions::default()
                    .initial_weights(std::fs::read(&weights)?)
                    .batch(40, 4, 8),
            ),
            // `auto` on the EfficientNet-Lite0 database: the job chooses (a trained head).
            (Some(db), "auto") => (db, "efficientnet-lite0", TrainOptions::default()),
            _ => (&classic, "classic", TrainOptions::default()),
        };
        let opts = if a.extractor == "auto" {
            opts
        } else {
            opts.config(a.config.clone())
        };
        let opts = opts
            .max_minutes(a.minutes)
            .seed(a.seed)
            .activate(Activate::Always);
        let started = Instant::now();
        let r = db.train_extractor_with(&a.extractor, opts)?;
        let trained = identity_at_1(db, &set.queries)?;
        println!(
            "| `{}` (`{} {}`) trained {:.1} min on the `{base_name}` database ({} epochs) | {:.1} % |",
            a.extractor,
            r.extractor,
            r.config,
            r.train_seconds / 60.0,
            r.epochs,
            trained * 100.0
        );
        println!();
        println!(
            "job: held-out split by {:?}, its own validation accuracy@1 {:.1} % -> {:.1} % \
             ({} queries); the default rule would have said: {} ({:.0} s in all)",
            r.holdout,
            r.before.accuracy_at_1 * 100.0,
            r.after.accuracy_at_1 * 100.0,
            r.after.queries,
            Activate::IfBetter.decide(&r.before, &r.after).1,
            started.elapsed().as_secs_f64()
        );
        println!(
            "job: features of {} images read from the stored embeddings; stored images \
             embedded with the new model in {:.1} s{}",
            r.stored_features,
            r.embed_seconds,
            if r.embedded_from_features {
                " (from the stored features)"
            } else {
                " (decoded and run through the network)"
            }
        );
        if let Some(path) = &a.plot {
            let untrained = if base_name == "efficientnet-lite0" {
                effnet_identity
            } else {
                base
            };
            plot(path, &r, (base_name, untrained), trained)?;
        }
        if let Some(why) = &r.chosen {
            println!("auto chose {} {}: {why}", r.extractor, r.config);
        }
        println!();
        println!("| training minutes | job's validation accuracy@1 | mAP@10 |");
        println!("|---|---|---|");
        let before = std::iter::once((0.0, Some(r.before)));
        for (minutes, m) in before.chain(r.history.iter().map(|e| (e.minutes, e.validation))) {
            if let Some(m) = m {
                println!(
                    "| {minutes:.2} | {:.1} % | {:.1} % |",
                    m.accuracy_at_1 * 100.0,
                    m.map_at_10 * 100.0
                );
            }
        }
    }
    Ok(())
}

/// The job's validation curve (whole held-out labels) against training minutes (the first
/// stretch, before any step, is the feature bank of a head job), with the benchmark's
/// identity@1 of the starting model, after the job, and the issue's target (twice the start).
fn plot(path: &Path, r: &lookalike::TrainReport, start: (&str, f64), after: f64) -> Res<()> {
    use plotters::prelude::*;
    let mut points = vec![(0.0, r.before.accuracy_at_1 * 100.0)];
    points.extend(
        r.history
            .iter()
            .filter_map(|e| e.validation.map(|m| (e.minutes, m.accuracy_at_1 * 100.0))),
    );
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let target = 2.0 * start.1 * 100.0;
    let ymax = points.iter().map(|p| p.1).fold(target, f64::max) * 1.15;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} {} on the icon-theme set", r.extractor, r.config),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("training minutes (2 cores; the feature bank counts)")
        .y_desc("%")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))?
        .label("job's validation accuracy@1 (held-out names)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    let flat = |v: f64| vec![(0.0, v), (xmax, v)];
    chart
        .draw_series(LineSeries::new(
            flat(start.1 * 100.0),
            BLACK.stroke_width(2),
        ))?
        .label(format!("bench identity@1: {} before", start.0))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    chart
        .draw_series(LineSeries::new(flat(after * 100.0), GREEN.stroke_width(2)))?
        .label("bench identity@1: after the job")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
    chart
        .draw_series(LineSeries::new(flat(target), RED.stroke_width(2)))?
        .label("target: twice the start")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
