//! The one error type of the crate.

use std::path::PathBuf;

use crate::ImageId;

/// Everything that can go wrong in lookalike. Each variant says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another process (or another `Db::open` in this one) holds the database.
    #[error(
        "database {path} is locked by another process; close it there first \
         (only one process may open a database at a time)"
    )]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The bytes are not an image in a supported format.
    #[error(
        "could not decode the image ({reason}); supported formats: JPEG, PNG, WebP, GIF, BMP, TIFF"
    )]
    Undecodable {
        /// What the decoder said.
        reason: String,
    },
    /// The image is larger than the configured limit (bytes or pixels).
    #[error(
        "image too large: {what} is {got}, the limit is {limit}; \
         downscale it or raise the limit in Options"
    )]
    ImageTooLarge {
        /// `"encoded size in bytes"` or `"pixel count"` and the like.
        what: &'static str,
        /// The size found.
        got: u64,
        /// The configured limit.
        limit: u64,
    },
    /// `k` was zero.
    #[error("k must be at least 1")]
    ZeroK,
    /// A query was made on a database with no images (or none matching the filter).
    #[error("the database holds no images{}; insert some first", match .filter { Some(f) => format!(" {f}"), None => String::new() })]
    Empty {
        /// The filters in words ("labelled bag or shoe, with sku = \"A-1\""), when given.
        filter: Option<String>,
    },
    /// No image has this id (never inserted, or removed).
    #[error("no image with id {0}")]
    UnknownImage(ImageId),
    /// No extractor plugin is registered under this name.
    #[error("no extractor named {name:?}; known extractors: {}", .known.join(", "))]
    UnknownExtractor {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// No model version with this number is stored.
    #[error("no model version {0}; see Db::models() for the stored ones")]
    UnknownModel(u32),
    /// An embedding or index does not have the dimension the model declares.
    #[error("dimension mismatch in {what}: expected {expected}, got {got}")]
    DimensionMismatch {
        /// Which artefact.
        what: String,
        /// The dimension the model declares.
        expected: usize,
        /// The dimension found.
        got: usize,
    },
    /// A stored record could not be decoded. The database refuses to guess.
    #[error(
        "corrupt {what} record (key {key}): {reason}; the database may have been damaged \
         on disk or written by a newer version of lookalike"
    )]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// Its key, printed.
        key: String,
        /// Why it did not decode.
        reason: String,
    },
    /// The disk holding the database has too little free space for a write: refused before
    /// anything was written, so the database stays as it was and opens again once space is
    /// freed.
    #[error(
        "not enough free space for {path}: {available} bytes free, the write needs {needed} \
         bytes and a reserve is kept; free some disk space and try again (nothing was written)"
    )]
    DiskFull {
        /// The database directory.
        path: PathBuf,
        /// Bytes free for this user on its file system.
        available: u64,
        /// Bytes the write needs, the reserve included.
        needed: u64,
    },
    /// The database was written by a newer, incompatible version of lookalike.
    #[error("database format version {found} is newer than this build supports ({supported}); upgrade lookalike")]
    FormatTooNew {
        /// The version on disk.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// An item of a batch failed; nothing of the batch was stored.
    #[error("item {index} of the batch failed, nothing was inserted: {source}")]
    InBatch {
        /// Position of the failing item in the batch (from 0).
        index: usize,
        /// What was wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// An image's metadata object is larger than the database stores.
    #[error("metadata of {bytes} bytes (as compact JSON) is over the limit of {limit}; keep large data elsewhere and store a reference")]
    MetadataTooLarge {
        /// Its size as compact JSON.
        bytes: usize,
        /// The most stored.
        limit: usize,
    },
    /// An invalid argument or option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An extractor or scorer plugin failed.
    #[error("plugin {name} failed: {source}")]
    Plugin {
        /// The plugin's registry name.
        name: String,
        /// What it reported.
        #[source]
        source: lookalike_plugin::PluginError,
    },
    /// The vector index (FAISS) failed.
    #[error("vector index (FAISS) error: {0}")]
    Index(String),
    /// The store (sled) failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A file-system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Too few labelled images or labels to train (or evaluate) with.
    #[error("not enough labelled data to train: {0}")]
    NotEnoughData(String),
    /// The extractor cannot be trained (its plugin offers no trainable form).
    #[error("extractor {0} cannot be trained (its plugin has no trainable form)")]
    NotTrainable(String),
    /// An unknown pair-mining strategy was asked for.
    #[error("unknown miner {name:?}; known: {}", known.join(", "))]
    UnknownMiner {
        /// The name asked for.
        name: String,
        /// The known names.
        known: Vec<String>,
    },
    /// A training job is already running on this database.
    #[error("a training job is already running on this database; wait for it or cancel it")]
    JobRunning,
    /// The job was cancelled; the database is as it was before the job.
    #[error("the training job was cancelled; nothing was changed")]
    Cancelled,
    /// Training diverged (the loss became NaN or infinite).
    #[error("training diverged at epoch {epoch}, step {step} (loss {loss}); try a smaller learning rate")]
    Diverged {
        /// Epoch (from 0).
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// The model version cannot be deleted because queries use it.
    #[error("model {0} is the active model; activate another before deleting it")]
    ActiveModel(u32),
    /// The active model changed between embedding a query and searching; the query methods
    /// retry on their own, so callers only see this after repeated switches.
    #[error("the active model changed during the query; retry")]
    ModelChanged,
    /// An earlier durable write failed; the in-memory state can no longer be trusted.
    #[error("an earlier write failed ({0}); close and reopen the database")]
    Poisoned(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable name of the kind of error, for programs that read errors as JSON
    /// (`lookalike --json`) or map them to statuses: `bad_image`, `too_large`,
    /// `unknown_image`, `invalid_argument`, `disk_full`, `locked`, `corrupt`, ... An error
    /// about one item of a batch has the item's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Locked { .. } => "locked",
            Error::Undecodable { .. } => "bad_image",
            Error::ImageTooLarge { .. } | Error::MetadataTooLarge { .. } => "too_large",
            Error::ZeroK | Error::InvalidArgument(_) | Error::UnknownMiner { .. } => {
                "invalid_argument"
            }
            Error::Empty { .. } => "empty",
            Error::UnknownImage(_) => "unknown_image",
            Error::UnknownExtractor { .. } => "unknown_extractor",
            Error::UnknownModel(_) => "unknown_model",
            Error::DimensionMismatch { .. } => "dimension_mismatch",
            Error::Corrupt { .. } => "corrupt",
            Error::DiskFull { .. } => "disk_full",
            Error::FormatTooNew { .. } => "format_too_new",
            Error::InBatch { source, .. } => source.kind(),
            Error::Plugin { .. } => "plugin",
            Error::Index(_) => "index",
            Error::Storage(_) => "storage",
            Error::Io { .. } => "io",
            Error::NotEnoughData(_) => "not_enough_data",
            Error::NotTrainable(_) => "not_trainable",
            Error::JobRunning => "job_running",
            Error::Cancelled => "cancelled",
            Error::Diverged { .. } => "diverged",
            Error::ActiveModel(_) => "active_model",
            Error::ModelChanged => "model_changed",
            Error::Poisoned(_) => "poisoned",
        }
    }

    /// The message with the causes it does not already include, on one line: what the CLI
    /// prints and what `lookalike serve` answers as `{"error": ...}`.
    pub fn message(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let cause = s.to_string();
            if !line.contains(&cause) {
                line = format!("{line}: {cause}");
            }
            source = s.source();
        }
        line.replace('\n', " ")
    }

    pub(crate) fn plugin(name: &str, source: lookalike_plugin::PluginError) -> Self {
        Error::Plugin {
            name: name.to_string(),
            source,
        }
    }

    pub(crate) fn corrupt(
        what: &'static str,
        key: impl std::fmt::Display,
        reason: impl std::fmt::Display,
    ) -> Self {
        Error::Corrupt {
            what,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<faiss::error::Error> for Error {
    fn from(e: faiss::error::Error) -> Self {
        Error::Index(e.to_string())
    }
}
