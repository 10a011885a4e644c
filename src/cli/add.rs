//! `lookalike add`: a folder of images streamed through the database, with each file's path
//! as its source.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use lookalike::{Db, Durability, ImageMeta, InsertMode, Inserted, Metadata, Options};

use super::{out, source_of};

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

/// Arguments of `lookalike add`.
#[derive(Debug, clap::Args)]
pub(super) struct AddArgs {
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
    /// A JSON object stored as every added image's metadata, e.g. '{"shoot": "2024-05"}'.
    #[arg(long)]
    meta: Option<String>,
    /// Store byte-identical copies of stored images again instead of skipping them.
    #[arg(long)]
    allow_duplicates: bool,
    /// Images per durable batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Extractor of a new database (default classic; see `stats` for the registered names).
    /// On an existing database it must be the active model's: switch models with `train`
    /// or `use`.
    #[arg(long)]
    extractor: Option<String>,
    /// The extractor's configuration string (a preset name), for a new database.
    #[arg(long)]
    config: Option<String>,
    /// Weights file (safetensors) for the extractor of a new database.
    #[arg(long)]
    weights: Option<PathBuf>,
}

pub(super) fn run(a: AddArgs, json: bool) -> lookalike::Result<ExitCode> {
    let metadata: Option<Metadata> = match &a.meta {
        None => None,
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => Some(map),
            Ok(_) | Err(_) => {
                return Err(lookalike::Error::InvalidArgument(format!(
                    "--meta must be a JSON object such as '{{\"shoot\": \"2024-05\"}}', not {text}"
                )))
            }
        },
    };
    // Checked before anything is created: a bad label or metadata leaves nothing behind.
    let template = ImageMeta {
        label: a.label.clone(),
        source: None,
        metadata,
    };
    template.check()?;
    let (files, ignored) = collect(&a.paths)?;
    let mut options = Options::default()
        .durability(Durability::Relaxed)
        .extractor(
            a.extractor.as_deref().unwrap_or("classic"),
            a.config.as_deref().unwrap_or(""),
        );
    if let Some(w) = &a.weights {
        options = options.extractor_weights(w);
    }
    let limit = options.image_byte_limit();
    let db = open_or_create(&a, options)?;
    let mode = if a.allow_duplicates {
        InsertMode::Always
    } else {
        InsertMode::SkipExisting
    };
    let files = files
        .into_iter()
        .map(|f| {
            let mut meta = template.clone();
            if a.folder_labels {
                meta.label = f
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned());
            }
            meta.source = Some(source_of(&f));
            (f, meta)
        })
        .collect();
    let c = stream(&db, files, limit, a.batch.max(1), mode, json)?;
    db.flush()?;
    if json {
        out!(
            "{}",
            serde_json::json!({"summary": {
                "added": c.added, "duplicates": c.duplicates, "skipped": c.skipped,
                "not_images": ignored, "images": db.len(),
            }})
        );
    } else {
        let mut also = Vec::new();
        if c.duplicates > 0 {
            also.push(format!(
                "{} already stored (byte-identical; --allow-duplicates stores them)",
                c.duplicates
            ));
        }
        if c.skipped > 0 {
            also.push(format!("{} could not be read as images", c.skipped));
        }
        if ignored > 0 {
            also.push(format!(
                "{ignored} {} without an image extension ignored",
                if ignored == 1 { "file" } else { "files" }
            ));
        }
        out!(
            "added {} images to {} ({} in total){}{}",
            c.added,
            db.path().display(),
            db.len(),
            if also.is_empty() { "" } else { "; " },
            also.join(", ")
        );
    }
    Ok(if c.skipped > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Opens the database, creating it if needed. A database this command was creating is
/// removed again when it cannot be made (an unknown extractor, missing weights), so that
/// the corrected command starts afresh; an existing database must already run the
/// extractor and configuration asked for.
fn open_or_create(a: &AddArgs, options: Options) -> lookalike::Result<Db> {
    let existed = a.db.join("store").exists();
    let was_empty_dir = std::fs::read_dir(&a.db)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    let db = match Db::open_with(&a.db, options) {
        Ok(db) => db,
        Err(e) => {
            if !existed {
                remove_new_database(&a.db, was_empty_dir);
            }
            return Err(e);
        }
    };
    if existed {
        let m = db.active_model();
        let weights = match &a.weights {
            Some(w) => {
                let bytes = std::fs::read(w).map_err(|e| lookalike::Error::Io {
                    path: w.clone(),
                    source: e,
                })?;
                Some(lookalike::ContentHash::of(&bytes))
            }
            None => None,
        };
        let differs = a.extractor.as_ref().is_some_and(|e| *e != m.extractor)
            || a.config.as_ref().is_some_and(|c| *c != m.config)
            || weights.is_some_and(|w| Some(w) != m.weights);
        if differs {
            return Err(lookalike::Error::InvalidArgument(format!(
                "{} already runs model v{} ({} {:?}, {}); --extractor, \
                 --config and --weights only choose the model of a new database. To change \
                 models: `lookalike train {} EXTRACTOR` or `lookalike use {} VERSION` (see \
                 `lookalike models`)",
                a.db.display(),
                m.version,
                m.extractor,
                m.config,
                if m.weights.is_some() {
                    "with other weights"
                } else {
                    "without weights"
                },
                a.db.display(),
                a.db.display()
            )));
        }
    }
    Ok(db)
}

/// Removes what a failed creation left: the whole folder if this command made it, its
/// contents if it was an empty folder before.
fn remove_new_database(db: &Path, was_empty_dir: bool) {
    if was_empty_dir {
        if let Ok(entries) = std::fs::read_dir(db) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(db);
    }
}

/// Image files under `paths`, in the order given, each folder walked recursively and its
/// files sorted by path, and the number of other files found in the folders (ignored). A path
/// given on the command line is followed if it is a link; inside folders only regular files
/// and folders are taken (links are not followed, so a link loop cannot make the walk endless
/// or add an image twice; FIFOs, devices and sockets are never opened). A given path that is
/// not a regular file or folder is an error, before anything is read.
pub(super) fn collect(paths: &[PathBuf]) -> lookalike::Result<(Vec<PathBuf>, usize)> {
    let io = |p: &Path, e| lookalike::Error::Io {
        path: p.to_path_buf(),
        source: e,
    };
    let mut is_dir = Vec::with_capacity(paths.len());
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io(p, e))?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(lookalike::Error::InvalidArgument(format!(
                "{} is not a regular file or a folder",
                p.display()
            )));
        }
        is_dir.push(meta.is_dir());
    }
    let mut out = Vec::new();
    let mut ignored = 0;
    for (p, dir) in paths.iter().zip(is_dir) {
        if !dir {
            out.push(p.clone());
            continue;
        }
        let mut found = Vec::new();
        let mut folders = vec![p.clone()];
        while let Some(dir) = folders.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let entry = entry.map_err(|e| io(&dir, e))?;
                let child = entry.path();
                // The entry's own type: a link is neither a folder nor a file here.
                let kind = entry.file_type().map_err(|e| io(&child, e))?;
                if kind.is_dir() {
                    folders.push(child);
                } else if kind.is_file() {
                    if has_image_extension(&child) {
                        found.push(child);
                    } else {
                        ignored += 1;
                    }
                }
            }
        }
        found.sort();
        out.extend(found);
    }
    Ok((out, ignored))
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Encoded bytes per batch of `add`. Three batches are being inserted while a fourth is read,
/// so about four times this is held, whatever `--batch` says (12 MP phone photos are 2-5 MB
/// each). Three inserters of 32 MiB against two of 64 MiB (240 photos of 12 MP, five and
/// eight runs, interleaved): 4.80-4.92 s against 4.92-5.56 s, 186-188 % CPU against 182-186 %,
/// peak RSS 318-325 MiB against 427-447.
const BATCH_BYTES: usize = 32 << 20;
/// Batches inserted at once: while one is being stored (a serial write), the others are
/// decoded on every core.
const INSERTERS: usize = 3;

