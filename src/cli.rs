//! Command-line interface over the public API (binary only).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lookalike::{Db, Durability, ImageId, Options, Query};

/// An embeddable image-similarity database.
#[derive(Debug, Parser)]
#[command(name = "lookalike", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add image files, or whole folders (searched recursively).
    Add {
        /// The database directory (created if missing).
        db: PathBuf,
        /// Files or folders to add.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Label every added image with this.
        #[arg(long, conflicts_with = "folder_labels")]
        label: Option<String>,
        /// Label each image with the name of the folder that holds it.
        #[arg(long)]
        folder_labels: bool,
        /// Images per durable batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Extractor of a new database (see `stats` for the registered names).
        #[arg(long, default_value = "classic")]
        extractor: String,
        /// The extractor's configuration string (a preset name).
        #[arg(long, default_value = "")]
        config: String,
        /// Weights file (safetensors) for the extractor of a new database.
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Find the stored images most similar to an image file.
    Query {
        /// The database directory.
        db: PathBuf,
        /// The query image.
        image: PathBuf,
        /// How many results.
        #[arg(short, default_value_t = 10)]
        k: usize,
        /// Only images with this label (repeat for several).
        #[arg(long)]
        label: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print counts, labels, the active model and the index.
    Stats {
        /// The database directory.
        db: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train an extractor from the labelled images in the database and switch to it.
    Train {
        /// The database directory.
        db: PathBuf,
        /// The extractor plugin to train (for example simnet or fused).
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
        /// Store the new model without making it active.
        #[arg(long)]
        no_activate: bool,
        /// Make the new model active only if it beats the active one on the held-out split.
        #[arg(long)]
        if_better: bool,
    },
    /// List the stored model versions.
    Models {
        /// The database directory.
        db: PathBuf,
    },
    /// Make a stored model version the active one.
    Use {
        /// The database directory.
        db: PathBuf,
        /// The model version.
        version: u32,
    },
    /// Remove images by id.
    Remove {
        /// The database directory.
        db: PathBuf,
        /// Ids to remove.
        #[arg(required = true)]
        ids: Vec<ImageId>,
    },
}

/// `println!` that ends the program quietly when stdout is closed (`lookalike stats | head`)
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(2)
        }
    }
}

fn existing(db: &Path) -> lookalike::Result<Db> {
    if !db.join("store").exists() {
        return Err(lookalike::Error::InvalidArgument(format!(
            "{} is not a lookalike database (create one with `lookalike add`)",
            db.display()
        )));
    }
    Db::open(db)
}

