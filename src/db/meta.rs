//! What is stored with an image besides its bytes: label, source, metadata and content hash.

use super::{check_label, Db};
use crate::error::{Error, Result};
use crate::store::{self, EntryRecord, MAX_METADATA_BYTES, MAX_SOURCE_BYTES};
use crate::ImageId;

/// A metadata object: any JSON object of at most 16 KiB (as compact JSON).
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// What the caller stores with an image: a label, where it came from, and metadata.
///
/// ```
/// let meta = lookalike::ImageMeta::label("sneaker")
///     .source("shop/2024/sneaker-01.jpg")
///     .metadata(serde_json::json!({"sku": "S-1", "colour": "red"}))
///     .unwrap();
/// assert_eq!(meta.source.as_deref(), Some("shop/2024/sneaker-01.jpg"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageMeta {
    /// The label (1 to 1024 bytes), used by training and by label filters.
    pub label: Option<String>,
    /// Where the image came from: a path or URI, as given (1 to 4096 bytes). Hits carry it.
    pub source: Option<String>,
    /// A JSON object of at most 16 KiB. Its top-level strings, numbers and booleans (up to
    /// 256 bytes of key and of JSON value) can be filtered on ([`crate::Query::metadata`]).
    pub metadata: Option<Metadata>,
}

impl ImageMeta {
    /// Metadata with a label only.
    pub fn label(label: impl Into<String>) -> Self {
        ImageMeta {
            label: Some(label.into()),
            ..ImageMeta::default()
        }
    }

    /// With a source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Checks what an insert checks: label and source lengths, metadata size.
    pub fn check(&self) -> Result<()> {
        check_meta(self).map(|_| ())
    }

    /// With a metadata object; anything but a JSON object is [`Error::InvalidArgument`].
    pub fn metadata(mut self, value: serde_json::Value) -> Result<Self> {
        match value {
            serde_json::Value::Object(map) => {
                self.metadata = Some(map);
                Ok(self)
            }
            other => Err(Error::InvalidArgument(format!(
                "metadata must be a JSON object, not {other}"
            ))),
        }
    }
}

/// The BLAKE3 hash of an image's bytes as inserted. Shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash of `bytes`, as the database computes it.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(store::content_hash(bytes))
    }
}

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

impl std::str::FromStr for ContentHash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "{s:?} is not a content hash (64 hexadecimal digits)"
            ))
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ContentHash(out))
    }
}

/// Everything the database holds about an image besides its bytes and embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// The image.
    pub id: ImageId,
    /// Its label, source and metadata.
    pub meta: ImageMeta,
    /// The hash of its bytes.
    pub hash: ContentHash,
    /// Its size, upright (after the EXIF orientation).
    pub width: u32,
    /// See `width`.
    pub height: u32,
}

/// What an insert does with an image whose bytes are already stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InsertMode {
    /// Store it again under a new id.
    #[default]
    Always,
    /// Return the stored image's id instead ([`Inserted::Existing`]).
    SkipExisting,
}

/// The outcome of one image of [`Db::insert_images_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored under this new id.
    New(ImageId),
    /// Not stored: an image with identical bytes already has this id.
    Existing(ImageId),
}

impl Inserted {
    /// The id of the image, new or existing.
    pub fn id(self) -> ImageId {
        match self {
            Inserted::New(id) | Inserted::Existing(id) => id,
        }
    }
}

/// Checks a caller's metadata; returns the metadata object as compact JSON text.
pub(super) fn check_meta(meta: &ImageMeta) -> Result<Option<String>> {
    if let Some(l) = &meta.label {
        check_label(l)?;
    }
    if let Some(s) = &meta.source {
        if s.is_empty() || s.len() > MAX_SOURCE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a source is 1 to {MAX_SOURCE_BYTES} bytes, this one is {}",
                s.len()
            )));
        }
    }
    match &meta.metadata {
        None => Ok(None),
        Some(m) => {
            let text = serde_json::to_string(m)
                .map_err(|e| Error::InvalidArgument(format!("metadata: {e}")))?;
            if text.len() > MAX_METADATA_BYTES {
                return Err(Error::MetadataTooLarge {
                    bytes: text.len(),
                    limit: MAX_METADATA_BYTES,
                });
            }
            Ok(Some(text))
        }
    }
}

