//! The source of truth: sled trees holding images, their entries (label, size), embeddings per
//! model version, models, and meta. Every value is a bincode-2 record with a format version.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `images` | id (u64 BE) | [`ImageRecord`]: the encoded bytes as inserted (up to [`INLINE_BYTES`]), or [`PackedImageRecord`]: where they are in the pack files (`packs`) |
//! | `entries` | id (u64 BE) | [`EntryRecord`]: label, width, height, source, metadata, content hash (`entries.rs`) |
//! | `hashes`, `metadata_index` | see `entries.rs` | empty: indexes of entries |
//! | `embeddings` | model (u32 BE) ++ id (u64 BE) | [`EmbeddingRecord`] |
//! | `models` | model (u32 BE) | [`ModelRecord`]: plugin, config, weights, dimension, metric |
//! | `meta` | `b"format"`, `b"active_model"` | u32 |
//! | `meta` | `b"policy"` ++ model (u32 BE) | string: the decode policy the model's embeddings were made with |
//! | `meta` | `b"next_id"` | u64: no stored image has this id or a larger one |
//! | `meta` | `b"projection"` ++ model (u32 BE) | [`ProjectionRecord`]: the PCA the model's vectors are stored through (format 4) |
//! | `changes` | sequence number (u64 BE) | id (u64 BE): an image removed or whose entry changed (format 5; `db/catalogue.rs`) |
//! | `jobs` | `b"checkpoint"` | [`CheckpointRecord`]: the last epoch checkpoint of a training job |
//!
//! An image is inserted in one transaction over `images`, `entries` (with its index keys) and
//! `embeddings`, so after a crash an id is either in all of them or in none.
//!
//! Store formats: 1 had no decode policies; 2 records one per model, keeps large image bytes
//! in pack files and dense ids (`next_id`). Opening a format-1 store upgrades it in place: its
//! models have no policy, so their images are embedded again on first use (`db.rs`,
//! `model_from_record`), ids continue after the largest stored one, and a build that reads
//! only format 1 refuses the upgraded store instead of mixing its embeddings with differently
//! decoded queries. Format 3 adds sources, metadata and content hashes to entries; opening an
//! older store rewrites its entries (`entries.rs`). Format 4 adds projections (compact vectors,
//! `db/compact.rs`): a model with one stores vectors of the projection's dimension, which a
//! format-3 build would misread, so it refuses the store instead. Opening a format-3 store only
//! records the new format. Format 5 adds the change log (`changes`), which lets `catalogue.bin`
//! be caught up instead of every entry read at open: a format-4 build would remove images
//! without logging it, and a later open would trust a catalogue that still lists them, so it
//! refuses the store. Opening a format-4 store only records the new format (its first open
//! scans the entries, having no `catalogue.bin`).

mod direct;
mod durable;
mod entries;
mod packs;

pub(crate) use durable::sync_dir;
pub(crate) use entries::{
    content_hash, EntryRecord, ENTRY_V2, MAX_METADATA_BYTES, MAX_SOURCE_BYTES,
};

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::Tree;

use crate::error::{Error, Result};
use crate::ImageId;
use packs::{PackRef, Packs};

/// The newest on-disk format this build writes and reads.
pub(crate) const FORMAT: u32 = 5;
const RECORD_V1: u16 = 1;
/// The format field of a [`PackedImageRecord`] (an image record whose bytes are in a pack).
const RECORD_PACKED: u16 = 2;
/// Images up to this size stay inline in sled; larger ones go to the pack files.
const INLINE_BYTES: usize = 16 << 10;
/// Free space kept on the database's disk: writes that would leave less are refused with
/// `Error::DiskFull` before sled or the packs reach ENOSPC (sled hung in its flush, and a
/// database opened on a full disk was left unreadable). The smaller of this and a twentieth of
/// the file system.
const SPACE_RESERVE: u64 = 64 << 20;

const META_FORMAT: &[u8] = b"format";
const META_ACTIVE: &[u8] = b"active_model";
const META_POLICY: &[u8] = b"policy";
const META_NEXT_ID: &[u8] = b"next_id";
const META_PROJECTION: &[u8] = b"projection";
const JOB_CHECKPOINT: &[u8] = b"checkpoint";

/// The encoded image, as the caller gave it. The bytes go through serde as one byte string
/// (one copy), which bincode encodes exactly as the sequence of `u8` that format 1 wrote.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub format: u16,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// An image record whose bytes are in a pack file (format [`RECORD_PACKED`]).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PackedImageRecord {
    pub format: u16,
    pub pack: PackRef,
}

/// [`ImageRecord`] borrowing its bytes, for writing without a copy (the same encoding).
#[derive(Serialize)]
struct ImageRecordRef<'a> {
    format: u16,
    #[serde(with = "serde_bytes")]
    bytes: &'a [u8],
}

