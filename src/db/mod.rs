//! `Db`: the handle applications hold. Ties the store, the index and the active model together.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parking_lot::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::{Extractor, ExtractorSpec, Metric, PairScorer};

use crate::error::{Error, Result};
use crate::index::snapshot;
use crate::index::{Allow, VectorIndex};
use crate::options::{Durability, Options};
use crate::preprocess::{self, ImageLimits};
use crate::registry::Registry;
use crate::store::{ModelRecord, Store};
use crate::ImageId;

mod duplicates;
mod indexing;
mod insert;
mod meta;

pub use duplicates::DuplicateGroup;
use indexing::{kind_name, open_index};
pub use insert::Prepared;
pub use meta::{ContentHash, ImageInfo, ImageMeta, InsertMode, Inserted, Metadata};

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
/// Vectors added to an HNSW index per hold of the index lock: one. At 2,408 dimensions an add
/// costs milliseconds to tens of milliseconds (the new node's neighbour lists are pruned by
/// comparing candidates with each other), and 8 per hold let queries wait up to a second
/// while a rebuild ran beside them (`benches/stalls.rs`).
const HNSW_ADD_STEP: usize = 1;
/// HNSW search breadth under `IndexKind::Auto`.
const AUTO_EF_SEARCH: u32 = 64;
const AUTO_HNSW_M: u32 = 32;

/// One result of a nearest-neighbour query.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The image found.
    pub id: ImageId,
    /// Its distance to the query under the model's metric (`1 - cos` for cosine, squared
    /// Euclidean for L2): smaller is more similar.
    pub distance: f32,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// Where it came from, if the insert said ([`ImageMeta::source`]).
    pub source: Option<String>,
    /// Its metadata object, if it has one.
    pub metadata: Option<Metadata>,
    /// P(same) from the pair scorer when the query re-ranked ([`Query::rerank`]); hits are
    /// then ordered by it, highest first.
    pub score: Option<f32>,
}

/// Re-ranking of a query's candidates by a pair scorer.
#[derive(Debug, Clone)]
pub struct Rerank {
    /// The scorer; its dimension must be the active model's.
    pub scorer: Arc<dyn PairScorer>,
    /// How many nearest candidates the index returns for the scorer to re-order (at least k).
    pub candidates: usize,
}

/// What a query asks for besides the image: how many results and which labels.
///
/// ```
/// let q = lookalike::Query::k(5).labels(["sneaker", "sandal"]);
/// assert_eq!(q.k, 5);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// How many hits to return (at most; fewer only if fewer images match).
    pub k: usize,
    /// Only images with one of these labels; `None` for every image.
    pub labels: Option<BTreeSet<String>>,
    /// Only images whose metadata has each of these keys equal to the value (a string,
    /// number or boolean, compared as JSON text: `1` and `1.0` differ).
    pub metadata: Vec<(String, serde_json::Value)>,
    /// Re-order the nearest `candidates` by a pair scorer's P(same).
    pub rerank: Option<Rerank>,
}

impl Query {
    /// The `k` nearest images, whatever their label.
    pub fn k(k: usize) -> Self {
        Query {
            k,
            ..Query::default()
        }
    }

    /// Takes the `candidates` nearest images (at least `k`) and returns the `k` that `scorer`
    /// finds most likely to show the same thing as the query.
    pub fn rerank(mut self, scorer: Arc<dyn PairScorer>, candidates: usize) -> Self {
        self.rerank = Some(Rerank { scorer, candidates });
        self
    }

    /// Restricts results to images carrying any of `labels`. The filter is applied during the
    /// search, so `k` hits come back whenever `k` matching images exist.
    pub fn labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels = Some(labels.into_iter().map(Into::into).collect());
        self
    }

    /// Restricts results to images whose metadata has `key` equal to `value` (a string,
    /// number or boolean; see [`ImageMeta::metadata`] for what is indexed). Several calls
    /// must all match; with [`Query::labels`] both apply. Filtered during the search, like
    /// labels.
    ///
    /// ```
    /// let q = lookalike::Query::k(5).metadata("colour", "red");
    /// assert_eq!(q.metadata.len(), 1);
    /// ```
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