/// The caller's view of a stored entry.
pub(super) fn meta_of(entry: &EntryRecord) -> ImageMeta {
    ImageMeta {
        label: entry.label.clone(),
        source: entry.source.clone(),
        // Checked when stored; text that no longer parses reads as no metadata.
        metadata: entry
            .metadata
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
    }
}

impl Db {
    /// The label of image `id`.
    pub fn label(&self, id: ImageId) -> Result<Option<String>> {
        self.read_state()?
            .catalogue
            .label(id.0)
            .map(|l| l.map(str::to_string))
            .ok_or(Error::UnknownImage(id))
    }

    /// The label, source and metadata of image `id`.
    pub fn meta(&self, id: ImageId) -> Result<ImageMeta> {
        Ok(self.info(id)?.meta)
    }

    /// Everything stored about image `id` besides its bytes: metadata, content hash, size.
    pub fn info(&self, id: ImageId) -> Result<ImageInfo> {
        if !self.read_state()?.catalogue.contains(id.0) {
            return Err(Error::UnknownImage(id));
        }
        let e = self.inner.store.entry(id)?.ok_or(Error::UnknownImage(id))?;
        Ok(ImageInfo {
            id,
            meta: meta_of(&e),
            hash: ContentHash(e.hash),
            width: e.width,
            height: e.height,
        })
    }

    /// Sets or clears the label of image `id`.
    pub fn set_label(&self, id: ImageId, label: Option<&str>) -> Result<()> {
        let label = label.map(str::to_string);
        self.change_entry(id, &|e: &mut EntryRecord| {
            e.label = label.clone();
            Ok(())
        })
    }

    /// Replaces the label, source and metadata of image `id` (fields set to `None` are
    /// cleared). The bytes, the hash and the embeddings stay.
    pub fn set_meta(&self, id: ImageId, meta: &ImageMeta) -> Result<()> {
        let text = check_meta(meta)?;
        self.change_entry(id, &|e: &mut EntryRecord| {
            e.label = meta.label.clone();
            e.source = meta.source.clone();
            e.metadata = text.clone();
            Ok(())
        })
    }

    /// Ids of the stored images whose bytes hash to `hash` ([`ContentHash::of`]), ascending.
    pub fn find_by_hash(&self, hash: &ContentHash) -> Result<Vec<ImageId>> {
        let found = self.inner.store.find_by_hash(&hash.0)?;
        let state = self.read_state()?;
        Ok(found
            .into_iter()
            .filter(|id| state.catalogue.contains(id.0))
            .collect())
    }

    /// Changes the stored entry of `id` durably, then the catalogue of labels.
    fn change_entry(
        &self,
        id: ImageId,
        change: &dyn Fn(&mut EntryRecord) -> Result<()>,
    ) -> Result<()> {
        self.check_poisoned()?;
        let checked = |e: &mut EntryRecord| {
            change(e)?;
            match &e.label {
                Some(l) => check_label(l),
                None => Ok(()),
            }
        };
        let mut held = self.inner.pending.hold();
        let entry = self
            .inner
            .store
            .update_entry(id, checked, held.seq())?
            .ok_or(Error::UnknownImage(id))?;
        self.durable_write()?;
        let mut state = self.write_state()?;
        if !state.catalogue.contains(id.0) {
            // Removed since the entry was updated: the removal wins, nothing comes back.
            return Err(Error::UnknownImage(id));
        }
        state.catalogue.set(id.0, &entry);
        drop(state);
        drop(held);
        Ok(())
    }
}