/// One file read for `add`: its path, its bytes (or why they could not be read) and what to
/// store with it.
type ReadFile = (PathBuf, lookalike::Result<Vec<u8>>, ImageMeta);

/// Reads `path` whole into `buf` (cleared first; a reused buffer needs no new pages),
/// refusing (without reading further) a file over `limit` bytes.
pub(super) fn read_bounded(path: &Path, limit: u64, buf: &mut Vec<u8>) -> lookalike::Result<()> {
    use std::io::Read;
    let io = |e| lookalike::Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    buf.clear();
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // Capacity in powers of two: a reused buffer then seldom has to grow for the next file,
    // and growing means fresh pages the kernel must zero.
    let want = usize::try_from(len.min(limit) + 1).unwrap_or(0);
    if buf.capacity() < want {
        buf.reserve(want.next_power_of_two());
    }
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
    duplicates: usize,
    skipped: usize,
}

/// Streams `files` through the database: a reader thread reads batches of at most `batch`
/// files and [`BATCH_BYTES`] bytes (into buffers handed back after use), and [`INSERTERS`]
/// threads insert them, each preparing one (`Db::prepare_images_with`: decoding on every
/// core) while the other stores, and storing in the order the batches were read
/// (`Db::commit_prepared`), so ids follow file order. Each file's outcome is printed (bad
/// files always, on stderr; every file with `json`, on stdout).
fn stream(
    db: &Db,
    files: Vec<(PathBuf, ImageMeta)>,
    limit: u64,
    batch: usize,
    mode: InsertMode,
    json: bool,
) -> lookalike::Result<Added> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(files.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (tx, rx) = crossbeam_channel::bounded::<(u64, Vec<ReadFile>)>(1);
    let (give_back, buffers) = crossbeam_channel::unbounded::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut seq = 0;
        for (f, meta) in files {
            let mut buf = buffers.try_recv().unwrap_or_default();
            let read = read_bounded(&f, limit, &mut buf).map(|()| buf);
            bytes += read.as_ref().map(Vec::len).unwrap_or(0);
            items.push((f, read, meta));
            if items.len() >= batch || bytes >= BATCH_BYTES {
                if tx.send((seq, std::mem::take(&mut items))).is_err() {
                    return;
                }
                seq += 1;
                bytes = 0;
            }
        }
        if !items.is_empty() {
            let _ = tx.send((seq, items));
        }
    });
    let counts = std::sync::Mutex::new(Added::default());
    let turn = Turn::default();
    let outcome = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..INSERTERS)
            .map(|_| {
                let (rx, bar, counts, give_back) = (&rx, &bar, &counts, &give_back);
                let turn = &turn;
                scope.spawn(move || -> lookalike::Result<()> {
                    for (seq, items) in rx {
                        let Some(c) = insert_batch(db, bar, &items, mode, json, (turn, seq))?
                        else {
                            return Ok(()); // an earlier batch failed; its error is reported
                        };
                        if let Ok(mut all) = counts.lock() {
                            all.added += c.added;
                            all.duplicates += c.duplicates;
                            all.skipped += c.skipped;
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
    bar.finish_and_clear();
    Ok(counts.into_inner().unwrap_or_default())
}

/// Whose turn it is to store: batches are decoded several at a time but stored in the order
/// they were read, so ids follow file order.
#[derive(Default)]
struct Turn {
    /// The next batch to store, and whether a batch failed (then no later one is stored).
    next: std::sync::Mutex<(u64, bool)>,
    moved: std::sync::Condvar,
}

impl Turn {
    /// Waits for batch `seq`'s turn; false if an earlier batch failed.
    fn wait(&self, seq: u64) -> bool {
        let Ok(mut g) = self.next.lock() else {
            return false;
        };
        while g.0 != seq && !g.1 {
            g = match self.moved.wait(g) {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        !g.1
    }

    /// Passes the turn on after batch `seq` (`ok`), or stops every later batch.
    fn pass(&self, seq: u64, ok: bool) {
        if let Ok(mut g) = self.next.lock() {
            if ok && g.0 == seq {
                g.0 += 1;
            } else if !ok {
                g.1 = true;
            }
        }
        self.moved.notify_all();
    }
}

/// Passes the turn on when dropped: a batch that fails or panics before storing must not
/// leave the batches after it waiting.
struct TurnGuard<'a> {
    turn: &'a Turn,
    seq: u64,
    stored: bool,
}

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        self.turn.pass(self.seq, self.stored);
    }
}

/// Inserts the readable files of one batch and reports each file's outcome: decoded at once
/// with other batches, stored in its turn. `None` when an earlier batch failed.
fn insert_batch(
    db: &Db,
    bar: &ProgressBar,
    items: &[ReadFile],
    mode: InsertMode,
    json: bool,
    (turn, seq): (&Turn, u64),
) -> lookalike::Result<Option<Added>> {
    let mut guard = TurnGuard {
        turn,
        seq,
        stored: false,
    };
    let mut c = Added::default();
    let mut skip = |f: &Path, e: &lookalike::Error| {
        c.skipped += 1;
        if json {
            out!(
                "{}",
                serde_json::json!({"path": source_of(f), "status": "skipped",
                                   "error": e.to_string(), "kind": e.kind()})
            );
        } else {
            bar.suspend(|| eprintln!("skipped {}: {e}", f.display()));
        }
    };
    let mut good = Vec::with_capacity(items.len());
    for (f, read, meta) in items {
        match read {
            Ok(b) => good.push((f, b.as_slice(), meta)),
            Err(e) => skip(f, e),
        }
    }
    let prepared = db.prepare_images_with(good.iter().map(|(_, b, m)| (*b, *m)), mode)?;
    if !turn.wait(seq) {
        return Ok(None);
    }
    let outcomes = db.commit_prepared(prepared)?;
    guard.stored = true;
    drop(guard);
    for ((f, _, _), outcome) in good.iter().zip(outcomes) {
        match outcome {
            Ok(inserted) => {
                let status = match inserted {
                    Inserted::New(_) => {
                        c.added += 1;
                        "added"
                    }
                    Inserted::Existing(_) => {
                        c.duplicates += 1;
                        "duplicate"
                    }
                };
                if json {
                    out!(
                        "{}",
                        serde_json::json!({"path": source_of(f), "status": status,
                                           "id": inserted.id().0})
                    );
                }
            }
            Err(e) => skip(f, &e),
        }
    }
    Ok(Some(c))
}