/// A model version: which extractor, how configured, what it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The version number (1 for the model a database was created with).
    pub version: u32,
    /// The extractor plugin's registry name.
    pub extractor: String,
    /// The plugin's configuration string.
    pub config: String,
    /// Embedding dimension.
    pub dim: usize,
    /// Distance metric.
    pub metric: Metric,
    /// BLAKE3 of its weights (safetensors) as stored; `None` for a training-free extractor.
    /// Tells whether a weights file is the one a model runs.
    pub weights: Option<ContentHash>,
}

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
    /// Seconds spent opening the index (snapshot load, catch-up or rebuild).
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
    /// Held by an insert under `InsertMode::SkipExisting` from its last look for stored
    /// copies until its images are stored, so two such inserts cannot both store the same bytes.
    dedup: Mutex<()>,
    /// Held for the life of the handle; the OS releases it on exit, even on `kill -9`.
    _lock: File,
}

/// The active model with its index and the in-memory catalogue of entries.
#[derive(Debug)]
struct State {
    model: Arc<Model>,
    index: VectorIndex,
    index_info: IndexInfo,
    labels: HashMap<u64, Option<String>>,
    by_label: BTreeMap<String, BTreeSet<u64>>,
    /// The index changed since the last snapshot.
    dirty: bool,
}

#[derive(Debug)]
struct Model {
    version: u32,
    record: ModelRecord,
    extractor: Arc<dyn Extractor>,
    spec: ExtractorSpec,
}

impl Model {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            version: self.version,
            extractor: self.record.plugin.clone(),
            config: self.record.config.clone(),
            dim: self.spec.dim,
            metric: self.spec.metric,
            weights: weights_hash(&self.record),
        }
    }
}

