//! The catalogue: which images are stored and their labels, in memory, and kept on disk in
//! `catalogue.bin` so that opening a database does not read every entry.
//!
//! The store stays the source of truth. `catalogue.bin` is written with the index snapshot (at
//! [`Db::flush`](super::Db::flush), at close, and after an open that had to scan) and says up
//! to where it is complete:
//! - `id_bound`: every image with a smaller id that was stored when it was written is in it.
//!   Ids are dense and never reused, so the images stored since are the entries from there
//!   (a range scan).
//! - `changes_seen`: removals and label changes go to the store's change log (`changes`,
//!   in the same transaction) under a sequence number; those up to `changes_seen` are in it.
//!   Opening re-reads the entries of the later ones.
//!
//! Writes commit to the store before they reach the catalogue in memory, so a save must not
//! claim what has not arrived yet: ids and sequence numbers are handed out under one mutex
//! ([`Pending`]), and a save's marks stop below the smallest one still in flight. Replaying a
//! change twice is harmless (it reads the entry as it is now), so stopping short is safe.
//!
//! A file that is missing, damaged, or claims ids the store never gave is not used: the
//! entries are scanned as before format 5, and the file is removed at once, so that a file
//! that only failed to read this time cannot be trusted later with marks the log has passed.
//!
//! Besides its label, each image has one bit saying whether its entry has a source or metadata
//! ([`Catalogue::has_details`]): a query's hits read the store only for those. A file of format
//! 1 (before the bit) is not used: the first open by this version scans the entries, once, and
//! writes format 2.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{sync_dir, EntryRecord, Store};
use crate::ImageId;

const FILE: &str = "catalogue.bin";
const TEMP_FILE: &str = "catalogue.bin.tmp";
const MAGIC: [u8; 8] = *b"LKLCATLG";
const FILE_FORMAT: u16 = 2;
/// The format before the details bit.
const FILE_FORMAT_1: u16 = 1;
/// A label slot meaning "no label" (the label part of a slot is its low 31 bits).
const NONE: u32 = 0x7FFF_FFFF;
/// The bit of a slot saying that the image's entry has a source or metadata.
const DETAILS: u32 = 0x8000_0000;

/// Stored ids and their labels (labels interned: an id costs a map entry, not a string).
#[derive(Debug, Default)]
pub(super) struct Catalogue {
    /// Id -> label slot (or [`NONE`]), with [`DETAILS`] set when the entry has a source or
    /// metadata.
    slots: HashMap<u64, u32, foldhash::fast::RandomState>,
    /// Slot -> label, and label -> slot; a slot outlives its last image until the next load.
    names: Vec<String>,
    slot_of: HashMap<String, u32>,
    /// Label -> its ids, ascending (for filters and browsing).
    by_label: BTreeMap<String, BTreeSet<u64>>,
    /// Changed since it was last written.
    pub dirty: bool,
}

impl Catalogue {
    /// Number of stored images.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.slots.contains_key(&id)
    }

    /// The label of `id`: `None` when `id` is not stored.
    pub fn label(&self, id: u64) -> Option<Option<&str>> {
        self.slots.get(&id).map(|s| self.name(*s))
    }

    /// Whether `id`'s entry may have a source or metadata (true for an id not stored: the
    /// store then answers).
    pub fn has_details(&self, id: u64) -> bool {
        self.slots.get(&id).is_none_or(|s| s & DETAILS != 0)
    }

    /// The label of a slot (its details bit ignored).
    fn name(&self, slot: u32) -> Option<&str> {
        self.names.get((slot & NONE) as usize).map(String::as_str)
    }

    /// Every stored id, in no order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }

    /// The stored ids alone (no labels): what an index build needs to know, cheaper to copy.
    pub fn ids_only(&self) -> Catalogue {
        Catalogue {
            slots: self
                .slots
                .keys()
                .map(|id| (*id, NONE))
                .collect::<HashMap<_, _, _>>(),
            ..Catalogue::default()
        }
    }

    /// Every stored id with its label, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&str>)> + '_ {
        self.slots.iter().map(|(id, s)| (*id, self.name(*s)))
    }

    /// Every label with its ids, ascending.
    pub fn by_label(&self) -> &BTreeMap<String, BTreeSet<u64>> {
        &self.by_label
    }

    /// The ids with label `label`, ascending.
    pub fn with_label(&self, label: &str) -> Option<&BTreeSet<u64>> {
        self.by_label.get(label)
    }

    /// Stores `id` with its entry's label and whether it has a source or metadata (replacing
    /// what it had).
    pub fn set(&mut self, id: u64, entry: &EntryRecord) {
        self.set_parts(id, entry.label.as_deref(), has_details(entry));
    }

    fn set_parts(&mut self, id: u64, label: Option<&str>, details: bool) {
        self.remove(id);
        let slot = match label {
            None => NONE,
            Some(l) => {
                self.by_label.entry(l.to_string()).or_default().insert(id);
                match self.slot_of.get(l) {
                    Some(s) => *s,
                    None => {
                        let s = self.names.len() as u32;
                        self.names.push(l.to_string());
                        self.slot_of.insert(l.to_string(), s);
                        s
                    }
                }
            }
        };
        self.slots
            .insert(id, if details { slot | DETAILS } else { slot });
        self.dirty = true;
    }

    /// Forgets `id`; false if it was not there.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(slot) = self.slots.remove(&id) else {
            return false;
        };
        if let Some(l) = self.names.get((slot & NONE) as usize) {
            if let Some(set) = self.by_label.get_mut(l) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_label.remove(l);
                }
            }
        }
        self.dirty = true;
        true
    }

    /// Brings `id` in line with its stored entry (set, or removed when there is none).
    fn refresh(&mut self, store: &Store, id: ImageId) -> Result<()> {
        match store.entry(id)? {
            Some(e) => self.set(id.0, &e),
            None => {
                self.remove(id.0);
            }
        }
        Ok(())
    }
}