/// Runs a command; the exit code says what happened (0: done; 1: `add` skipped some files).
fn run(cli: Cli) -> lookalike::Result<ExitCode> {
    match cli.command {
        Command::Add {
            db,
            paths,
            label,
            folder_labels,
            batch,
            extractor,
            config,
            weights,
        } => {
            let mut options = Options::default()
                .durability(Durability::Relaxed)
                .extractor(&extractor, &config);
            if let Some(w) = weights {
                options = options.extractor_weights(w);
            }
            add(
                &db,
                options,
                &paths,
                label.as_deref(),
                folder_labels,
                batch.max(1),
            )
        }
        Command::Query {
            db,
            image,
            k,
            label,
            json,
        } => {
            let db = existing(&db)?;
            let bytes = read(&image)?;
            let mut q = Query::k(k);
            if !label.is_empty() {
                q = q.labels(label);
            }
            let hits = db.nearest_with(&bytes, &q)?;
            if json {
                let rows: Vec<_> = hits
                    .iter()
                    .map(|h| serde_json::json!({"id": h.id.0, "distance": h.distance, "label": h.label}))
                    .collect();
                out!("{}", serde_json::Value::Array(rows));
            } else {
                out!("{:>4}  {:>10}  {:>10}  label", "rank", "id", "distance");
                for (i, h) in hits.iter().enumerate() {
                    out!(
                        "{:>4}  {:>10}  {:>10.5}  {}",
                        i + 1,
                        h.id,
                        h.distance,
                        h.label.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { db, json } => {
            let db = existing(&db)?;
            let model = db.active_model();
            let index = db.index_info();
            let labels = db.labels();
            if json {
                let v = serde_json::json!({
                    "images": db.len(),
                    "labels": labels,
                    "model": {"version": model.version, "extractor": model.extractor,
                              "config": model.config, "dim": model.dim, "metric": model.metric.as_str()},
                    "index": {"kind": index.kind, "vectors": index.len, "dim": index.dim},
                    "extractors": db.extractors(),
                });
                out!("{v:#}");
            } else {
                out!("database   {}", db.path().display());
                out!("images     {}", db.len());
                out!(
                    "model      v{} {} (dim {}, {})",
                    model.version,
                    model.extractor,
                    model.dim,
                    model.metric.as_str()
                );
                out!("index      {} with {} vectors", index.kind, index.len);
                out!("extractors {}", db.extractors().join(", "));
                out!("labels     {}", labels.len());
                for (l, n) in labels {
                    out!("  {l:<20} {n}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
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
            no_activate,
            if_better,
        } => {
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
                .activate(!no_activate)
                .activate_if_better(if_better);
            if let Some(m) = minutes {
                opts = opts.max_minutes(m);
            }
            train(&db, &extractor, opts).map(|()| ExitCode::SUCCESS)
        }
        Command::Models { db } => {
            let db = existing(&db)?;
            let active = db.active_model().version;
            for m in db.models()? {
                out!(
                    "{} v{} {} {:?} (dim {}, {})",
                    if m.version == active { "*" } else { " " },
                    m.version,
                    m.extractor,
                    m.config,
                    m.dim,
                    m.metric.as_str()
                );
            }
            if let Some((e, c, n)) = db.pending_job()? {
                out!("interrupted job: {e} {c:?} after {n} epochs (resume with train --resume)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Use { db, version } => {
            let db = existing(&db)?;
            db.use_model(version)?;
            out!("model v{version} is active");
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove { db, ids } => {
            let db = existing(&db)?;
            // All or nothing: every id is checked before any image is removed.
            let known: std::collections::HashSet<ImageId> = db.ids().into_iter().collect();
            let unknown: Vec<String> = ids
                .iter()
                .filter(|id| !known.contains(id))
                .map(ToString::to_string)
                .collect();
            if !unknown.is_empty() {
                return Err(lookalike::Error::InvalidArgument(format!(
                    "no image with id {}; nothing was removed",
                    unknown.join(", ")
                )));
            }
            for id in ids {
                db.remove(id)?;
                out!("removed {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a training job with a progress bar per phase; prints the report.
fn train(db: &Db, extractor: &str, opts: lookalike::TrainOptions) -> lookalike::Result<()> {
    use lookalike::Phase;
    let bar = ProgressBar::new(0);
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
        Phase::Evaluating => {
            if let Some(m) = &p.validation {
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
        Phase::Embedding => {
            b.set_prefix("embedding");
            b.set_length(p.embedded.1 as u64);
            b.set_position(p.embedded.0 as u64);
            b.set_message("images");
        }
    });
    let r = db.train_extractor_with(extractor, opts)?;
    bar.finish_and_clear();
    out!(
        "model v{} ({} {:?}, miner {}){}",
        r.version,
        r.extractor,
        r.config,
        r.miner,
        if r.activated {
            ", now active"
        } else {
            ", stored"
        }
    );
    out!(
        "held-out accuracy@1 {:.2} % -> {:.2} %, mAP@10 {:.2} % -> {:.2} % ({} queries)",
        r.before.accuracy_at_1 * 100.0,
        r.after.accuracy_at_1 * 100.0,
        r.before.map_at_10 * 100.0,
        r.after.map_at_10 * 100.0,
        r.after.queries
    );
    out!(
        "{} epochs, {} steps, {} pairs in {:.1} min of training ({:.1} min in all)",
        r.epochs,
        r.steps,
        r.pairs_seen,
        r.train_seconds / 60.0,
        r.total_seconds / 60.0
    );
    if r.vanished > 0 {
        out!(
            "{} training images were removed while the job ran and were skipped",
            r.vanished
        );
    }
    Ok(())
}

fn read(path: &Path) -> lookalike::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| lookalike::Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Image files under `paths`, sorted, with folders walked recursively. A path given on the
/// command line is followed if it is a link; inside folders only regular files and folders
/// are taken (links are not followed, so a link loop cannot make the walk endless or add an
/// image twice; FIFOs, devices and sockets are never opened). A given path that is not a
/// regular file or folder is an error.
fn collect(paths: &[PathBuf]) -> lookalike::Result<Vec<PathBuf>> {
    let io = |p: &Path, e| lookalike::Error::Io {
        path: p.to_path_buf(),
        source: e,
    };
    let mut out = Vec::new();
    let mut folders = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io(p, e))?;
        if meta.is_dir() {
            folders.push(p.clone());
        } else if meta.is_file() {
            out.push(p.clone());
        } else {
            return Err(lookalike::Error::InvalidArgument(format!(
                "{} is not a regular file or a folder",
                p.display()
            )));
        }
    }
    while let Some(dir) = folders.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let child = entry.path();
            // The entry's own type: a link is neither a folder nor a file here.
            let kind = entry.file_type().map_err(|e| io(&child, e))?;
            if kind.is_dir() {
                folders.push(child);
            } else if kind.is_file() && has_image_extension(&child) {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Encoded bytes per batch of `add`. Two batches are being inserted while a third is read, so
/// about four times this is held, whatever `--batch` says (12 MP phone photos are 2-5 MB each).
const BATCH_BYTES: usize = 32 << 20;
/// Batches inserted at once: while one is being stored (a serial write), the other is decoded
/// on every core.
const INSERTERS: usize = 2;

/// One file read for `add`: its path, its bytes (or why they could not be read) and label.
type ReadFile = (PathBuf, lookalike::Result<Vec<u8>>, Option<String>);

/// Reads `path` whole into `buf` (cleared first; a reused buffer needs no new pages),
/// refusing (without reading further) a file over `limit` bytes.
fn read_bounded(path: &Path, limit: u64, buf: &mut Vec<u8>) -> lookalike::Result<()> {
    use std::io::Read;
    let io = |e| lookalike::Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    buf.clear();
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    buf.reserve(usize::try_from(len.min(limit) + 1).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(buf)
        .map_err(io)?;
    if buf.len() as u64 > limit {
        return Err(lookalike::Error::ImageTooLarge {
            what: "encoded size in bytes",
            got: len.max(buf.len() as u64),
            limit,
        });
    }
    Ok(())
}

/// Counts of `add`.
#[derive(Debug, Default)]
struct Added {
    added: usize,
    skipped: usize,
}

/// Streams `files` through the database (exit code 1 when files were skipped): a reader thread reads batches of at most `batch`
/// files and [`BATCH_BYTES`] bytes (into buffers handed back after use), and [`INSERTERS`]
/// threads insert them with `Db::insert_images_each`, each decoding on every core and storing
/// in one write. Bad files are reported and skipped. Ids ascend in file order within a batch;
/// batches may be stored out of order.
fn add(
    db: &Path,
    options: Options,
    paths: &[PathBuf],
    label: Option<&str>,
    folder_labels: bool,
    batch: usize,
) -> lookalike::Result<ExitCode> {
    let files = collect(paths)?;
    let limit = options.image_byte_limit();
    let db = Db::open_with(db, options)?;
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let label = label.map(str::to_string);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<ReadFile>>(1);
    let (give_back, buffers) = crossbeam_channel::unbounded::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut items = Vec::new();
        let mut bytes = 0;
        for f in files {
            let l = if folder_labels {
                f.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            } else {
                label.clone()
            };
            let mut buf = buffers.try_recv().unwrap_or_default();
            let read = read_bounded(&f, limit, &mut buf).map(|()| buf);
            bytes += read.as_ref().map(Vec::len).unwrap_or(0);
            items.push((f, read, l));
            if items.len() >= batch || bytes >= BATCH_BYTES {
                if tx.send(std::mem::take(&mut items)).is_err() {
                    return;
                }
                bytes = 0;
            }
        }
        if !items.is_empty() {
            let _ = tx.send(items);
        }
    });
    let counts = std::sync::Mutex::new(Added::default());
    let outcome = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..INSERTERS)
            .map(|_| {
                let (rx, db, bar, counts, give_back) = (&rx, &db, &bar, &counts, &give_back);
                scope.spawn(move || -> lookalike::Result<()> {
                    for items in rx {
                        let (added, skipped) = insert_batch(db, bar, &items)?;
                        if let Ok(mut c) = counts.lock() {
                            c.added += added;
                            c.skipped += skipped;
                        }
                        bar.inc(items.len() as u64);
                        for (_, read, _) in items {
                            if let Ok(buf) = read {
                                let _ = give_back.send(buf);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut outcome = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(lookalike::Error::Poisoned(
                    "an insert thread panicked".into(),
                ))
            });
            if outcome.is_ok() {
                outcome = r;
            }
        }
        outcome
    });
    drop(rx);
    let _ = reader.join();
    outcome?;
    db.flush()?;
    bar.finish_and_clear();
    let c = counts.into_inner().unwrap_or_default();
    out!(
        "added {} images to {} ({} in total), skipped {}",
        c.added,
        db.path().display(),
        db.len(),
        c.skipped
    );
    Ok(if c.skipped > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Inserts the readable files of one batch; reports the bad ones. (added, skipped).
fn insert_batch(
    db: &Db,
    bar: &ProgressBar,
    items: &[ReadFile],
) -> lookalike::Result<(usize, usize)> {
    let (mut added, mut skipped) = (0usize, 0usize);
    let mut skip = |f: &Path, e: &lookalike::Error| {
        skipped += 1;
        bar.suspend(|| eprintln!("skipped {}: {e}", f.display()));
    };
    let mut good = Vec::with_capacity(items.len());
    for (f, read, l) in items {
        match read {
            Ok(b) => good.push((f, b.as_slice(), l.as_deref())),
            Err(e) => skip(f, e),
        }
    }
    let outcomes = db.insert_images_each(good.iter().map(|(_, b, l)| (*b, *l)))?;
    for ((f, _, _), outcome) in good.iter().zip(outcomes) {
        match outcome {
            Ok(_) => added += 1,
            Err(e) => skip(f, &e),
        }
    }
    Ok((added, skipped))
}
