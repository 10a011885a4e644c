//! Entries: what the database knows about an image besides its bytes (label, size, source,
//! metadata, content hash), and the two trees that index them.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `entries` | id (u64 BE) | [`EntryRecord`] (format 2; format 1 had label and size only) |
//! | `hashes` | BLAKE3 of the bytes (32) ++ id (u64 BE) | empty |
//! | `metadata_index` | [`meta_key`]: key, scalar value (JSON text), id | empty |
//!
//! Store format 3 introduced format-2 entries and both trees. Opening an older store sets the
//! format to 3 and a marker (`meta/upgrading_entries`) first, so that an older build refuses
//! the store from then on, and then rewrites every format-1 entry with the content hash of its
//! bytes (read back from the store) in a transaction with its `hashes` key. The marker goes
//! when every entry is rewritten; an open interrupted on the way finds it and carries on.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{decode, encode, id_from_key, Store, RECORD_V1};
use crate::error::{Error, Result};
use crate::ImageId;

/// The format field of an entry with source, metadata and hash.
pub(crate) const ENTRY_V2: u16 = 2;
/// Longest `source` accepted, in bytes.
pub(crate) const MAX_SOURCE_BYTES: usize = 4096;
/// Longest metadata object accepted, in bytes of compact JSON.
pub(crate) const MAX_METADATA_BYTES: usize = 16 << 10;
/// Metadata keys and values (as JSON text) longer than this are stored but not indexed, so a
/// query cannot filter on them.
const MAX_INDEXED_BYTES: usize = 256;
/// `meta` key present while format-1 entries are being rewritten.
pub(crate) const META_UPGRADING: &[u8] = b"upgrading_entries";

/// What the database knows about an image besides its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EntryRecord {
    pub format: u16,
    pub label: Option<String>,
    /// Upright size of the image.
    pub width: u32,
    pub height: u32,
    /// Where the image came from (a path or URI, as the caller gave it).
    pub source: Option<String>,
    /// A JSON object, compact text.
    pub metadata: Option<String>,
    /// BLAKE3 of the bytes as inserted.
    pub hash: [u8; 32],
}

/// An entry as store formats 1 and 2 wrote it.
#[derive(Debug, Serialize, Deserialize)]
struct EntryRecordV1 {
    format: u16,
    label: Option<String>,
    width: u32,
    height: u32,
}

/// Decodes a format-2 entry; a format-1 entry in a store that finished its upgrade is corrupt.
pub(crate) fn decode_entry(id: impl std::fmt::Display, bytes: &[u8]) -> Result<EntryRecord> {
    match bytes.first() {
        // bincode writes a u16 below 251 as that one byte.
        Some(&f) if f == ENTRY_V2 as u8 => decode("entry", id, bytes),
        Some(&f) if f == RECORD_V1 as u8 => Err(Error::corrupt(
            "entry",
            id,
            "a format-1 entry in an upgraded store (was the upgrade's marker lost?)",
        )),
        _ => Err(Error::corrupt("entry", id, "unknown entry format")),
    }
}

/// The content hash the store records for `bytes`.
pub(crate) fn content_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