/// How the catalogue was loaded at open.
/// Whether a query's hit needs the entry from the store: it has a source or metadata.
fn has_details(entry: &EntryRecord) -> bool {
    entry.source.is_some() || entry.metadata.is_some()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Loaded {
    /// From `catalogue.bin`, then `caught_up` entries re-read from the store.
    File { caught_up: usize },
    /// By scanning every entry, for this reason.
    Scanned(String),
}

/// The catalogue on disk.
#[derive(Debug, Serialize, Deserialize)]
struct CatalogueFile {
    magic: [u8; 8],
    format: u16,
    /// See the module docs.
    id_bound: u64,
    changes_seen: u64,
    /// Labels; `slots` index into them ([`NONE`]: unlabelled).
    labels: Vec<String>,
    /// Ids ascending, each as the gap from the one before (from 0): small varints.
    gaps: Vec<u64>,
    slots: Vec<u32>,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Loads the catalogue of `dir` and catches it up with the store; scans every entry (and
/// removes the file) when it cannot. Returns it with where it came from and the change-log
/// sequence number it has seen (new changes must be numbered above it).
pub(super) fn load(dir: &Path, store: &Store) -> Result<(Catalogue, Loaded, u64)> {
    let file = path(dir);
    let why = match fs::read(&file) {
        Ok(bytes) => match parse(&bytes, store.id_bound()) {
            Ok((mut catalogue, id_bound, seen)) => {
                let mut caught_up = 0;
                for entry in store.entries_from(ImageId(id_bound)) {
                    let (id, e) = entry?;
                    catalogue.set(id.0, &e);
                    caught_up += 1;
                }
                for id in store.changes_after(seen)? {
                    catalogue.refresh(store, id)?;
                    caught_up += 1;
                }
                catalogue.dirty = caught_up > 0;
                return Ok((catalogue, Loaded::File { caught_up }, seen));
            }
            Err(why) => {
                remove(dir)?;
                format!("{FILE} is not usable ({why})")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("no {FILE}"),
        Err(e) => {
            remove(dir)?;
            format!("{FILE} could not be read ({e})")
        }
    };
    let mut catalogue = Catalogue::default();
    for entry in store.entries() {
        let (id, e) = entry?;
        catalogue.set(id.0, &e);
    }
    catalogue.dirty = true;
    Ok((catalogue, Loaded::Scanned(why), 0))
}

/// Decodes and checks a catalogue file against the store's id bound.
fn parse(bytes: &[u8], store_bound: u64) -> std::result::Result<(Catalogue, u64, u64), String> {
    let Some(body_len) = bytes.len().checked_sub(4) else {
        return Err("shorter than its checksum".into());
    };
    let (body, sum) = bytes.split_at(body_len);
    let mut sum_bytes = [0u8; 4];
    sum_bytes.copy_from_slice(sum);
    if crc32fast::hash(body) != u32::from_le_bytes(sum_bytes) {
        return Err("checksum mismatch".into());
    }
    let file: CatalogueFile = match crate::codec::decode(body) {
        Ok((f, used)) if used == body.len() => f,
        Ok(_) => return Err("trailing bytes".into()),
        Err(e) => return Err(format!("does not decode: {e}")),
    };
    if file.magic == MAGIC && file.format == FILE_FORMAT_1 {
        return Err("format 1, which does not say which entries have a source or metadata".into());
    }
    if file.magic != MAGIC || file.format != FILE_FORMAT {
        return Err("wrong magic number or format".into());
    }
    if file.labels.len() >= NONE as usize {
        return Err(format!("{} labels", file.labels.len()));
    }
    if file.id_bound > store_bound {
        return Err(format!(
            "it covers ids up to {}, the store has only given ids below {store_bound}",
            file.id_bound
        ));
    }
    if file.gaps.len() != file.slots.len() {
        return Err("ids and labels differ in number".into());
    }
    let mut catalogue = Catalogue {
        slots: HashMap::with_capacity_and_hasher(file.gaps.len(), Default::default()),
        slot_of: HashMap::with_capacity(file.labels.len()),
        ..Catalogue::default()
    };
    for (i, l) in file.labels.iter().enumerate() {
        if catalogue.slot_of.insert(l.clone(), i as u32).is_some() {
            return Err(format!("label {l:?} appears twice"));
        }
    }
    catalogue.names = file.labels;
    let mut id = 0u64;
    let mut runs: Vec<Vec<u64>> = vec![Vec::new(); catalogue.names.len()];
    for (gap, slot) in file.gaps.into_iter().zip(file.slots) {
        id = match id.checked_add(gap) {
            Some(next) if gap > 0 && next < file.id_bound => next,
            _ => return Err("ids are not ascending below its bound".into()),
        };
        let label = slot & NONE;
        if label != NONE {
            match runs.get_mut(label as usize) {
                Some(run) => run.push(id),
                None => {
                    return Err(format!(
                        "image {id} has label slot {label} of {}",
                        runs.len()
                    ))
                }
            }
        }
        catalogue.slots.insert(id, slot);
    }
    // Ascending runs: a BTreeSet built from sorted input is built in one pass.
    for (name, run) in catalogue.names.iter().zip(runs) {
        if !run.is_empty() {
            catalogue
                .by_label
                .insert(name.clone(), run.into_iter().collect());
        }
    }
    Ok((catalogue, file.id_bound, file.changes_seen))
}

/// Writes `catalogue` to `dir` atomically (temporary file, fsync, rename) with its marks.
pub(super) fn save(dir: &Path, catalogue: &Catalogue, id_bound: u64, seen: u64) -> Result<()> {
    let mut ids: Vec<(u64, u32)> = catalogue.slots.iter().map(|(i, s)| (*i, *s)).collect();
    ids.sort_unstable();
    // Only the labels still in use, renumbered.
    let mut renumber = vec![NONE; catalogue.names.len()];
    let mut labels = Vec::new();
    for (l, _) in catalogue.by_label.iter() {
        if let Some(s) = catalogue.slot_of.get(l) {
            renumber[*s as usize] = labels.len() as u32;
            labels.push(l.clone());
        }
    }
    let mut last = 0;
    let mut gaps = Vec::with_capacity(ids.len());
    let mut slots = Vec::with_capacity(ids.len());
    for (id, s) in ids {
        gaps.push(id - last);
        last = id;
        let label = match s & NONE {
            NONE => NONE,
            l => renumber[l as usize],
        };
        slots.push(label | (s & DETAILS));
    }
    let file = CatalogueFile {
        magic: MAGIC,
        format: FILE_FORMAT,
        id_bound,
        changes_seen: seen,
        labels,
        gaps,
        slots,
    };
    let mut bytes = bincode::serde::encode_to_vec(&file, bincode::config::standard())
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the catalogue: {e}")))?;
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let tmp = dir.join(TEMP_FILE);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .map_err(|e| Error::io(&tmp, e));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let to = path(dir);
    fs::rename(&tmp, &to).map_err(|e| Error::io(&to, e))?;
    sync_dir(dir)
}

/// Removes the catalogue file (and a save's leftover) from `dir`, if there is one.
pub(super) fn remove(dir: &Path) -> Result<()> {
    for name in [TEMP_FILE, FILE] {
        let p = dir.join(name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    Ok(())
}

/// Ids and change numbers handed out to writes that have not reached the catalogue yet.
#[derive(Debug)]
pub(super) struct Pending {
    inner: Mutex<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    next_seq: u64,
    ids: BTreeSet<u64>,
    seqs: BTreeSet<u64>,
}

impl Pending {
    /// Change numbers continue after `seen` and after every number in the store's log.
    pub fn new(store: &Store, seen: u64) -> Result<Pending> {
        let next_seq = seen.max(store.last_change()?) + 1;
        Ok(Pending {
            inner: Mutex::new(InFlight {
                next_seq,
                ids: BTreeSet::new(),
                seqs: BTreeSet::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // The sets stay consistent whatever panicked while they were held.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write's hold on what it is handed out, released when dropped (after the write
    /// reached the catalogue, or failed).
    pub fn hold(&self) -> Held<'_> {
        Held {
            pending: self,
            ids: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// The marks a catalogue saved now may claim: `(id_bound, changes_seen)`. The caller
    /// holds the writer mutex, so the catalogue in memory stands still meanwhile.
    pub fn marks(&self, store: &Store) -> (u64, u64) {
        let g = self.lock();
        let id_bound = g.ids.first().copied().unwrap_or_else(|| store.id_bound());
        let seen = g.seqs.first().copied().unwrap_or(g.next_seq) - 1;
        (id_bound, seen)
    }
}

/// See [`Pending::hold`].
#[derive(Debug)]
pub(super) struct Held<'a> {
    pending: &'a Pending,
    ids: Vec<u64>,
    seqs: Vec<u64>,
}

impl Held<'_> {
    /// A fresh image id from the store.
    pub fn id(&mut self, store: &Store) -> ImageId {
        let mut g = self.pending.lock();
        let id = store.next_id();
        g.ids.insert(id.0);
        self.ids.push(id.0);
        id
    }

    /// A fresh change-log number.
    pub fn seq(&mut self) -> u64 {
        let mut g = self.pending.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        g.seqs.insert(seq);
        self.seqs.push(seq);
        seq
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut g = self.pending.lock();
        for id in &self.ids {
            g.ids.remove(id);
        }
        for seq in &self.seqs {
            g.seqs.remove(seq);
        }
    }
}

/// The catalogue fuzz target's entry (`src/fuzzing.rs`): `bytes` as a catalogue file.
pub(crate) fn fuzz(bytes: &[u8]) {
    let _ = parse(bytes, u64::MAX);
    // With a valid checksum, so that the decoder and the checks behind it are reached.
    let mut summed = bytes.to_vec();
    summed.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    let _ = parse(&summed, u64::MAX);
}

/// A small catalogue file, for the fuzz target's seed corpus.
#[cfg(test)]
pub(crate) fn seed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &tests::sample(), 10, 4).unwrap();
    fs::read(path(dir.path())).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sample() -> Catalogue {
        let mut c = Catalogue::default();
        c.set_parts(1, Some("bag"), true);
        c.set_parts(2, None, false);
        c.set_parts(5, Some("sandal"), false);
        c.set_parts(9, Some("bag"), true);
        c.set_parts(7, Some("coat"), true);
        c.remove(7);
        c.set_parts(2, Some("bag"), false);
        c.set_parts(3, None, true);
        c
    }

    #[test]
    fn a_saved_catalogue_reads_back_with_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample();
        save(dir.path(), &c, 10, 4).unwrap();
        let bytes = fs::read(path(dir.path())).unwrap();
        let (back, bound, seen) = parse(&bytes, 10).unwrap();
        assert_eq!((bound, seen), (10, 4));
        let mut want: Vec<(u64, Option<&str>)> = c.iter().collect();
        let mut got: Vec<(u64, Option<&str>)> = back.iter().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(back.by_label(), c.by_label());
        // "coat" lost its last image: not written.
        assert_eq!(back.names.len(), 2);
        for id in [1, 2, 3, 5, 9] {
            assert_eq!(back.has_details(id), c.has_details(id), "id {id}");
        }
        assert_eq!(
            (1..=9)
                .filter(|id| back.has_details(*id))
                .collect::<Vec<_>>(),
            // 4, 6, 7 and 8 are not stored: the store answers for them.
            vec![1, 3, 4, 6, 7, 8, 9]
        );
    }

    /// A format-1 file, as main wrote it before the details bit (tests/fixtures/main-v5.db),
    /// is not used (open then scans the entries and writes format 2).
    #[test]
    fn a_format_1_file_is_not_used() {
        let bytes = include_bytes!("../../tests/fixtures/main-v5.db/catalogue.bin");
        assert!(parse(bytes, 13).unwrap_err().contains("format 1"));
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample(), 10, 4).unwrap();
        let bytes = fs::read(path(dir.path())).unwrap();
        // Ids the store never gave.
        assert!(parse(&bytes, 9)
            .unwrap_err()
            .contains("only given ids below 9"));
        // Any flipped byte fails the checksum.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(parse(&bad, 10).is_err(), "byte {i}");
        }
        assert!(parse(&bytes[..3], 10).is_err());
        // Checksummed nonsense: refused by the checks, not a panic.
        for body in [vec![], vec![0xFF; 40], b"LKLCATLG\x01\x00".to_vec()] {
            fuzz(&body);
        }
    }

    #[test]
    fn marks_stop_below_writes_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let pending = Pending::new(&store, 7).unwrap();
        let first = store.id_bound();
        assert_eq!(pending.marks(&store), (first, 7));
        let mut a = pending.hold();
        let id = a.id(&store);
        let seq = a.seq();
        assert_eq!((id.0, seq), (first, 8));
        let mut b = pending.hold();
        b.id(&store);
        b.seq();
        drop(b);
        // `a` is still in flight: nothing from its id or number on may be claimed.
        assert_eq!(pending.marks(&store), (first, 7));
        drop(a);
        assert_eq!(pending.marks(&store), (first + 2, 9));
    }
}
