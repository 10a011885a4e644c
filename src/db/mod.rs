//! `Db`: the handle applications hold. Ties the store, the index and the active model together.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the handle, open, remove, ids and labels, browse, locks |
//! | `catalogue.rs` | the catalogue of stored ids and labels, and `catalogue.bin` for a fast open |
//! | `query.rs` | nearest-neighbour queries, filters, re-ranking |
//! | `insert.rs` | inserts: decode, embed and store in bounded memory |
//! | `meta.rs` | labels, sources, metadata, content hashes |
//! | `models.rs` | model versions: load, switch, delete, embed with a model |
//! | `compact.rs` | compact vectors: the switch to a PCA projection of the active model |
//! | `indexing.rs` | index builds, rebuilds and snapshots off the query path |
//! | `duplicates.rs` | groups of near-identical images |

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parking_lot::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::index::snapshot;
use crate::index::VectorIndex;
use crate::options::{Durability, Options};
use crate::preprocess::ImageLimits;
use crate::registry::Registry;
use crate::store::Store;
use crate::ImageId;

mod catalogue;
mod compact;
mod duplicates;
mod indexing;
mod insert;
mod meta;
mod models;
mod query;

pub(crate) use catalogue::fuzz as fuzz_catalogue;
#[cfg(test)]
pub(crate) use catalogue::seed as catalogue_seed;
use catalogue::{Catalogue, Loaded, Pending};
pub use duplicates::DuplicateGroup;
use indexing::{kind_name, open_index};
pub use insert::Prepared;
pub use meta::{ContentHash, ImageInfo, ImageMeta, InsertMode, Inserted, Metadata};
pub use models::ModelInfo;
use models::{embed, load_or_create_model, prepare_stored, Model, Stale};
use query::distance;
pub use query::{Hit, Query, Rerank};

/// An insert that leaves the index holding this many vectors more than the snapshot on disk
/// saves the index snapshot: a quarter of the index, at least 10,000 and at most 100,000
/// vectors. The snapshot's vectors are appended (`index/snapshot.rs`), so a save costs the
/// new vectors and the graph; what a close must write, and what an open after a crash must
/// add again, stays bounded by this. (`catalogue.bin` is left to flush and close: it is
/// caught up from the store cheaply, and saving it flushes the store.)
fn snapshot_lag_limit(len: usize) -> usize {
    (len / 4).clamp(10_000, 100_000)
}

/// Images embedded per extractor call.
const EMBED_BATCH: usize = 64;
/// Decoded images held at once by an insert or an embedding, in bytes of input-sized pixels
/// (the full-size decodes are dropped as each image is fitted): with the default extractor,
/// 21,845 images of 32 x 32 x 3; with EfficientNet-Lite0, 445 of 224 x 224 x 3.
const THUMB_BUDGET: usize = 64 << 20;

/// An image decoded and embedded, not yet stored.
struct Embedded {
    /// Its upright size.
    width: u32,
    height: u32,
    vector: Vec<f32>,
}