fn weights_hash(record: &ModelRecord) -> Option<ContentHash> {
    (!record.weights.is_empty()).then(|| ContentHash::of(&record.weights))
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn metric_from_str(s: &str, version: u32) -> Result<Metric> {
    match s {
        "cosine" => Ok(Metric::Cosine),
        "l2" => Ok(Metric::L2),
        other => Err(Error::corrupt(
            "model",
            version,
            format!("unknown metric {other:?}"),
        )),
    }
}

fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1e-12 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => (1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()).max(0.0),
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
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
        let registry = Registry::new(&options.plugins);
        let store = Store::open(&dir, options.durability == Durability::Relaxed)?;
        let (model, stale) = load_or_create_model(&dir, &store, &registry, &options)?;
        let model = Arc::new(model);

        // The catalogue: every entry's label, from the small `entries` tree.
        let mut labels = HashMap::new();
        let mut by_label: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for entry in store.entries() {
            let (id, e) = entry?;
            if let Some(l) = &e.label {
                by_label.entry(l.clone()).or_default().insert(id.0);
            }
            labels.insert(id.0, e.label);
        }

        let started = Instant::now();
        let (index, source) = open_index(&dir, &store, &model, &options, &labels, stale)?;
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
        let db = Db {
            inner: Arc::new(Inner {
                dir,
                registry,
                store,
                state: RwLock::new(State {
                    model,
                    index,
                    index_info,
                    labels,
                    by_label,
                    dirty,
                }),
                poisoned: Mutex::new(None),
                job_running: std::sync::atomic::AtomicBool::new(false),
                admin: Mutex::new(()),
                writer: Mutex::new(()),
                rebuilds: Mutex::new(()),
                dedup: Mutex::new(()),
                options,
                _lock: lock,
            }),
        };
        if dirty && db.inner.options.snapshot {
            db.save_snapshot()?;
        }
        Ok(db)
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// The `k` images nearest to the encoded image `bytes`, best first.
    pub fn nearest(&self, bytes: &[u8], k: usize) -> Result<Vec<Hit>> {
        self.nearest_with(bytes, &Query::k(k))
    }

    /// The `k` stored images nearest to the stored image `id`, best first, not counting `id`
    /// itself.
    pub fn nearest_to(&self, id: ImageId, k: usize) -> Result<Vec<Hit>> {
        self.nearest_to_with(id, &Query::k(k))
    }

    /// [`Db::nearest`] with a label filter.
    pub fn nearest_with(&self, bytes: &[u8], query: &Query) -> Result<Vec<Hit>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        self.with_model_retry(|model| {
            let thumb = preprocess::prepare(bytes, self.limits(), &model.spec.input)?;
            let vector = embed(model, &[&thumb])?.pop().unwrap_or_default();
            self.search(model, &vector, query, None)
        })
    }

    /// [`Db::nearest_with`] for many query images: decoded and embedded on every core (as
    /// [`Db::insert_images`] does), then searched. One outcome per image, in order: its hits,
    /// or why the image was refused. The outer error is for failures that are not an image's
    /// fault (the extractor, the index).
    pub fn nearest_batch(&self, images: &[&[u8]], query: &Query) -> Result<Vec<Result<Vec<Hit>>>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        let mut tries = 0;
        loop {
            let model = self.model();
            let embedded = self.embed_encoded(&model, images)?;
            let mut out = Vec::with_capacity(images.len());
            let mut changed = false;
            for e in embedded {
                match e.map(|e| self.search(&model, &e.vector, query, None)) {
                    Ok(Err(Error::ModelChanged)) => {
                        changed = true;
                        break;
                    }
                    Ok(hits) => out.push(hits),
                    Err(e) => out.push(Err(e)),
                }
            }
            if !changed {
                return Ok(out);
            }
            if tries == 3 {
                return Err(Error::ModelChanged);
            }
            tries += 1;
        }
    }

    /// Runs `query` with the active model; a model switch between getting the query's vector
    /// and searching makes the search refuse ([`Error::ModelChanged`]: it would mix models),
    /// and the query runs again with the new model (up to three times).
    fn with_model_retry(&self, query: impl Fn(&Model) -> Result<Vec<Hit>>) -> Result<Vec<Hit>> {
        let mut tries = 0;
        loop {
            match query(&self.model()) {
                Err(Error::ModelChanged) if tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// [`Db::nearest_to`] with a label filter.
    pub fn nearest_to_with(&self, id: ImageId, query: &Query) -> Result<Vec<Hit>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        self.with_model_retry(|model| {
            if !self.read_state()?.labels.contains_key(&id.0) {
                return Err(Error::UnknownImage(id));
            }
            let vector = self
                .inner
                .store
                .embedding(model.version, id, model.spec.dim)?
                .ok_or(Error::UnknownImage(id))?;
            self.search(model, &vector, query, Some(id))
        })
    }

    fn search(
        &self,
        model: &Model,
        vector: &[f32],
        query: &Query,
        exclude: Option<ImageId>,
    ) -> Result<Vec<Hit>> {
        let state = self.read_state()?;
        if state.model.version != model.version {
            return Err(Error::ModelChanged);
        }
        let allowed = self.allowed(&state, query, exclude)?;
        let available = match &allowed {
            Some(a) => a.len(),
            None => state.labels.len() - usize::from(exclude.is_some()),
        };
        if available == 0 {
            return Err(Error::Empty {
                filter: describe_filter(query),
            });
        }
        let want = query.k.min(available);
        if let Some(r) = &query.rerank {
            if r.scorer.dim() != model.spec.dim {
                return Err(Error::DimensionMismatch {
                    what: format!("pair scorer {} against the active model", r.scorer.name()),
                    expected: model.spec.dim,
                    got: r.scorer.dim(),
                });
            }
        }
        let shortlist = match &query.rerank {
            Some(r) => r.candidates.max(want).min(available),
            None => want,
        };
        let fetch = shortlist + usize::from(exclude.is_some());
        let allow = match &allowed {
            Some(a) => Allow::Only(a),
            None => Allow::All,
        };
        let mut found: Vec<_> = state
            .index
            .search(vector, fetch, allow)?
            .into_iter()
            .filter(|n| Some(n.id) != exclude)
            .collect();
        found.truncate(shortlist);
        if found.len() < shortlist {
            // An approximate graph search can miss matches under a selective filter: scan the
            // allowed embeddings exactly instead.
            let candidates: Vec<u64> = match allowed {
                Some(a) => a,
                None => state
                    .labels
                    .keys()
                    .copied()
                    .filter(|id| Some(ImageId(*id)) != exclude)
                    .collect(),
            };
            found = self.exact_scan(model, vector, &candidates, shortlist)?;
        }
        let scores = match &query.rerank {
            Some(r) => Some(self.pair_scores(model, r.scorer.as_ref(), vector, &found)?),
            None => None,
        };
        let mut hits: Vec<Hit> = found
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                // Source and metadata from the store (the catalogue in memory has labels only).
                let meta = self
                    .inner
                    .store
                    .entry(n.id)
                    .ok()
                    .flatten()
                    .map(|e| meta::meta_of(&e))
                    .unwrap_or_default();
                Hit {
                    id: n.id,
                    distance: n.distance,
                    label: state.labels.get(&n.id.0).cloned().flatten(),
                    source: meta.source,
                    metadata: meta.metadata,
                    score: scores.as_ref().map(|s| s[i]),
                }
            })
            .collect();
        if scores.is_some() {
            hits.sort_by(|a, b| {
                b.score
                    .unwrap_or(0.0)
                    .total_cmp(&a.score.unwrap_or(0.0))
                    .then(a.distance.total_cmp(&b.distance))
            });
        }
        hits.truncate(want);
        Ok(hits)
    }

    /// The ids a query's label and metadata filters allow (`None`: every id), without
    /// `exclude`, ascending.
    fn allowed(
        &self,
        state: &State,
        query: &Query,
        exclude: Option<ImageId>,
    ) -> Result<Option<Vec<u64>>> {
        let mut allowed: Option<BTreeSet<u64>> = query.labels.as_ref().map(|set| {
            set.iter()
                .filter_map(|l| state.by_label.get(l))
                .flat_map(|ids| ids.iter().copied())
                .collect()
        });
        for (key, value) in &query.metadata {
            let ids = self.inner.store.find_by_meta(key, value).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot filter on metadata {key:?} = {value}: only strings, numbers and \
                     booleans of up to 256 bytes (and keys of up to 256 bytes) are indexed"
                ))
            })??;
            let ids: BTreeSet<u64> = ids
                .into_iter()
                // Committed by an insert that has not reached the catalogue yet: not yet.
                .filter(|id| state.labels.contains_key(id))
                .collect();
            allowed = Some(match allowed {
                Some(a) => a.intersection(&ids).copied().collect(),
                None => ids,
            });
        }
        Ok(allowed.map(|a| {
            a.into_iter()
                .filter(|id| Some(ImageId(*id)) != exclude)
                .collect()
        }))
    }

    /// P(same) of the query against each found image.
    fn pair_scores(
        &self,
        model: &Model,
        scorer: &dyn PairScorer,
        query: &[f32],
        found: &[crate::index::Neighbour],
    ) -> Result<Vec<f32>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let dim = model.spec.dim;
        let mut others = Vec::with_capacity(found.len() * dim);
        for n in found {
            let v = self
                .inner
                .store
                .embedding(model.version, n.id, dim)?
                .ok_or(Error::UnknownImage(n.id))?;
            others.extend_from_slice(&v);
        }
        let name = scorer.name().to_string();
        let to_plugin = |e: lookalike_plugin::candle_core::Error| Error::plugin(&name, e.into());
        let b = Tensor::from_vec(others, (found.len(), dim), &Device::Cpu).map_err(to_plugin)?;
        let a = Tensor::from_slice(query, (1, dim), &Device::Cpu)
            .and_then(|q| q.broadcast_as((found.len(), dim)))
            .and_then(|q| q.contiguous())
            .map_err(to_plugin)?;
        let p = scorer.score(&a, &b).map_err(|e| Error::plugin(&name, e))?;
        p.to_vec1::<f32>().map_err(to_plugin)
    }

    /// P(same) that `scorer` gives stored images `a` and `b`, from their embeddings under the
    /// active model.
    pub fn same(&self, a: ImageId, b: ImageId, scorer: &dyn PairScorer) -> Result<f32> {
        let model = self.model();
        if scorer.dim() != model.spec.dim {
            return Err(Error::DimensionMismatch {
                what: format!("pair scorer {} against the active model", scorer.name()),
                expected: model.spec.dim,
                got: scorer.dim(),
            });
        }
        let va = self.embedding(a)?;
        let hit = crate::index::Neighbour {
            id: b,
            distance: 0.0,
        };
        if !self.read_state()?.labels.contains_key(&b.0) {
            return Err(Error::UnknownImage(b));
        }
        Ok(self.pair_scores(&model, scorer, &va, &[hit])?[0])
    }

    fn exact_scan(
        &self,
        model: &Model,
        query: &[f32],
        ids: &[u64],
        k: usize,
    ) -> Result<Vec<crate::index::Neighbour>> {
        let mut scored = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) =
                self.inner
                    .store
                    .embedding(model.version, ImageId(*id), model.spec.dim)?
            {
                scored.push(crate::index::Neighbour {
                    id: ImageId(*id),
                    distance: distance(model.spec.metric, query, &v),
                });
            }
        }
        scored.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
        scored.truncate(k);
        Ok(scored)
    }

    /// The encoded bytes of image `id`, exactly as inserted.
    pub fn image(&self, id: ImageId) -> Result<Vec<u8>> {
        self.inner.store.image(id)?.ok_or(Error::UnknownImage(id))
    }

    /// Removes image `id`: its bytes, label and embeddings. Later queries never return it.
    pub fn remove(&self, id: ImageId) -> Result<()> {
        self.check_poisoned()?;
        let versions = self.inner.store.model_versions()?;
        if !self.inner.store.remove(id, &versions)? {
            return Err(Error::UnknownImage(id));
        }
        self.durable_write()?;
        let mut state = self.write_state()?;
        if let Err(e) = state.index.remove(&[id]) {
            return Err(self.poison(e));
        }
        if let Some(Some(l)) = state.labels.remove(&id.0) {
            if let Some(set) = state.by_label.get_mut(&l) {
                set.remove(&id.0);
                if set.is_empty() {
                    state.by_label.remove(&l);
                }
            }
        }
        state.dirty = true;
        drop(state);
        self.maybe_rebuild()
    }

    /// Number of images stored.
    pub fn len(&self) -> usize {
        self.read_state().map(|s| s.labels.len()).unwrap_or(0)
    }

    /// True when no image is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every label with the number of images carrying it.
    pub fn labels(&self) -> BTreeMap<String, usize> {
        self.read_state()
            .map(|s| {
                s.by_label
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
            .map(|s| s.labels.keys().map(|i| ImageId(*i)).collect())
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
            Some(l) => state.by_label.get(l).map_or_else(Vec::new, |ids| {
                ids.range((start, std::ops::Bound::Unbounded))
                    .take(limit)
                    .map(|i| ImageId(*i))
                    .collect()
            }),
            None => {
                // The id map is unordered: one pass keeps the `limit` smallest ids after `after`.
                let mut heap = std::collections::BinaryHeap::with_capacity(limit.min(4096) + 1);
                let floor = after.map_or(0, |a| a.0.saturating_add(1));
                for id in state.labels.keys().copied().filter(|i| *i >= floor) {
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
            .embedding(model.version, id, model.spec.dim)?
            .ok_or(Error::UnknownImage(id))
    }

    /// Makes every write durable and refreshes the index snapshot.
    pub fn flush(&self) -> Result<()> {
        self.durable_write_always()?;
        if self.inner.options.snapshot {
            self.save_snapshot()?;
        }
        Ok(())
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

    /// Every stored model version, oldest first; the active one is [`Db::active_model`].
    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        let mut out = Vec::new();
        for version in self.inner.store.model_versions()? {
            if let Some(r) = self.inner.store.model(version)? {
                out.push(ModelInfo {
                    version,
                    extractor: r.plugin.clone(),
                    config: r.config.clone(),
                    dim: r.dim as usize,
                    metric: metric_from_str(&r.metric, version)?,
                    weights: weights_hash(&r),
                });
            }
        }
        Ok(out)
    }

    /// Makes model `version` the active one: embeds any image it has no embedding for, builds
    /// its index, then switches in one step (queries see the old model and index, or the new
    /// ones, never a mix). The choice is durable.
    pub fn use_model(&self, version: u32) -> Result<()> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        if self.model().version == version {
            return Ok(());
        }
        let record = self
            .inner
            .store
            .model(version)?
            .ok_or(Error::UnknownModel(version))?;
        // The snapshot on disk is the active model's, not this one's: it stays.
        let (model, _) = model_from_record(
            &self.inner.store,
            &self.inner.registry,
            version,
            record,
            None,
        )?;
        // Embedded and indexed off the query path: queries keep running on the old model.
        let _one = self.one_build()?;
        self.rebuild(
            &Arc::new(model),
            true,
            format!("switched to model {version}"),
        )?;
        if self.inner.options.snapshot {
            self.save_snapshot()?;
        }
        Ok(())
    }

    /// Deletes model version `version` and its embeddings. The active model cannot be
    /// deleted ([`Error::ActiveModel`]).
    pub fn delete_model(&self, version: u32) -> Result<()> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        if self.model().version == version {
            return Err(Error::ActiveModel(version));
        }
        if self.inner.store.model(version)?.is_none() {
            return Err(Error::UnknownModel(version));
        }
        self.inner.store.delete_model(version)?;
        self.durable_write()
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
    /// The active model's stored weights (safetensors; empty for a training-free extractor).
    pub(crate) fn active_weights(&self) -> Vec<u8> {
        self.model().record.weights.clone()
    }

    pub(crate) fn labelled(&self) -> Result<Vec<(ImageId, String)>> {
        let state = self.read_state()?;
        let mut out: Vec<(ImageId, String)> = state
            .labels
            .iter()
            .filter_map(|(id, l)| l.clone().map(|l| (ImageId(*id), l)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Ids of every stored image.
    pub(crate) fn live_ids(&self) -> Result<Vec<u64>> {
        let mut ids: Vec<u64> = self.read_state()?.labels.keys().copied().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The active model's stored embeddings of `ids` (missing ones are skipped).
    pub(crate) fn active_embeddings(&self, ids: &[ImageId]) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let model = self.model();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self
                .inner
                .store
                .embedding(model.version, *id, model.spec.dim)?
            {
                out.push((*id, v));
            }
        }
        Ok(out)
    }

    /// Stores a new model version (not active): its record, then an embedding of every stored
    /// image under it, in batches; `progress(done, total)` after each batch, and `cancelled()`
    /// checked between batches (a cancelled install deletes what it wrote).
    pub(crate) fn install_model(
        &self,
        record: ModelRecord,
        extractor: Arc<dyn Extractor>,
        progress: &mut dyn FnMut(usize, usize),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<u32> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        let version = self
            .inner
            .store
            .model_versions()?
            .into_iter()
            .max()
            .unwrap_or(0)
            + 1;
        let spec = extractor.spec();
        let model = Model {
            version,
            record: record.clone(),
            extractor,
            spec,
        };
        self.inner.store.put_model(version, &record)?;
        self.inner
            .store
            .set_policy(version, &preprocess::policy(&model.spec.input))?;
        let ids: Vec<ImageId> = self.live_ids()?.into_iter().map(ImageId).collect();
        let result = (|| {
            for (done, chunk) in ids.chunks(EMBED_BATCH * 4).enumerate() {
                if cancelled() {
                    return Err(Error::Cancelled);
                }
                let embedded = self.embed_stored(
                    &model.record.plugin,
                    model.extractor.as_ref(),
                    &model.spec,
                    chunk,
                )?;
                for (id, v) in embedded {
                    self.inner.store.put_embedding(version, id, &v)?;
                }
                progress(((done + 1) * EMBED_BATCH * 4).min(ids.len()), ids.len());
            }
            self.durable_write_always()
        })();
        if let Err(e) = result {
            let _ = self.inner.store.delete_model(version);
            return Err(e);
        }
        Ok(version)
    }

    /// Embeds stored images `ids` with `extractor` (declaring `spec`), in batches, reading
    /// and decoding on every core; images removed meanwhile are skipped. `name` labels errors.
    pub(crate) fn embed_stored(
        &self,
        name: &str,
        extractor: &dyn Extractor,
        spec: &ExtractorSpec,
        ids: &[ImageId],
    ) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(EMBED_BATCH * 4) {
            let thumbs = prepare_stored(&self.inner.store, &spec.input, chunk);
            let mut got = Vec::with_capacity(chunk.len());
            let mut kept = Vec::with_capacity(chunk.len());
            for (id, t) in chunk.iter().zip(thumbs) {
                if let Some(t) = t? {
                    got.push(*id);
                    kept.push(t);
                }
            }
            let refs: Vec<_> = kept.iter().collect();
            out.extend(
                got.into_iter()
                    .zip(embed_with(name, extractor, spec, &refs)?),
            );
        }
        Ok(out)
    }

    // ---- internals ----

    fn model(&self) -> Arc<Model> {
        self.inner.state.read().model.clone()
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
        if self.options.snapshot {
            let state = self.state.get_mut();
            if state.dirty {
                let _ = snapshot::save(&self.dir, &state.index, state.model.version);
            }
        }
        let _ = self.store.flush();
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

/// Reads and decodes stored images `ids` for `input` on every core: `None` for an image
/// removed meanwhile. The encoded bytes live only inside each task.
fn prepare_stored(
    store: &Store,
    input: &lookalike_plugin::InputSpec,
    ids: &[ImageId],
) -> Vec<Result<Option<preprocess::Thumb>>> {
    use rayon::prelude::*;
    ids.par_iter().map(|id| store.thumb(*id, input)).collect()
}

/// Embeds decoded images with `extractor` (declaring `spec`) in batches, normalised as stored
/// (L2 for cosine). `name` labels errors.
pub(crate) fn embed_with(
    name: &str,
    extractor: &dyn Extractor,
    spec: &ExtractorSpec,
    images: &[&preprocess::Thumb],
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(EMBED_BATCH) {
        let batch = preprocess::batch_tensor(chunk, &spec.input)?;
        let emb = extractor
            .embed(&batch)
            .map_err(|e| Error::plugin(name, e))?;
        let dims = emb.dims().to_vec();
        if dims != [chunk.len(), spec.dim] {
            return Err(Error::DimensionMismatch {
                what: format!("output of extractor {name} (shape {dims:?})"),
                expected: spec.dim,
                got: dims.last().copied().unwrap_or(0),
            });
        }
        let rows = emb
            .to_dtype(lookalike_plugin::candle_core::DType::F32)
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(|e| Error::plugin(name, e.into()))?;
        for mut v in rows {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::plugin(
                    name,
                    lookalike_plugin::PluginError::InvalidSpec(
                        "embedding has NaN or infinite values".into(),
                    ),
                ));
            }
            if spec.metric == Metric::Cosine {
                l2_normalise(&mut v);
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// A query's filters in words, for [`Error::Empty`].
fn describe_filter(query: &Query) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(labels) = &query.labels {
        parts.push(format!(
            "labelled {}",
            labels.iter().cloned().collect::<Vec<_>>().join(" or ")
        ));
    }
    for (k, v) in &query.metadata {
        parts.push(format!("with {k} = {v}"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
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

/// Embeds decoded images in batches, normalised as stored.
fn embed(model: &Model, images: &[&preprocess::Thumb]) -> Result<Vec<Vec<f32>>> {
    embed_with(
        &model.record.plugin,
        model.extractor.as_ref(),
        &model.spec,
        images,
    )
}

/// The active model (created on first open), and what [`model_from_record`] says about its
/// stored embeddings.
fn load_or_create_model(
    dir: &Path,
    store: &Store,
    registry: &Registry,
    options: &Options,
) -> Result<(Model, Option<Stale>)> {
    let version = match store.active_model()? {
        Some(v) => v,
        None => {
            let weights = match &options.extractor_weights {
                Some(path) => Some(std::fs::read(path).map_err(|e| Error::io(path, e))?),
                None => None,
            };
            let extractor = registry.build(
                &options.extractor,
                &options.extractor_config,
                weights.as_deref(),
            )?;
            let spec = extractor.spec();
            let record = ModelRecord {
                format: 1,
                plugin: options.extractor.clone(),
                plugin_version: extractor.version(),
                config: options.extractor_config.clone(),
                dim: spec.dim as u32,
                metric: spec.metric.as_str().to_string(),
                weights: extractor
                    .save_weights()
                    .map_err(|e| Error::plugin(&options.extractor, e))?,
                created_unix: now_unix(),
            };
            store.put_model(1, &record)?;
            store.set_policy(1, &preprocess::policy(&spec.input))?;
            store.set_active_model(1)?;
            store.flush()?;
            let model = Model {
                version: 1,
                record,
                extractor,
                spec,
            };
            return Ok((model, None));
        }
    };
    let record = store.model(version)?.ok_or_else(|| {
        Error::corrupt(
            "meta",
            "active_model",
            format!("model {version} is not stored"),
        )
    })?;
    model_from_record(store, registry, version, record, Some(dir))
}

/// A stored model whose embeddings were made by other code than this build's: its extractor's
/// code version ([`Extractor::version`]) or the decode policy ([`preprocess::policy`])
/// changed. They were dropped, to be made again from the images.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stale {
    /// What changed, for [`IndexSource::Rebuilt`].
    reason: String,
}

/// Builds a stored model version's extractor and checks it against the record. When the
/// extractor's code version or the decode policy differs from the recorded one, the same
/// weights no longer embed to the stored vectors: they are derived data, so they are dropped
/// (the index build embeds the images again) and the record takes the new version and policy
/// (see [`forget_embeddings`]). A model stored before policies were recorded has none: its
/// images are embedded again once, on the first open by a build that records them.
fn model_from_record(
    store: &Store,
    registry: &Registry,
    version: u32,
    record: ModelRecord,
    snapshot_dir: Option<&Path>,
) -> Result<(Model, Option<Stale>)> {
    let weights = (!record.weights.is_empty()).then_some(record.weights.as_slice());
    let extractor = registry.build(&record.plugin, &record.config, weights)?;
    let spec = extractor.spec();
    let policy = preprocess::policy(&spec.input);
    let stale = if record.plugin_version != extractor.version() {
        Some(Stale {
            reason: format!(
                "the extractor's code changed (version {} to {}): images embedded again",
                record.plugin_version,
                extractor.version()
            ),
        })
    } else if store.policy(version)?.as_deref() != Some(policy.as_str()) {
        Some(Stale {
            reason: "the decode policy changed (orientation, transparency, scaled JPEG \
                     decoding): images embedded again"
                .to_string(),
        })
    } else {
        None
    };
    if spec.dim != record.dim as usize {
        return Err(Error::DimensionMismatch {
            what: format!("extractor {} against stored model {version}", record.plugin),
            expected: record.dim as usize,
            got: spec.dim,
        });
    }
    if spec.metric != metric_from_str(&record.metric, version)? {
        return Err(Error::corrupt(
            "model",
            version,
            format!(
                "stored metric {} but the extractor declares {}",
                record.metric,
                spec.metric.as_str()
            ),
        ));
    }
    let mut model = Model {
        version,
        record,
        extractor,
        spec,
    };
    if stale.is_some() {
        forget_embeddings(store, snapshot_dir, &mut model, &policy)?;
    }
    Ok((model, stale))
}

/// Drops the stored embeddings of a [`Stale`] model, and the index snapshot in `snapshot_dir`
/// that may hold them, then records the extractor's code version and the decode `policy`. In
/// this order, so that a crash part way leaves the old version or policy recorded and the next
/// open repeats it; a snapshot left behind would be trusted once the new ones are recorded.
fn forget_embeddings(
    store: &Store,
    snapshot_dir: Option<&Path>,
    model: &mut Model,
    policy: &str,
) -> Result<()> {
    if let Some(dir) = snapshot_dir {
        snapshot::remove(dir)?;
    }
    store.delete_embeddings(model.version)?;
    model.record.plugin_version = model.extractor.version();
    store.put_model(model.version, &model.record)?;
    store.set_policy(model.version, policy)?;
    store.flush()
}