/// One embedding of one image by one model version.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EmbeddingRecord {
    pub format: u16,
    pub vector: Vec<f32>,
}

/// A model version: which plugin, how configured, its weights and what it produces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelRecord {
    pub format: u16,
    pub plugin: String,
    pub plugin_version: u32,
    pub config: String,
    pub dim: u32,
    pub metric: String,
    pub weights: Vec<u8>,
    pub created_unix: u64,
}

/// A model's projection to compact vectors: `y = x * matrix + bias` (store format 4).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProjectionRecord {
    pub format: u16,
    /// The model whose stored vectors it was fitted on and projected from.
    pub from_model: u32,
    /// How many vectors it was fitted on.
    pub fitted_on: u64,
    pub dim_in: u32,
    pub dim_out: u32,
    /// `dim_in x dim_out`, row-major.
    pub matrix: Vec<f32>,
    pub bias: Vec<f32>,
    pub created_unix: u64,
}

/// A training job's state after a finished epoch: enough to resume it exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointRecord {
    pub format: u16,
    /// The extractor plugin and configuration being trained.
    pub plugin: String,
    pub config: String,
    /// The options that decide the job's course (seed, epochs, batch shape, miner, ...),
    /// serialised: a resume with other options is refused.
    pub fingerprint: String,
    /// Epochs finished.
    pub epochs_done: u32,
    /// The trainable's weights (safetensors) and the optimiser's buffers (safetensors).
    pub weights: Vec<u8>,
    pub optimiser: Vec<u8>,
    /// Learning rate at the end of the epoch (decay may have changed it), and the epochs since
    /// the last decay.
    pub lr: f64,
    pub since_decay: u32,
    /// Validation accuracies so far (for the decay rule and the report).
    pub history: Vec<(f64, f64, f64)>,
    /// Counters carried into the report.
    pub steps: u64,
    pub pairs_seen: u64,
    pub images_seen: u64,
    pub train_seconds: f64,
    pub loader_wait_seconds: f64,
    /// Metrics of the active model before the job.
    pub before: (f64, f64),
    pub created_unix: u64,
    /// The job's label proxies (labels x dim, row-major; empty without the proxy loss).
    pub proxies: Vec<f32>,
}

/// A record ready to insert: the image, its entry and its embedding under `model`.
pub(crate) struct NewImage<'a> {
    pub id: ImageId,
    pub bytes: &'a [u8],
    pub entry: EntryRecord,
    pub vector: Vec<f32>,
}

/// The open sled database and its trees.
#[derive(Debug)]
pub(crate) struct Store {
    /// The database directory.
    dir: std::path::PathBuf,
    db: sled::Db,
    packs: Packs,
    /// Durability::Relaxed: pack appends are synced by `flush`, not by each insert.
    relaxed: bool,
    /// sled's own files, synced after its flush.
    sled_files: durable::SledFiles,
    /// The next image id to hand out. Ids are dense: one after another from 1, never reused
    /// (`meta/next_id` moves past each committed insert in the same transaction).
    next_id: std::sync::atomic::AtomicU64,
    images: Tree,
    entries: Tree,
    embeddings: Tree,
    models: Tree,
    meta: Tree,
    jobs: Tree,
    hashes: Tree,
    metadata_index: Tree,
    /// The change log: removals and entry changes by sequence number (`db/catalogue.rs`).
    changes: Tree,
    /// Bytes of image records and embeddings given to sled by this handle: most of what it
    /// logs (see [`LogFold`]).
    logged: std::sync::atomic::AtomicU64,
    /// Declared last: it drops after `db` and every tree, once sled has closed.
    fold: LogFold,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.logged_bytes() >= FOLD_AFTER_BYTES {
            self.fold.request();
        }
    }
}

/// sled (0.34) writes a snapshot of its page table only while it opens, and every open
/// replays and checksums the log written since the last one: after a session that stored a
/// million small images, 3.3 GB in 1.35 s, most of the next open. When a handle gave sled
/// more than this many bytes, the store folds the log as it closes instead ([`LogFold`]).
const FOLD_AFTER_BYTES: u64 = 256 << 20;