/// How long [`Db::open_with`] waits for the directory's `LOCK` before [`Error::Locked`]. The
/// lock is an `flock` on the open file, and a process that spawns a child while a handle is
/// dropped can keep it held for a moment after the drop: the child holds a copy of the file
/// descriptor from its fork until its exec closes it. A reopen racing that window (seen in
/// the test suite, whose CLI tests spawn processes while other tests reopen) would fail
/// spuriously; a handle that is really open elsewhere still fails, 0.2 s later.
pub const LOCK_WAIT: Duration = Duration::from_millis(200);
/// An HNSW index is rebuilt when more than this share of its ids were removed.
const MAX_DEAD_SHARE: f64 = 0.2;
/// How long an insert holds the index lock for one piece of its HNSW adds. An add costs
/// about a millisecond at 256 dimensions and up to tens of milliseconds at 2,408 (the new
/// node's neighbour lists are pruned by comparing candidates with each other): pieces are
/// sized from the previous piece's time per vector, at most [`HNSW_ADD_MAX`], and added on
/// every core. Eight vectors of 2,408 dimensions per hold had let queries wait up to a second
/// (`benches/stalls.rs`). Each piece is one FAISS add call, and each call also costs time in
/// proportion to the whole graph (FAISS makes and frees a lock per stored vector): about 6 ms
/// at a million vectors, against 0.18 ms per vector added (two cores, 256 dimensions). With
/// 10 ms holds the pieces were 20 vectors and adds cost 470 us a vector there; 25 ms holds make
/// them about a hundred, at 240 us.
const HNSW_HOLD: Duration = Duration::from_millis(25);
/// The largest piece of HNSW adds per hold of the index lock.
const HNSW_ADD_MAX: usize = 256;
/// HNSW adds go in pieces on every core from this many vectors in the graph; below, one
/// vector per hold on one core.
const HNSW_PARALLEL_FROM: usize = 10_000;
/// HNSW search breadth under `IndexKind::Auto`.
const AUTO_EF_SEARCH: u32 = 64;
const AUTO_HNSW_M: u32 = 32;

/// How the index was obtained at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexSource {
    /// From an up-to-date snapshot.
    Snapshot,
    /// From a snapshot that lagged the store, then caught up.
    CaughtUp {
        /// Vectors added from the store.
        added: usize,
        /// Vectors dropped because the store no longer has them.
        removed: usize,
    },
    /// Rebuilt from the embeddings tree.
    Rebuilt {
        /// Why the snapshot was not used.
        reason: String,
    },
}

/// The state of the vector index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    /// `"exact"` or `"hnsw"`.
    pub kind: &'static str,
    /// Live vectors.
    pub len: usize,
    /// Dimension.
    pub dim: usize,
    /// How it was obtained when the database was opened.
    pub source: IndexSource,
    /// Seconds from the start of the open until the index was ready: for a rebuild since, the
    /// rebuild's. At open the snapshot is read while the store opens, so this includes the
    /// store's open.
    pub open_seconds: f64,
    /// Why the last attempt to write the index snapshot failed, if it did (a full disk, no
    /// permission). The snapshot is derived data: a failure loses nothing, the next flush or
    /// close tries again, and the next open rebuilds or catches up without it.
    pub snapshot_error: Option<String>,
    /// Why the last rebuild started by a write (the switch from exact to HNSW search, or the
    /// clean-up of removed vectors) failed, if it did. The write itself stands; the index
    /// stays as it was and the next write tries again.
    pub rebuild_error: Option<String>,
}

/// An open image-similarity database. Cheap to clone: clones share one handle, and it may be
/// used from many threads at once.
#[derive(Debug, Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    options: Options,
    registry: Registry,
    store: Store,
    state: RwLock<State>,
    /// The active model, as `state.model` (set with it, under the state's write lock), for
    /// queries to read without waiting behind an insert's hold of the state: a query that
    /// then finds another model in the state runs again ([`Error::ModelChanged`]).
    active: parking_lot::Mutex<Arc<Model>>,
    /// Set after a failed durable write: later writes refuse to run.
    poisoned: Mutex<Option<String>>,
    /// A training job holds this while it runs.
    job_running: std::sync::atomic::AtomicBool,
    /// Serialises model administration (`use_model`, `delete_model`, `install_model`): each
    /// checks what it relies on (the active version, the stored versions) under it.
    admin: Mutex<()>,
    /// Taken before `state`'s write lock by every change to the state, and held by long index
    /// work instead of that lock (`indexing.rs`).
    writer: Mutex<()>,
    /// Held by an index build (`indexing.rs`): one at a time.
    rebuilds: Mutex<()>,
    /// Set while an index build runs (`indexing.rs`): inserts then add to HNSW on one core.
    building: std::sync::atomic::AtomicBool,
    /// Held by an insert under `InsertMode::SkipExisting` from its last look for stored
    /// copies until its images are stored, so two such inserts cannot both store the same bytes.
    dedup: Mutex<()>,
    /// Ids and change numbers handed to writes not yet in the catalogue (`catalogue.rs`).
    pending: Pending,
    /// Held for the life of the handle; the OS releases it on exit, even on `kill -9`.
    _lock: File,
}

