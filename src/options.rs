//! Options for opening a database.

use std::path::PathBuf;
use std::sync::Arc;

use lookalike_plugin::ExtractorPlugin;

/// When an acknowledged write reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every `insert_*`, `remove` and `set_label` flushes (fsync) before it returns: once it has
    /// returned, the change survives `kill -9` and power loss. The default.
    Immediate,
    /// Writes are flushed in the background every few hundred milliseconds, and by
    /// [`Db::flush`](crate::Db::flush) and on drop. A crash loses at most the last moments of
    /// writes, never consistency. For bulk loads.
    Relaxed,
}

/// Which FAISS index serves `nearest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexKind {
    /// Exact (flat) search up to [`Options::exact_limit`] vectors, HNSW above. The default.
    Auto,
    /// Always exact: a flat index, a full scan per query.
    Exact,
    /// Always approximate: HNSW with `m` neighbours per node and `ef_search` candidates
    /// explored per query.
    Hnsw {
        /// Graph degree (FAISS `HNSW{m}`). 32 is a good default.
        m: u32,
        /// Search breadth; higher is slower and more accurate. Never below `k`.
        ef_search: u32,
    },
}

/// How a database is opened. Build with [`Options::default`] and the setters.
///
/// ## Defaults
///
/// | option | default |
/// |---|---|
/// | [`durability`](Options::durability) | [`Durability::Immediate`] |
/// | [`index`](Options::index) | [`IndexKind::Auto`] |
/// | [`exact_limit`](Options::exact_limit) | 50,000 vectors |
/// | [`max_image_bytes`](Options::max_image_bytes) | 32 MiB |
/// | [`max_image_pixels`](Options::max_image_pixels) | 40 megapixels |
/// | [`extractor`](Options::extractor) | `"classic"` (used when the database is created) |
/// | [`snapshot`](Options::snapshot) | on |
/// | [`compact`](Options::compact) | 256 dimensions past 20,000 images |
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) durability: Durability,
    pub(crate) index: IndexKind,
    pub(crate) exact_limit: usize,
    pub(crate) max_image_bytes: u64,
    pub(crate) max_image_pixels: u64,
    pub(crate) extractor: String,
    pub(crate) extractor_config: String,
    pub(crate) extractor_weights: Option<PathBuf>,
    pub(crate) snapshot: bool,
    pub(crate) compact_dim: usize,
    pub(crate) compact_after: usize,
    pub(crate) plugins: Vec<Arc<dyn ExtractorPlugin>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Immediate,
            index: IndexKind::Auto,
            exact_limit: 50_000,
            max_image_bytes: 32 << 20,
            max_image_pixels: 40_000_000,
            extractor: crate::extractors::DEFAULT.to_string(),
            extractor_config: String::new(),
            extractor_weights: None,
            snapshot: true,
            compact_dim: 256,
            compact_after: 20_000,
            plugins: Vec::new(),
        }
    }
}

impl Options {
    /// When writes become durable.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Which index serves queries.
    pub fn index(mut self, index: IndexKind) -> Self {
        self.index = index;
        self
    }

    /// Under [`IndexKind::Auto`], the number of vectors above which the index turns approximate.
    pub fn exact_limit(mut self, vectors: usize) -> Self {
        self.exact_limit = vectors;
        self
    }

    /// Largest encoded image accepted, in bytes.
    pub fn max_image_bytes(mut self, bytes: u64) -> Self {
        self.max_image_bytes = bytes;
        self
    }

    /// The size limits for untrusted images.
    pub(crate) fn limits(&self) -> crate::preprocess::ImageLimits {
        crate::preprocess::ImageLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
        }
    }

    /// The largest encoded image accepted, in bytes (set by [`Options::max_image_bytes`]): a
    /// caller reading files can stop reading past it.
    pub fn image_byte_limit(&self) -> u64 {
        self.max_image_bytes
    }

    /// Largest decoded image accepted, in pixels (width x height): the guard against
    /// decompression bombs, checked from the header before any pixel is decoded.
    pub fn max_image_pixels(mut self, pixels: u64) -> Self {
        self.max_image_pixels = pixels;
        self
    }

    /// The extractor (registry name) and its configuration string that embed images in a
    /// database created by this open. Ignored when the database already exists: its active
    /// model stays active.
    pub fn extractor(mut self, name: &str, config: &str) -> Self {
        self.extractor = name.to_string();
        self.extractor_config = config.to_string();
        self
    }

    /// A safetensors weights file for the extractor of a database created by this open (for
    /// example `efficientnet-lite0.safetensors` for `"efficientnet-lite0"`). The database reads
    /// it once and keeps the weights in its store: the file is not needed afterwards. Ignored
    /// when the database already exists.
    pub fn extractor_weights(mut self, path: impl Into<PathBuf>) -> Self {
        self.extractor_weights = Some(path.into());
        self
    }

    /// Keep a snapshot of the index on disk for fast open (on by default).
    pub fn snapshot(mut self, on: bool) -> Self {
        self.snapshot = on;
        self
    }

    /// Compact vectors: once the database holds `after` images, an active model whose
    /// extractor makes more than `dim` dimensions gets a PCA projection to `dim`, fitted on
    /// its own stored vectors (up to 20,000 of them). The projected model is stored as a new
    /// model version and made active in one step (queries keep running meanwhile); its
    /// vectors, the index, queries and later inserts are all `dim`-dimensional, and the
    /// full-size vectors of the old version are deleted. Smaller vectors make the index
    /// faster to search, to add to and to load, and the store smaller (the default extractor
    /// goes from 2,408 floats an image to 256 with the same Fashion-MNIST accuracy@1:
    /// `docs/benchmarks.md`, "Compact vectors"). `dim` 0 turns it off. `after` is at least
    /// `dim` (a PCA needs as many vectors as dimensions).
    pub fn compact(mut self, dim: usize, after: usize) -> Self {
        self.compact_dim = dim;
        self.compact_after = after.max(dim);
        self
    }

    /// Registers a third-party extractor plugin for this open. A plugin with the name of a
    /// built-in one replaces it.
    pub fn register(mut self, plugin: Arc<dyn ExtractorPlugin>) -> Self {
        self.plugins.push(plugin);
        self
    }
}