/// Opens sled in `dir/store`. The caller holds the database's LOCK, so a sled file lock that
/// is still held belongs to a handle of this process that is being dropped (sled releases it
/// from a background thread): it is waited for briefly instead of failing.
fn open_sled(dir: &Path, relaxed: bool) -> Result<sled::Db> {
    let config = sled::Config::new()
        .path(dir.join("store"))
        .flush_every_ms(if relaxed { Some(500) } else { None })
        .cache_capacity(64 << 20);
    let mut attempts = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if attempts < 250 && e.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// Folds sled's log into a sled snapshot once sled has closed, if asked to: it opens sled
/// once more (which replays the log and writes the snapshot) and closes it, so that the next
/// open replays nothing. The last field of [`Store`], so that it drops after sled's handles;
/// best effort (the next open replays the log otherwise).
#[derive(Debug)]
struct LogFold {
    dir: std::path::PathBuf,
    due: bool,
}

impl LogFold {
    fn new(dir: &Path) -> LogFold {
        LogFold {
            dir: dir.to_path_buf(),
            due: false,
        }
    }

    /// Folds the log when this drops.
    fn request(&mut self) {
        self.due = true;
    }
}

impl Drop for LogFold {
    fn drop(&mut self) {
        // sled writes its snapshot while it opens: not on a full disk.
        if self.due && check_space(&self.dir, 0).is_ok() {
            let _ = open_sled(&self.dir, false);
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("encoding a plain struct into a Vec cannot fail")
}

fn decode<T: DeserializeOwned>(
    what: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T> {
    let (value, used): (T, usize) =
        crate::codec::decode(bytes).map_err(|e| Error::corrupt(what, &key, e))?;
    if used != bytes.len() {
        return Err(Error::corrupt(
            what,
            key,
            format!("{} trailing bytes", bytes.len() - used),
        ));
    }
    Ok(value)
}

/// Checks the record format field of a decoded record.
fn check_format(what: &'static str, key: impl std::fmt::Display, format: u16) -> Result<()> {
    if format == RECORD_V1 {
        Ok(())
    } else {
        Err(Error::corrupt(
            what,
            key,
            format!("record format {format}, this build reads {RECORD_V1}"),
        ))
    }
}

/// Refuses a write of `needed` bytes into `dir` that would leave less than the reserve free
/// ([`SPACE_RESERVE`], at most a twentieth of the file system). A file system that cannot
/// say is not checked.
pub(crate) fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let needed = needed.saturating_add(SPACE_RESERVE.min(total / 20));
    if available < needed {
        return Err(Error::DiskFull {
            path: dir.to_path_buf(),
            available,
            needed,
        });
    }
    Ok(())
}

fn policy_key(model: u32) -> Vec<u8> {
    [META_POLICY, &model.to_be_bytes()[..]].concat()
}

fn projection_key(model: u32) -> Vec<u8> {
    [META_PROJECTION, &model.to_be_bytes()[..]].concat()
}

pub(crate) fn embedding_key(model: u32, id: ImageId) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&model.to_be_bytes());
    k[4..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn id_from_key(what: &'static str, key: &[u8]) -> Result<ImageId> {
    let arr: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::corrupt(what, format!("{key:?}"), "key is not 8 bytes"))?;
    Ok(ImageId(u64::from_be_bytes(arr)))
}

fn abort<E>(e: TransactionError<E>) -> Error
where
    Error: From<E>,
{
    match e {
        TransactionError::Abort(e) => Error::from(e),
        TransactionError::Storage(e) => Error::Storage(e),
    }
}

impl Store {
    /// Opens (creating if needed) the store of the database in `dir`: sled in `dir/store`,
    /// pack files in `dir/images`.
    pub fn open(dir: &Path, relaxed: bool) -> Result<Store> {
        // sled writes while it opens (recovery, a new segment): not on a full disk.
        check_space(dir, 0)?;
        let db = open_sled(dir, relaxed)?;
        let store = Store {
            dir: dir.to_path_buf(),
            images: db.open_tree("images")?,
            entries: db.open_tree("entries")?,
            embeddings: db.open_tree("embeddings")?,
            models: db.open_tree("models")?,
            meta: db.open_tree("meta")?,
            jobs: db.open_tree("jobs")?,
            hashes: db.open_tree("hashes")?,
            metadata_index: db.open_tree("metadata_index")?,
            changes: db.open_tree("changes")?,
            db,
            packs: Packs::open(&dir.join("images")),
            sled_files: durable::SledFiles::open(&dir.join("store"))?,
            relaxed,
            next_id: std::sync::atomic::AtomicU64::new(1),
            logged: std::sync::atomic::AtomicU64::new(0),
            fold: LogFold::new(dir),
        };
        match store.meta.get(META_FORMAT)? {
            None => {
                store.meta.insert(META_FORMAT, encode(&FORMAT))?;
            }
            Some(v) => {
                let found: u32 = decode("meta", "format", &v)?;
                if found > FORMAT {
                    return Err(Error::FormatTooNew {
                        found,
                        supported: FORMAT,
                    });
                }
                if found < FORMAT {
                    // 1 -> 2 adds decode policies (a model without one is re-embedded);
                    // 2 -> 3 rewrites the entries with content hashes; 3 -> 4 adds
                    // projections and 4 -> 5 the change log (nothing to rewrite). The format moves first, so that
                    // older builds refuse the store while it is rewritten.
                    let mut batch = sled::Batch::default();
                    batch.insert(META_FORMAT, encode(&FORMAT));
                    if found < 3 {
                        batch.insert(entries::META_UPGRADING, &[][..]);
                    }
                    store.meta.apply_batch(batch)?;
                    store.flush()?;
                }
            }
        }
        if store.meta.contains_key(entries::META_UPGRADING)? {
            store.upgrade_entries()?;
        }
        store.init_next_id()?;
        Ok(store)
    }

    /// Makes every write so far durable: the pack files first, then sled (whose records
    /// point into them) and blobs. sled 0.34's flush ends with `sync_file_range` on its log, which
    /// writes the pages but neither the file's metadata nor the drive's cache, and it never
    /// syncs the files it keeps large values in (`blobs/`, spacejam/sled#1452): so the log is
    /// `fdatasync`ed here after it, and each new blob file and the blob directory `fsync`ed.
    pub fn flush(&self) -> Result<()> {
        self.packs.sync()?;
        self.sled_files.sync_blobs()?;
        self.db.flush()?;
        self.sled_files.sync()
    }

    /// A fresh image id: the next after every id handed out by this handle or stored. An id
    /// handed out to an insert that then failed is not used again by this handle; after a
    /// reopen it may be, as no image ever had it.
    pub fn next_id(&self) -> ImageId {
        ImageId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// No stored image has this id or a larger one.
    pub fn id_bound(&self) -> u64 {
        self.next_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where ids continue after opening: `meta/next_id`, or for a store without one (before
    /// format 2, whose ids came from sled's `generate_id` and jumped by about two million at
    /// each reopen) one past the largest stored id.
    fn init_next_id(&self) -> Result<()> {
        let stored: Option<u64> = match self.meta.get(META_NEXT_ID)? {
            Some(v) => Some(decode("meta", "next_id", &v)?),
            None => None,
        };
        let largest = match self.entries.last()? {
            Some((k, _)) => id_from_key("entry", &k)?.0,
            None => 0,
        };
        let next = stored.unwrap_or(0).max(largest + 1);
        self.next_id
            .store(next, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Inserts images atomically: all of them or none. The bytes of large images are
    /// appended to the pack files first (synced unless relaxed), so that a record never
    /// points at bytes that are not on disk; a failed insert leaves them unreferenced.
    ///
    /// The image records and embeddings are written next, as plain sled inserts, and only
    /// then the entries (what makes an image exist), hashes and the next id in one
    /// transaction. sled holds one process-wide lock over a transaction's commit that every
    /// read waits for (`Tree::get` included): with all five records of 1,000 images in one
    /// transaction, queries waited up to 140 ms behind it at a million images; with the
    /// entries alone, under 80 ms (docs/benchmarks.md, "Session 14"). Until the transaction
    /// commits, the records written before it belong to no entry: nothing reads them (every
    /// read goes by an entry's id, and `build_index` keeps only catalogued ids), a failed
    /// transaction removes them, and after a crash in between they sit at ids from the store's
    /// next id on, which the next insert overwrites (sled recovers a prefix of its log, so a
    /// recovered entry always has its records).
    pub fn insert(&self, model: u32, images: &[NewImage]) -> Result<()> {
        // Pack bytes once; sled's log takes records about twice before it compacts.
        let needed: u64 = images
            .iter()
            .map(|n| {
                let vector = 4 * n.vector.len() as u64 + 1024;
                if n.bytes.len() > INLINE_BYTES {
                    n.bytes.len() as u64 + 2 * vector
                } else {
                    2 * (n.bytes.len() as u64 + vector)
                }
            })
            .sum();
        check_space(&self.dir, needed)?;
        let large: Vec<(ImageId, &[u8])> = images
            .iter()
            .filter(|n| n.bytes.len() > INLINE_BYTES)
            .map(|n| (n.id, n.bytes))
            .collect();
        let mut packed = self.packs.append(&large, !self.relaxed)?.into_iter();
        let mut image_record = |n: &NewImage| -> Result<Vec<u8>> {
            if n.bytes.len() > INLINE_BYTES {
                let pack = packed
                    .next()
                    .ok_or_else(|| Error::corrupt("image", n.id, "pack append lost a record"))?;
                Ok(encode(&PackedImageRecord {
                    format: RECORD_PACKED,
                    pack,
                }))
            } else {
                Ok(encode(&ImageRecordRef {
                    format: RECORD_V1,
                    bytes: n.bytes,
                }))
            }
        };
        let encoded: Vec<_> = images
            .iter()
            .map(|n| {
                Ok((
                    n.id.0.to_be_bytes(),
                    image_record(n)?,
                    embedding_key(model, n.id),
                    encode(&EmbeddingRecord {
                        format: RECORD_V1,
                        vector: n.vector.clone(),
                    }),
                ))
            })
            .collect::<Result<_>>()?;
        for (id, img, ekey, emb) in &encoded {
            self.images.insert(&id[..], img.as_slice())?;
            self.embeddings.insert(&ekey[..], emb.as_slice())?;
            self.count_logged(img.len() + emb.len());
        }
        let after = images.iter().map(|n| n.id.0 + 1).max().unwrap_or(0);
        let images_in = images;
        let committed = (
            &self.entries,
            &self.meta,
            &self.hashes,
            &self.metadata_index,
        )
            .transaction(|(entries, meta, hashes, index)| {
                let stored: u64 = match meta.get(META_NEXT_ID)? {
                    Some(v) => decode("meta", "next_id", &v)
                        .map_err(ConflictableTransactionError::Abort)?,
                    None => 0,
                };
                if after > stored {
                    meta.insert(META_NEXT_ID, encode(&after))?;
                }
                for n in images_in {
                    entries::put_entry_tx(entries, hashes, index, n.id, &n.entry, None)?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(abort);
        if committed.is_err() {
            // Nothing refers to them; removed so that they do not linger (best effort: an id
            // is never given to an entry twice, so one left here is never read).
            for (id, _, ekey, _) in &encoded {
                let _ = self.images.remove(&id[..]);
                let _ = self.embeddings.remove(&ekey[..]);
            }
        }
        committed
    }

    /// Removes an image, its entry and its embeddings under every model in `models`, and
    /// logs the removal as change `seq`. Returns false when there was no such image.
    pub fn remove(&self, id: ImageId, models: &[u32], seq: u64) -> Result<bool> {
        let key = id.0.to_be_bytes();
        (
            &self.images,
            &self.entries,
            &self.embeddings,
            &self.hashes,
            &self.metadata_index,
            &self.changes,
        )
            .transaction(|(images, entries, embeddings, hashes, index, changes)| {
                if !entries::remove_entry_tx(entries, hashes, index, id)? {
                    return Ok(false);
                }
                changes.insert(&seq.to_be_bytes()[..], &key[..])?;
                images.remove(&key[..])?;
                for m in models {
                    embeddings.remove(&embedding_key(*m, id)[..])?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(true)
            })
            .map_err(abort)
    }

    /// The encoded bytes of an image.
    pub fn image(&self, id: ImageId) -> Result<Option<Vec<u8>>> {
        match self.images.get(id.0.to_be_bytes())? {
            None => Ok(None),
            // The format field comes first; bincode writes a u16 under 251 as that one byte.
            Some(v) if v.first() == Some(&(RECORD_PACKED as u8)) => {
                let r: PackedImageRecord = decode("image", id, &v)?;
                self.packs.read(id, &r.pack).map(Some)
            }
            Some(v) => {
                let r: ImageRecord = decode("image", id, &v)?;
                check_format("image", id, r.format)?;
                Ok(Some(r.bytes))
            }
        }
    }

    /// A stored image decoded for an extractor's `input` (the stored bytes passed the limits
    /// when inserted); `None` for an image that is not (or no longer) stored. The bytes live
    /// only inside this call.
    pub fn thumb(
        &self,
        id: ImageId,
        input: &lookalike_plugin::InputSpec,
    ) -> Result<Option<crate::preprocess::Thumb>> {
        match self.image(id)? {
            Some(bytes) => {
                crate::preprocess::prepare(&bytes, crate::preprocess::ImageLimits::STORED, input)
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    /// The entry of an image.
    pub fn entry(&self, id: ImageId) -> Result<Option<EntryRecord>> {
        match self.entries.get(id.0.to_be_bytes())? {
            None => Ok(None),
            Some(v) => entries::decode_entry(id, &v).map(Some),
        }
    }

    /// Every entry, in id order.
    pub fn entries(&self) -> impl Iterator<Item = Result<(ImageId, EntryRecord)>> + '_ {
        self.entries.iter().map(|kv| {
            let (k, v) = kv?;
            let id = id_from_key("entry", &k)?;
            Ok((id, entries::decode_entry(id, &v)?))
        })
    }

    /// The entries from id `from` on, ascending.
    pub fn entries_from(
        &self,
        from: ImageId,
    ) -> impl Iterator<Item = Result<(ImageId, EntryRecord)>> + '_ {
        self.entries.range(from.0.to_be_bytes()..).map(|kv| {
            let (k, v) = kv?;
            let id = id_from_key("entry", &k)?;
            Ok((id, entries::decode_entry(id, &v)?))
        })
    }

    /// The images of the logged changes numbered above `seen`, in order.
    pub fn changes_after(&self, seen: u64) -> Result<Vec<ImageId>> {
        let Some(from) = seen.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.changes
            .range(from.to_be_bytes()..)
            .map(|kv| {
                let (k, v) = kv?;
                id_from_key("change", &k)?;
                id_from_key("change", &v)
            })
            .collect()
    }

    /// The largest number in the change log (0 when it is empty).
    pub fn last_change(&self) -> Result<u64> {
        match self.changes.last()? {
            Some((k, _)) => Ok(id_from_key("change", &k)?.0),
            None => Ok(0),
        }
    }

    /// Drops logged changes numbered up to `seen` (a saved catalogue has them), except the
    /// last one, which keeps the numbering going up after a reopen.
    pub fn trim_changes(&self, seen: u64) -> Result<()> {
        let last = self.last_change()?;
        for kv in self
            .changes
            .range(..=seen.min(last.saturating_sub(1)).to_be_bytes())
        {
            let (k, _) = kv?;
            self.changes.remove(k)?;
        }
        Ok(())
    }

    /// The embedding of `id` under `model`, checked against `dim`.
    pub fn embedding(&self, model: u32, id: ImageId, dim: usize) -> Result<Option<Vec<f32>>> {
        match self.embeddings.get(embedding_key(model, id))? {
            None => Ok(None),
            Some(v) => {
                let key = format!("model {model} image {id}");
                let r: EmbeddingRecord = decode("embedding", &key, &v)?;
                check_format("embedding", &key, r.format)?;
                if r.vector.len() != dim {
                    return Err(Error::DimensionMismatch {
                        what: format!("stored embedding ({key})"),
                        expected: dim,
                        got: r.vector.len(),
                    });
                }
                Ok(Some(r.vector))
            }
        }
    }

    /// Every embedding under `model`, in id order.
    pub fn embeddings(
        &self,
        model: u32,
        dim: usize,
    ) -> impl Iterator<Item = Result<(ImageId, Vec<f32>)>> + '_ {
        self.embeddings
            .scan_prefix(model.to_be_bytes())
            .map(move |kv| {
                let (k, v) = kv?;
                let id = id_from_key("embedding", &k[4..])?;
                let key = format!("model {model} image {id}");
                let r: EmbeddingRecord = decode("embedding", &key, &v)?;
                check_format("embedding", &key, r.format)?;
                if r.vector.len() != dim {
                    return Err(Error::DimensionMismatch {
                        what: format!("stored embedding ({key})"),
                        expected: dim,
                        got: r.vector.len(),
                    });
                }
                Ok((id, r.vector))
            })
    }

    /// Stores one embedding.
    pub fn put_embedding(&self, model: u32, id: ImageId, vector: &[f32]) -> Result<()> {
        let rec = EmbeddingRecord {
            format: RECORD_V1,
            vector: vector.to_vec(),
        };
        let bytes = encode(&rec);
        self.count_logged(bytes.len());
        self.embeddings.insert(embedding_key(model, id), bytes)?;
        Ok(())
    }

    fn count_logged(&self, bytes: usize) {
        self.logged
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of image records and embeddings this handle gave sled (see [`LogFold`]).
    fn logged_bytes(&self) -> u64 {
        self.logged.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a model version.
    pub fn put_model(&self, version: u32, model: &ModelRecord) -> Result<()> {
        check_space(&self.dir, 2 * model.weights.len() as u64)?;
        self.models.insert(version.to_be_bytes(), encode(model))?;
        Ok(())
    }

    /// A stored model version.
    pub fn model(&self, version: u32) -> Result<Option<ModelRecord>> {
        match self.models.get(version.to_be_bytes())? {
            None => Ok(None),
            Some(v) => {
                let r: ModelRecord = decode("model", version, &v)?;
                check_format("model", version, r.format)?;
                Ok(Some(r))
            }
        }
    }

    /// The version numbers of every stored model.
    pub fn model_versions(&self) -> Result<Vec<u32>> {
        self.models
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                let arr: [u8; 4] = k
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::corrupt("model", format!("{k:?}"), "key is not 4 bytes"))?;
                Ok(u32::from_be_bytes(arr))
            })
            .collect()
    }

    /// The active model version, if one was set.
    pub fn active_model(&self) -> Result<Option<u32>> {
        match self.meta.get(META_ACTIVE)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode("meta", "active_model", &v)?)),
        }
    }

    /// Sets the active model version.
    pub fn set_active_model(&self, version: u32) -> Result<()> {
        self.meta.insert(META_ACTIVE, encode(&version))?;
        Ok(())
    }

    /// Deletes a model version's record, its decode policy and every embedding under it.
    pub fn delete_model(&self, version: u32) -> Result<()> {
        self.models.remove(version.to_be_bytes())?;
        self.meta.remove(policy_key(version))?;
        self.meta.remove(projection_key(version))?;
        self.delete_embeddings(version)
    }

    /// The projection a model's vectors are stored through, if it has one.
    pub fn projection(&self, version: u32) -> Result<Option<ProjectionRecord>> {
        match self.meta.get(projection_key(version))? {
            None => Ok(None),
            Some(v) => {
                let key = format!("projection {version}");
                let r: ProjectionRecord = decode("meta", &key, &v)?;
                check_format("meta", &key, r.format)?;
                Ok(Some(r))
            }
        }
    }

    /// Records a model's projection.
    pub fn put_projection(&self, version: u32, record: &ProjectionRecord) -> Result<()> {
        let bytes = encode(record);
        check_space(&self.dir, 2 * bytes.len() as u64)?;
        self.meta.insert(projection_key(version), bytes)?;
        Ok(())
    }

    /// The decode policy a model's stored embeddings were made with (`None` before format 2).
    pub fn policy(&self, version: u32) -> Result<Option<String>> {
        match self.meta.get(policy_key(version))? {
            None => Ok(None),
            Some(v) => Ok(Some(decode("meta", format!("policy {version}"), &v)?)),
        }
    }

    /// Records the decode policy of a model's embeddings.
    pub fn set_policy(&self, version: u32, policy: &str) -> Result<()> {
        self.meta.insert(policy_key(version), encode(&policy))?;
        Ok(())
    }

    /// Deletes every embedding stored under a model version (the record stays).
    pub fn delete_embeddings(&self, version: u32) -> Result<()> {
        for key in self.embeddings.scan_prefix(version.to_be_bytes()).keys() {
            self.embeddings.remove(key?)?;
        }
        Ok(())
    }

    /// The training job checkpoint, if one is stored.
    pub fn checkpoint(&self) -> Result<Option<CheckpointRecord>> {
        match self.jobs.get(JOB_CHECKPOINT)? {
            None => Ok(None),
            Some(v) => decode_checkpoint(&v).map(Some),
        }
    }

    /// Stores the training job checkpoint, durably.
    pub fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        check_space(
            &self.dir,
            2 * (record.weights.len() + record.optimiser.len()) as u64,
        )?;
        self.jobs.insert(JOB_CHECKPOINT, encode(record))?;
        self.flush()
    }

    /// Deletes the training job checkpoint.
    pub fn clear_checkpoint(&self) -> Result<()> {
        self.jobs.remove(JOB_CHECKPOINT)?;
        Ok(())
    }
}

/// Decodes `bytes` as every record kind the store reads, through the same checks as a read
/// (the fuzz targets' entry to the record decoders; see `src/fuzzing.rs`). Never panics.
pub(crate) fn decode_every_record(bytes: &[u8]) {
    let key = "fuzz";
    if let Ok(r) = decode::<ImageRecord>("image", key, bytes) {
        let _ = check_format("image", key, r.format);
    }
    let _ = decode::<PackedImageRecord>("image", key, bytes);
    let _ = entries::decode_entry(key, bytes);
    if let Ok(r) = decode::<EmbeddingRecord>("embedding", key, bytes) {
        let _ = check_format("embedding", key, r.format);
    }
    if let Ok(r) = decode::<ModelRecord>("model", key, bytes) {
        let _ = check_format("model", key, r.format);
    }
    if let Ok(r) = decode::<ProjectionRecord>("meta", key, bytes) {
        let _ = check_format("meta", key, r.format);
    }
    let _ = decode_checkpoint(bytes);
    let _ = id_from_key("entry", bytes);
    let _ = decode::<u32>("meta", key, bytes);
    let _ = decode::<u64>("meta", key, bytes);
    let _ = decode::<String>("meta", key, bytes);
}

/// One encoded record of each kind, for the fuzz targets' seed corpora.
#[cfg(test)]
pub(crate) fn seed_records() -> Vec<(&'static str, Vec<u8>)> {
    let entry = EntryRecord {
        format: ENTRY_V2,
        label: Some("shoe".into()),
        width: 640,
        height: 480,
        source: Some("photos/shoe.jpg".into()),
        metadata: Some(r#"{"sku":"A-1","price":12.5}"#.into()),
        hash: content_hash(b"shoe"),
    };
    vec![
        (
            "image",
            encode(&ImageRecord {
                format: RECORD_V1,
                bytes: vec![1, 2, 3],
            }),
        ),
        (
            "packed",
            encode(&PackedImageRecord {
                format: RECORD_PACKED,
                pack: PackRef {
                    segment: 1,
                    offset: 24,
                    len: 3,
                    crc: 7,
                },
            }),
        ),
        ("entry", encode(&entry)),
        (
            "embedding",
            encode(&EmbeddingRecord {
                format: RECORD_V1,
                vector: vec![0.5; 4],
            }),
        ),
        (
            "model",
            encode(&ModelRecord {
                format: RECORD_V1,
                plugin: "simnet".into(),
                plugin_version: 1,
                config: String::new(),
                dim: 4,
                metric: "cosine".into(),
                weights: vec![0; 8],
                created_unix: 1,
            }),
        ),
        (
            "projection",
            encode(&ProjectionRecord {
                format: RECORD_V1,
                from_model: 1,
                fitted_on: 2,
                dim_in: 2,
                dim_out: 1,
                matrix: vec![0.5; 2],
                bias: vec![0.0],
                created_unix: 1,
            }),
        ),
        (
            "checkpoint",
            encode(&CheckpointRecord {
                format: RECORD_V1,
                plugin: "simnet".into(),
                config: String::new(),
                fingerprint: "f".into(),
                epochs_done: 1,
                weights: vec![0; 8],
                optimiser: vec![0; 8],
                lr: 0.1,
                since_decay: 0,
                history: vec![(0.5, 0.5, 0.5)],
                steps: 1,
                pairs_seen: 2,
                images_seen: 3,
                train_seconds: 1.0,
                loader_wait_seconds: 0.0,
                before: (0.1, 0.2),
                created_unix: 1,
                proxies: vec![0.0; 4],
            }),
        ),
    ]
}

/// Decodes a checkpoint record as [`Store::checkpoint`] does.
pub(crate) fn decode_checkpoint(bytes: &[u8]) -> Result<CheckpointRecord> {
    let r: CheckpointRecord = decode("checkpoint", "checkpoint", bytes)?;
    check_format("checkpoint", "checkpoint", r.format)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable log offset of sled's newest snapshot in `dir/store` (from its file name).
    fn sled_snapshot_at(dir: &Path) -> u64 {
        std::fs::read_dir(dir.join("store"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// A requested fold writes sled a snapshot past everything the closed store logged (so
    /// the next open replays nothing); one not requested leaves sled alone.
    #[test]
    fn a_requested_fold_moves_sleds_snapshot_past_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let store = Store::open(d, true).unwrap();
        let bytes = vec![7u8; 1000];
        let images: Vec<NewImage> = (0..200)
            .map(|_| NewImage {
                id: store.next_id(),
                bytes: &bytes,
                entry: EntryRecord {
                    format: ENTRY_V2,
                    label: None,
                    width: 1,
                    height: 1,
                    source: None,
                    metadata: None,
                    hash: content_hash(&bytes),
                },
                vector: vec![0.5; 64],
            })
            .collect();
        store.insert(1, &images).unwrap();
        assert!(store.logged_bytes() >= 200 * 1000);
        store.flush().unwrap();
        drop(store);
        let before = sled_snapshot_at(d);
        drop(LogFold::new(d));
        assert_eq!(sled_snapshot_at(d), before);
        let mut fold = LogFold::new(d);
        fold.request();
        drop(fold);
        assert!(sled_snapshot_at(d) > before);
        let store = Store::open(d, true).unwrap();
        assert_eq!(store.image(ImageId(200)).unwrap(), Some(bytes));
    }

    #[test]
    fn record_round_trip_and_corruption() {
        let e = EntryRecord {
            format: ENTRY_V2,
            label: Some("shoe".into()),
            width: 3,
            height: 4,
            source: None,
            metadata: None,
            hash: [7; 32],
        };
        let bytes = encode(&e);
        let back: EntryRecord = decode("entry", 1, &bytes).unwrap();
        assert_eq!(back.label.as_deref(), Some("shoe"));
        let mut bad = bytes.clone();
        bad.truncate(bytes.len() - 1);
        assert!(matches!(
            decode::<EntryRecord>("entry", 1, &bad),
            Err(Error::Corrupt { .. })
        ));
        let mut extra = bytes;
        extra.push(0);
        assert!(matches!(
            decode::<EntryRecord>("entry", 1, &extra),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn image_records_encode_as_format_1_did() {
        // Format 1 wrote the bytes as a plain Vec<u8> (a sequence of u8).
        #[derive(Serialize)]
        struct V1 {
            format: u16,
            bytes: Vec<u8>,
        }
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let v1 = encode(&V1 {
            format: RECORD_V1,
            bytes: bytes.clone(),
        });
        let now = encode(&ImageRecordRef {
            format: RECORD_V1,
            bytes: &bytes,
        });
        assert_eq!(v1, now);
        // The owned record (serde_bytes) writes the same bytes as the borrowed one.
        let owned = encode(&ImageRecord {
            format: RECORD_V1,
            bytes: bytes.clone(),
        });
        assert_eq!(owned, now);
        let back: ImageRecord = decode("image", 1, &v1).unwrap();
        assert_eq!(back.bytes, bytes);
    }
}