/// The active model with its index and the in-memory catalogue of entries.
#[derive(Debug)]
struct State {
    model: Arc<Model>,
    index: VectorIndex,
    index_info: IndexInfo,
    catalogue: Catalogue,
    /// The index changed since the last snapshot.
    dirty: bool,
    /// Vectors in the index when the last snapshot was saved or loaded.
    saved_len: usize,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1e-12 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl Db {
    /// Opens the database in directory `path`, creating it if needed, with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Db> {
        Db::open_with(path, Options::default())
    }

    /// Opens the database in directory `path` with `options`.
    ///
    /// Fails with [`Error::Locked`] if another handle, in this process or another, has it
    /// open (after a wait of at most [`LOCK_WAIT`], see there).
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Db> {
        let dir = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        let asked = Instant::now();
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if asked.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked { path: dir }),
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
            }
        }
        // We hold the LOCK: a snapshot's temporary files are left from a crash or a failed save.
        snapshot::remove_temporary(&dir);
        // FAISS starts reading the index snapshot now, on a thread of its own, while the store
        // opens (at a million images each takes a fifth of a second or more).
        let started = Instant::now();
        let reading = if options.snapshot {
            Some(snapshot::start(&dir)?)
        } else {
            None
        };
        let registry = Registry::new(&options.plugins);
        let store = Store::open(&dir, options.durability == Durability::Relaxed)?;
        let (model, stale) = load_or_create_model(&dir, &store, &registry, &options)?;
        let model = Arc::new(model);

        // The catalogue is loaded while the snapshot is checked and FAISS finishes reading it.
        let (loaded, read) = std::thread::scope(|s| {
            let loading = s.spawn(|| catalogue::load(&dir, &store));
            let read = match reading {
                Some(r) if stale.is_none() => Some(snapshot::finish(
                    r,
                    model.version,
                    model.dim(),
                    model.spec.metric,
                    store.id_bound(),
                )),
                Some(r) => {
                    snapshot::abandon(r);
                    None
                }
                None => None,
            }
            .transpose();
            let loaded = loading.join().map_err(|_| {
                Error::Poisoned("a thread panicked while loading the catalogue".into())
            });
            (loaded, read)
        });
        let (catalogue, loaded, seen) = loaded??;
        let pending = Pending::new(&store, seen)?;
        let (index, source) = open_index(&store, &model, &options, &catalogue, stale, read?)?;
        let index_info = IndexInfo {
            kind: kind_name(index.shape()),
            len: index.len(),
            dim: index.dim(),
            source: source.clone(),
            open_seconds: started.elapsed().as_secs_f64(),
            snapshot_error: None,
            rebuild_error: None,
        };
        let dirty = source != IndexSource::Snapshot;
        let saved_len = if dirty { 0 } else { index.len() };
        let db = Db {
            inner: Arc::new(Inner {
                dir,
                registry,
                store,
                active: parking_lot::Mutex::new(model.clone()),
                state: RwLock::new(State {
                    model,
                    index,
                    index_info,
                    catalogue,
                    dirty,
                    saved_len,
                }),
                pending,
                poisoned: Mutex::new(None),
                job_running: std::sync::atomic::AtomicBool::new(false),
                admin: Mutex::new(()),
                writer: Mutex::new(()),
                rebuilds: Mutex::new(()),
                building: std::sync::atomic::AtomicBool::new(false),
                dedup: Mutex::new(()),
                options,
                _lock: lock,
            }),
        };
        // A scan's catalogue is written now, so that the next open reads it instead.
        if (dirty && db.inner.options.snapshot) || matches!(loaded, Loaded::Scanned(_)) {
            db.save_snapshot()?;
        }
        Ok(db)
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// The encoded bytes of image `id`, exactly as inserted.
    pub fn image(&self, id: ImageId) -> Result<Vec<u8>> {
        self.inner.store.image(id)?.ok_or(Error::UnknownImage(id))
    }

    /// Removes image `id`: its bytes, label and embeddings. Later queries never return it.
    pub fn remove(&self, id: ImageId) -> Result<()> {
        self.check_poisoned()?;
        let versions = self.inner.store.model_versions()?;
        let mut held = self.inner.pending.hold();
        if !self.inner.store.remove(id, &versions, held.seq())? {
            return Err(Error::UnknownImage(id));
        }
        self.durable_write()?;
        let mut state = self.write_state()?;
        // The catalogue follows the store whatever the index does (catalogue.bin is saved
        // from it).
        state.catalogue.remove(id.0);
        state.dirty = true;
        if let Err(e) = state.index.remove(&[id]) {
            return Err(self.poison(e));
        }
        drop(state);
        drop(held);
        self.maybe_rebuild()
    }

    /// Number of images stored.
    pub fn len(&self) -> usize {
        self.read_state().map(|s| s.catalogue.len()).unwrap_or(0)
    }

    /// True when no image is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every label with the number of images carrying it.
    pub fn labels(&self) -> BTreeMap<String, usize> {
        self.read_state()
            .map(|s| {
                s.catalogue
                    .by_label()
                    .iter()
                    .map(|(l, ids)| (l.clone(), ids.len()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ids of every stored image, ascending.
    pub fn ids(&self) -> Vec<ImageId> {
        let mut ids: Vec<ImageId> = self
            .read_state()
            .map(|s| s.catalogue.ids().map(ImageId).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Up to `limit` ids in ascending order after `after` (from the start when `None`), of
    /// the images labelled `label` (every image when `None`): pages through a database or a
    /// label without listing all of it. The next page starts after the last id returned.
    ///
    /// ```
    /// # fn main() -> lookalike::Result<()> {
    /// # let dir = tempfile::tempdir().map_err(|e| lookalike::Error::InvalidArgument(e.to_string()))?;
    /// let db = lookalike::Db::open(dir.path().join("pages.db"))?;
    /// assert!(db.browse(Some("bag"), None, 20).is_empty());
    /// # Ok(()) }
    /// ```
    pub fn browse(
        &self,
        label: Option<&str>,
        after: Option<ImageId>,
        limit: usize,
    ) -> Vec<ImageId> {
        let Ok(state) = self.read_state() else {
            return Vec::new();
        };
        let start = after.map_or(std::ops::Bound::Unbounded, |a| {
            std::ops::Bound::Excluded(a.0)
        });
        match label {
            Some(l) => state.catalogue.with_label(l).map_or_else(Vec::new, |ids| {
                ids.range((start, std::ops::Bound::Unbounded))
                    .take(limit)
                    .map(|i| ImageId(*i))
                    .collect()
            }),
            None => {
                // The id map is unordered: one pass keeps the `limit` smallest ids after `after`.
                let mut heap = std::collections::BinaryHeap::with_capacity(limit.min(4096) + 1);
                let floor = after.map_or(0, |a| a.0.saturating_add(1));
                for id in state.catalogue.ids().filter(|i| *i >= floor) {
                    if heap.len() < limit {
                        heap.push(id);
                    } else if heap.peek().is_some_and(|top| id < *top) {
                        heap.pop();
                        heap.push(id);
                    }
                }
                let mut ids: Vec<ImageId> = heap.into_iter().map(ImageId).collect();
                ids.sort();
                ids
            }
        }
    }

    /// The options this handle was opened with.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Registry names of the extractor plugins this handle knows.
    pub fn extractors(&self) -> Vec<String> {
        self.inner.registry.names()
    }

    /// The model whose embeddings answer queries.
    pub fn active_model(&self) -> ModelInfo {
        self.model().info()
    }

    /// The state of the vector index.
    pub fn index_info(&self) -> IndexInfo {
        match self.read_state() {
            Ok(s) => IndexInfo {
                kind: kind_name(s.index.shape()),
                len: s.index.len(),
                ..s.index_info.clone()
            },
            Err(_) => IndexInfo {
                kind: "unavailable",
                len: 0,
                dim: 0,
                source: IndexSource::Rebuilt {
                    reason: "poisoned".into(),
                },
                open_seconds: 0.0,
                snapshot_error: None,
                rebuild_error: None,
            },
        }
    }

    /// Embeds encoded images with the active model, as stored (L2-normalised for cosine).
    pub fn embed(&self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>> {
        let model = self.model();
        let n = images.len();
        self.embed_encoded(&model, images)?
            .into_iter()
            .enumerate()
            .map(|(i, e)| e.map(|e| e.vector).map_err(|e| in_batch(i, n, e)))
            .collect()
    }

    /// The stored embedding of image `id` under the active model.
    pub fn embedding(&self, id: ImageId) -> Result<Vec<f32>> {
        let model = self.model();
        self.inner
            .store
            .embedding(model.version, id, model.dim())?
            .ok_or(Error::UnknownImage(id))
    }

    /// Makes every write durable and refreshes the index snapshot and `catalogue.bin`.
    pub fn flush(&self) -> Result<()> {
        self.durable_write_always()?;
        self.save_snapshot()
    }

    /// Rebuilds the index from the embeddings tree (the shape follows the options).
    /// Queries keep running on the old index meanwhile.
    pub fn rebuild_index(&self) -> Result<()> {
        let _one = self.one_build()?;
        self.rebuild(&self.model(), false, "rebuild_index asked for".into())
    }

    /// Trains extractor `name` from the labelled images in the database with default
    /// [`crate::TrainOptions`], and switches to the new model: see
    /// [`Db::train_extractor_with`].
    pub fn train_extractor(&self, name: &str) -> Result<crate::TrainReport> {
        self.train_extractor_with(name, crate::TrainOptions::default())
    }

    /// Trains extractor `name` (a plugin with a trainable form) from the labelled images in
    /// the database: holds out a stratified validation split, trains for `options.epochs`
    /// epochs with the chosen pair miner (checkpointing each epoch), evaluates the result
    /// against the active model on the held-out split, stores it as a new model version,
    /// re-embeds every image, builds its index and (by default) makes it active in one step.
    /// Queries keep running on the old model meanwhile. The job runs on the calling thread;
    /// one job at a time per database ([`Error::JobRunning`]).
    pub fn train_extractor_with(
        &self,
        name: &str,
        options: crate::TrainOptions,
    ) -> Result<crate::TrainReport> {
        crate::training::train_extractor(self, name, options)
    }

    /// Trains pair scorer `name` (`"mlp-diff"`) on the active model's embeddings of the
    /// labelled images: balanced pairs, held-out validation pairs (and labels, with
    /// `held_out_labels`), the MLP paper's per-case accuracy and ROC. The returned scorer works
    /// with [`Query::rerank`] and [`Db::same`]; keep [`crate::ScorerReport::weights`] to rebuild
    /// it later with the plugin's `build`.
    pub fn train_scorer(
        &self,
        name: &str,
        options: crate::ScorerTrainOptions,
    ) -> Result<crate::ScorerReport> {
        crate::training::train_scorer(self, name, options)
    }

    /// The interrupted training job whose checkpoint is stored, if any: (extractor,
    /// configuration, epochs finished). Resume it with `TrainOptions::resume(true)` and the
    /// same options.
    pub fn pending_job(&self) -> Result<Option<(String, String, usize)>> {
        Ok(self
            .inner
            .store
            .checkpoint()?
            .map(|c| (c.plugin, c.config, c.epochs_done as usize)))
    }

    // ---- crate internals for the training jobs ----

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Marks a training job as running; the guard clears the mark when dropped.
    pub(crate) fn start_job(&self) -> Result<JobGuard> {
        use std::sync::atomic::Ordering;
        if self
            .inner
            .job_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::JobRunning);
        }
        Ok(JobGuard(self.inner.clone()))
    }

    /// Every labelled image with its label, in id order.
    pub(crate) fn labelled(&self) -> Result<Vec<(ImageId, String)>> {
        let state = self.read_state()?;
        let mut out: Vec<(ImageId, String)> = state
            .catalogue
            .iter()
            .filter_map(|(id, l)| l.map(|l| (ImageId(id), l.to_string())))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Ids of every stored image.
    pub(crate) fn live_ids(&self) -> Result<Vec<u64>> {
        let mut ids: Vec<u64> = self.read_state()?.catalogue.ids().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    // ---- internals ----

    fn model(&self) -> Arc<Model> {
        self.inner.active.lock().clone()
    }

    fn limits(&self) -> ImageLimits {
        self.inner.options.limits()
    }

    /// The model-administration lock.
    fn admin(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.inner
            .admin
            .lock()
            .map_err(|_| Error::Poisoned("a thread panicked while changing models".into()))
    }

    fn check_poisoned(&self) -> Result<()> {
        match self.inner.poisoned.lock() {
            Ok(p) => match &*p {
                Some(why) => Err(Error::Poisoned(why.clone())),
                None => Ok(()),
            },
            Err(_) => Err(Error::Poisoned("a thread panicked during a write".into())),
        }
    }

    fn poison(&self, e: Error) -> Error {
        if let Ok(mut p) = self.inner.poisoned.lock() {
            p.get_or_insert_with(|| e.to_string());
        }
        e
    }

    /// Flushes under immediate durability.
    fn durable_write(&self) -> Result<()> {
        if self.inner.options.durability == Durability::Immediate {
            self.durable_write_always()
        } else {
            Ok(())
        }
    }

    fn durable_write_always(&self) -> Result<()> {
        self.check_poisoned()?;
        self.inner.store.flush().map_err(|e| self.poison(e))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: the snapshot is an optimisation and the store is already durable
        // under immediate durability; errors here cannot be reported.
        let state = self.state.get_mut();
        if self.options.snapshot && state.dirty {
            let _ = snapshot::save(&self.dir, &state.index, state.model.version);
        }
        // After the store's flush, and only if it worked: the catalogue must not claim writes
        // that are not durable.
        // Not from a poisoned handle either: what it holds in memory may lag its store.
        // The store is flushed either way (pack files synced, sled fsynced).
        let flushed = self.store.flush().is_ok();
        let poisoned = self.poisoned.get_mut().map_or(true, |p| p.is_some());
        if !poisoned && flushed && state.catalogue.dirty {
            let (id_bound, seen) = self.pending.marks(&self.store);
            if catalogue::save(&self.dir, &state.catalogue, id_bound, seen).is_ok() {
                let _ = self.store.trim_changes(seen);
                let _ = self.store.flush();
            }
        }
    }
}

/// Clears the running-job mark when a job ends, however it ends.
#[derive(Debug)]
pub(crate) struct JobGuard(Arc<Inner>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0
            .job_running
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

fn in_batch(index: usize, len: usize, source: Error) -> Error {
    if len == 1 {
        source
    } else {
        Error::InBatch {
            index,
            source: Box::new(source),
        }
    }
}

fn check_label(label: &str) -> Result<()> {
    if label.is_empty() {
        return Err(Error::InvalidArgument(
            "a label must not be empty; pass None for no label".into(),
        ));
    }
    if label.len() > 1024 {
        return Err(Error::InvalidArgument(format!(
            "a label is at most 1024 bytes, this one is {}",
            label.len()
        )));
    }
    Ok(())
}