fn hash_key(hash: &[u8; 32], id: ImageId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(hash);
    k[32..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// The `metadata_index` key of one metadata field: key length (u16 BE), key, value length
/// (u16 BE), value as compact JSON, id (u64 BE); `None` for a field that is not indexed.
fn meta_key(key: &str, value: &serde_json::Value, id: Option<ImageId>) -> Option<Vec<u8>> {
    let text = indexed_value(value)?;
    if key.len() > MAX_INDEXED_BYTES {
        return None;
    }
    let mut k = Vec::with_capacity(4 + key.len() + text.len() + 8);
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.extend_from_slice(&(text.len() as u16).to_be_bytes());
    k.extend_from_slice(text.as_bytes());
    if let Some(id) = id {
        k.extend_from_slice(&id.0.to_be_bytes());
    }
    Some(k)
}

/// The JSON text under which a metadata value is indexed: strings, numbers and booleans up to
/// [`MAX_INDEXED_BYTES`]; `None` for the rest.
fn indexed_value(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => {
            let text = value.to_string();
            (text.len() <= MAX_INDEXED_BYTES).then_some(text)
        }
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// The `metadata_index` keys of an entry.
fn meta_keys(entry: &EntryRecord, id: ImageId) -> Vec<Vec<u8>> {
    let Some(text) = &entry.metadata else {
        return Vec::new();
    };
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
        Ok(map) => map
            .iter()
            .filter_map(|(k, v)| meta_key(k, v, Some(id)))
            .collect(),
        // Checked when stored; unreadable text indexes nothing rather than failing a removal.
        Err(_) => Vec::new(),
    }
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

/// Writes `entry` with its index keys, replacing `old`'s, inside a transaction.
pub(crate) fn put_entry_tx(
    entries: &TransactionalTree,
    hashes: &TransactionalTree,
    index: &TransactionalTree,
    id: ImageId,
    entry: &EntryRecord,
    old: Option<&EntryRecord>,
) -> TxResult<()> {
    if let Some(old) = old {
        for k in meta_keys(old, id) {
            index.remove(k)?;
        }
        if old.hash != entry.hash {
            hashes.remove(&hash_key(&old.hash, id)[..])?;
        }
    }
    entries.insert(&id.0.to_be_bytes()[..], encode(entry))?;
    hashes.insert(&hash_key(&entry.hash, id)[..], &[][..])?;
    for k in meta_keys(entry, id) {
        index.insert(k, &[][..])?;
    }
    Ok(())
}

/// Removes the entry of `id` and its index keys inside a transaction; false if there was none.
pub(crate) fn remove_entry_tx(
    entries: &TransactionalTree,
    hashes: &TransactionalTree,
    index: &TransactionalTree,
    id: ImageId,
) -> TxResult<bool> {
    let Some(old) = entries.remove(&id.0.to_be_bytes()[..])? else {
        return Ok(false);
    };
    let old = decode_entry(id, &old).map_err(ConflictableTransactionError::Abort)?;
    hashes.remove(&hash_key(&old.hash, id)[..])?;
    for k in meta_keys(&old, id) {
        index.remove(k)?;
    }
    Ok(true)
}

impl Store {
    /// Ids of the stored images whose bytes have this content hash, ascending.
    pub fn find_by_hash(&self, hash: &[u8; 32]) -> Result<Vec<ImageId>> {
        self.hashes
            .scan_prefix(hash)
            .map(|kv| {
                let (k, _) = kv?;
                id_from_key("hash", k.get(32..).unwrap_or_default())
            })
            .collect()
    }

    /// Ids of the stored images whose metadata has `key` equal to `value`, ascending; `None`
    /// when such a field is not indexed (see [`indexed_value`]).
    pub fn find_by_meta(&self, key: &str, value: &serde_json::Value) -> Option<Result<Vec<u64>>> {
        let prefix = meta_key(key, value, None)?;
        let n = prefix.len();
        Some(
            self.metadata_index
                .scan_prefix(&prefix)
                .map(|kv| {
                    let (k, _) = kv?;
                    Ok(id_from_key("metadata index", k.get(n..).unwrap_or_default())?.0)
                })
                .collect(),
        )
    }

    /// Changes the entry of an existing image with `change` (index keys follow), logged as
    /// change `seq`. Returns the new entry, or `None` when there is no such image.
    pub fn update_entry(
        &self,
        id: ImageId,
        change: impl Fn(&mut EntryRecord) -> Result<()>,
        seq: u64,
    ) -> Result<Option<EntryRecord>> {
        use sled::transaction::Transactional;
        (
            &self.entries,
            &self.hashes,
            &self.metadata_index,
            &self.changes,
        )
            .transaction(|(entries, hashes, index, changes)| {
                let Some(old) = entries.get(&id.0.to_be_bytes()[..])? else {
                    return Ok(None);
                };
                let old = decode_entry(id, &old).map_err(ConflictableTransactionError::Abort)?;
                let mut new = old.clone();
                change(&mut new).map_err(ConflictableTransactionError::Abort)?;
                put_entry_tx(entries, hashes, index, id, &new, Some(&old))?;
                changes.insert(&seq.to_be_bytes()[..], &id.0.to_be_bytes()[..])?;
                Ok(Some(new))
            })
            .map_err(super::abort)
    }

    /// Rewrites format-1 entries as format 2 with the content hashes of their bytes (the
    /// upgrade to store format 3; see the module docs). Idempotent.
    pub(super) fn upgrade_entries(&self) -> Result<()> {
        use sled::transaction::Transactional;
        for kv in self.entries.iter() {
            let (k, v) = kv?;
            if v.first() != Some(&(RECORD_V1 as u8)) {
                continue;
            }
            let id = id_from_key("entry", &k)?;
            let old: EntryRecordV1 = decode("entry", id, &v)?;
            super::check_format("entry", id, old.format)?;
            let bytes = self
                .image(id)?
                .ok_or_else(|| Error::corrupt("entry", id, "an entry without image bytes"))?;
            let entry = EntryRecord {
                format: ENTRY_V2,
                label: old.label,
                width: old.width,
                height: old.height,
                source: None,
                metadata: None,
                hash: content_hash(&bytes),
            };
            (&self.entries, &self.hashes, &self.metadata_index)
                .transaction(|(entries, hashes, index)| {
                    put_entry_tx(entries, hashes, index, id, &entry, None)
                })
                .map_err(super::abort)?;
        }
        self.meta.remove(META_UPGRADING)?;
        self.flush()
    }
}

/// A format-1 entry, for the upgrade test and the fuzz seeds.
#[cfg(test)]
pub(crate) fn encode_v1_entry(label: Option<&str>, width: u32, height: u32) -> Vec<u8> {
    encode(&EntryRecordV1 {
        format: RECORD_V1,
        label: label.map(str::to_string),
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(metadata: Option<&str>) -> EntryRecord {
        EntryRecord {
            format: ENTRY_V2,
            label: Some("shoe".into()),
            width: 3,
            height: 4,
            source: Some("photos/a.jpg".into()),
            metadata: metadata.map(str::to_string),
            hash: content_hash(b"abc"),
        }
    }

    #[test]
    fn entries_of_both_formats_decode_as_they_should() {
        let e = entry(Some(r#"{"sku":"A-1"}"#));
        assert_eq!(decode_entry(1, &encode(&e)).unwrap(), e);
        let v1 = encode_v1_entry(Some("shoe"), 3, 4);
        assert!(matches!(decode_entry(1, &v1), Err(Error::Corrupt { .. })));
        let mut truncated = encode(&e);
        truncated.pop();
        assert!(matches!(
            decode_entry(1, &truncated),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(decode_entry(1, &[]), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn an_interrupted_upgrade_carries_on_at_the_next_open() {
        use sled::transaction::Transactional;
        let dir = tempfile::tempdir().unwrap();
        let images: [&[u8]; 3] = [b"one", b"two", b"three"];
        {
            let store = Store::open(dir.path(), true).unwrap();
            // Three images as a format-2 store held them: inline bytes, format-1 entries.
            for (i, bytes) in images.iter().enumerate() {
                let key = (i as u64 + 1).to_be_bytes();
                let record = super::super::ImageRecordRef {
                    format: RECORD_V1,
                    bytes,
                };
                store.images.insert(key, encode(&record)).unwrap();
                store
                    .entries
                    .insert(key, encode_v1_entry(Some("l"), 1, 1))
                    .unwrap();
            }
            // An upgrade that rewrote the first entry and was then killed.
            let first = EntryRecord {
                format: ENTRY_V2,
                label: Some("l".into()),
                width: 1,
                height: 1,
                source: None,
                metadata: None,
                hash: content_hash(images[0]),
            };
            (&store.entries, &store.hashes, &store.metadata_index)
                .transaction(|(e, h, m)| put_entry_tx(e, h, m, ImageId(1), &first, None))
                .unwrap();
            store.meta.insert(META_UPGRADING, &[][..]).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), true).unwrap();
        assert!(!store.meta.contains_key(META_UPGRADING).unwrap());
        for (i, bytes) in images.iter().enumerate() {
            let id = ImageId(i as u64 + 1);
            let e = store.entry(id).unwrap().unwrap();
            assert_eq!(e.hash, content_hash(bytes));
            assert_eq!(e.label.as_deref(), Some("l"));
            assert_eq!(store.find_by_hash(&content_hash(bytes)).unwrap(), vec![id]);
        }
    }

    #[test]
    fn only_short_scalars_are_indexed() {
        use serde_json::json;
        let e = entry(Some(
            &json!({"sku": "A-1", "n": 3, "ok": true, "tags": ["x"], "none": null,
                    "long": "x".repeat(MAX_INDEXED_BYTES)})
            .to_string(),
        ));
        let keys = meta_keys(&e, ImageId(5));
        assert_eq!(keys.len(), 3, "sku, n and ok");
        let k = meta_key("sku", &json!("A-1"), Some(ImageId(5))).unwrap();
        assert!(keys.contains(&k));
        // A key is its parts with their lengths: "ab" = "a" + "b" cannot collide.
        assert_ne!(
            meta_key("ab", &json!(1), None),
            meta_key("a", &json!("b1"), None)
        );
    }
}
