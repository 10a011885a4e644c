//! Image bytes of large images in append-only pack files beside sled (`<db>/images/`).
//!
//! sled copies a large value several times on its way to disk and keeps values over its blob
//! threshold in files it never fsyncs. Photos (megabytes each) go here instead, written once
//! from the caller's buffer; sled keeps a [`PackRef`] (segment, offset, length, CRC-32) in the
//! image's record. Small images stay inline in sled.
//!
//! A segment `NNNNNNNN.pack` is a sequence of records: a 24-byte header (magic `LKIM`, image
//! id u64 LE, length u64 LE, CRC-32 u32 LE of the bytes) and the bytes. Records are appended
//! to the newest segment until it passes [`SEGMENT_BYTES`]. Bytes are written (and synced, for
//! a durable write) before the sled transaction that refers to them, so a crash leaves at
//! worst unreferenced bytes at a segment's end; the next append starts after them. A removed
//! image's bytes stay in its segment (space is not reclaimed yet: see `docs/format.md`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::direct::{self, Direct};
use super::sync_dir;
use crate::error::{Error, Result};
use crate::ImageId;

/// A segment takes records until it holds this many bytes.
const SEGMENT_BYTES: u64 = 1 << 30;
/// Appends not synced by the caller start a background sync after this many bytes, so that a
/// later `sync` (a relaxed database's flush, at the end of a bulk load) finds little left to
/// write (RocksDB's `bytes_per_sync`).
const BACKGROUND_SYNC_BYTES: u64 = 64 << 20;
/// Records of images at least this large are written directly where the file system takes
/// it (see `direct.rs`); smaller ones go through the page cache, unpadded: padding to a 4 KiB
/// block would cost them up to a fifth of their size on disk, for little saved copying.
const DIRECT_BYTES: usize = 256 << 10;
const MAGIC: &[u8; 4] = b"LKIM";
const HEADER: u64 = 24;

/// Where an image's bytes are: segment number, offset of the bytes (after the header),
/// length and CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PackRef {
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// The newest segment, open for appending.
#[derive(Debug)]
struct Writer {
    segment: u32,
    file: File,
    len: u64,
    /// Written since the last sync.
    dirty: bool,
    /// Bytes appended through the page cache since the last background sync started.
    unsynced: u64,
    /// The direct-write handle, where the file system takes direct writes.
    direct: Option<Direct>,
    /// Whether a run of direct writes is open (records staged since its start).
    running: bool,
}

/// The pack files of one database.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    writer: Mutex<Option<Writer>>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// The background sync in progress, if any (one at a time).
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::io(path, e)
}

fn poisoned() -> Error {
    Error::Poisoned("a thread panicked while writing image bytes".into())
}

fn segment_name(segment: u32) -> String {
    format!("{segment:08}.pack")
}

impl Packs {
    /// The packs in `dir` (created on the first append).
    pub fn open(dir: &Path) -> Packs {
        Packs {
            dir: dir.to_path_buf(),
            writer: Mutex::new(None),
            readers: Mutex::new(HashMap::new()),
            background: Mutex::new(None),
        }
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(segment_name(segment))
    }

    /// The newest segment number on disk, 0 when there is none.
    fn newest(&self) -> Result<u32> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&self.dir, e)),
        };
        let mut newest = 0;
        for entry in rd {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name();
            let n = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(n) = n {
                newest = newest.max(n);
            }
        }
        Ok(newest)
    }

    /// Opens segment `segment` for appending at its end, creating it (and the folder) if
    /// needed; a new file's directory entry is synced.
    fn open_writer(&self, segment: u32) -> Result<Writer> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let path = self.path(segment);
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let len = file.metadata().map_err(|e| io(&path, e))?.len();
        if !existed {
            sync_dir(&self.dir)?;
            // The folder may be new too: its entry in the database directory.
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let direct = Direct::open(&path, &file);
        Ok(Writer {
            segment,
            file,
            len,
            dirty: false,
            unsynced: 0,
            direct,
            running: false,
        })
    }

    /// Appends the bytes of `images` and returns where each went; with `sync` they are on
    /// disk (fdatasync) when this returns. Directly written records start at block
    /// boundaries (see `direct.rs`); otherwise each follows the last.
    pub fn append(&self, images: &[(ImageId, &[u8])], sync: bool) -> Result<Vec<PackRef>> {
        let mut guard = self.writer.lock().map_err(|_| poisoned())?;
        if guard.is_none() {
            let newest = self.newest()?.max(1);
            *guard = Some(self.open_writer(newest)?);
        }
        let w = guard.as_mut().ok_or_else(poisoned)?;
        let written = match self.write_records(w, images) {
            // A file system that reported direct-I/O alignment and then refused a direct
            // write: through the page cache from now on, after what is in the file (the
            // records this batch wrote directly stay unreferenced).
            Err(Error::Io { source, .. })
                if w.direct.is_some() && source.kind() == std::io::ErrorKind::InvalidInput =>
            {
                w.direct = None;
                w.reset_to_file();
                self.write_records(w, images)
            }
            other => other,
        };
        let refs = match written {
            Ok(refs) => refs,
            Err(e) => {
                // What the failed batch staged is dropped, and the next batch starts after
                // what reached the file (a partly written record included).
                w.reset_to_file();
                return Err(e);
            }
        };
        let path = self.path(w.segment);
        if sync {
            sync_writer(&path, w)?;
            w.unsynced = 0;
        } else if w.unsynced >= BACKGROUND_SYNC_BYTES {
            self.sync_in_background(w);
        }
        Ok(refs)
    }

    /// Writes the records of `images` after `w`'s end, moving to a new segment when one is
    /// full; the staged direct writes are all written when this returns.
    fn write_records(&self, w: &mut Writer, images: &[(ImageId, &[u8])]) -> Result<Vec<PackRef>> {
        let mut refs = Vec::with_capacity(images.len());
        for (id, bytes) in images {
            let size = HEADER + bytes.len() as u64;
            if w.len > 0 && w.len + size > SEGMENT_BYTES {
                let path = self.path(w.segment);
                w.finish_run().map_err(|e| io(&path, e))?;
                if w.dirty {
                    w.file.sync_data().map_err(|e| io(&path, e))?;
                }
                *w = self.open_writer(w.segment + 1)?;
            }
            let crc = crc32fast::hash(bytes);
            let mut header = [0u8; HEADER as usize];
            header[..4].copy_from_slice(MAGIC);
            header[4..12].copy_from_slice(&id.0.to_le_bytes());
            header[12..20].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            header[20..24].copy_from_slice(&crc.to_le_bytes());
            let path = self.path(w.segment);
            w.dirty = true;
            let at = w.write_record(&header, bytes).map_err(|e| io(&path, e))?;
            refs.push(PackRef {
                segment: w.segment,
                offset: at + HEADER,
                len: bytes.len() as u64,
                crc,
            });
        }
        let path = self.path(w.segment);
        w.finish_run().map_err(|e| io(&path, e))?;
        Ok(refs)
    }

    /// Starts writing `w`'s segment back on another thread, unless a background sync is
    /// still running. Its outcome does not matter: `sync` syncs again and reports errors.
    fn sync_in_background(&self, w: &mut Writer) {
        let Ok(mut running) = self.background.lock() else {
            return;
        };
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Ok(file) = w.file.try_clone() {
            w.unsynced = 0;
            *running = Some(std::thread::spawn(move || {
                let _ = file.sync_data();
            }));
        }
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> Result<()> {
        let background = self.background.lock().ok().and_then(|mut b| b.take());
        if let Some(h) = background {
            let _ = h.join();
        }
        let mut guard = self.writer.lock().map_err(|_| poisoned())?;
        match guard.as_mut() {
            Some(w) => sync_writer(&self.path(w.segment), w),
            None => Ok(()),
        }
    }

    /// The bytes `r` points to, checked against its length and CRC; `id` names errors.
    pub fn read(&self, id: ImageId, r: &PackRef) -> Result<Vec<u8>> {
        let path = self.path(r.segment);
        let corrupt = |why: String| Error::corrupt("image", id, why);
        let file = {
            let mut readers = self.readers.lock().map_err(|_| poisoned())?;
            match readers.get(&r.segment) {
                Some(f) => f.clone(),
                None => {
                    let f = File::open(&path).map_err(|e| {
                        corrupt(format!(
                            "its pack file {} cannot be opened: {e}",
                            path.display()
                        ))
                    })?;
                    let f = Arc::new(f);
                    readers.insert(r.segment, f.clone());
                    f
                }
            }
        };
        // The length comes from the store: check it against the file before allocating.
        let file_len = file.metadata().map_err(|e| io(&path, e))?.len();
        let end = r.offset.checked_add(r.len);
        if end.is_none_or(|end| end > file_len) {
            return Err(corrupt(format!(
                "{} bytes at offset {} are past the end of {} ({file_len} bytes)",
                r.len,
                r.offset,
                path.display()
            )));
        }
        let len = usize::try_from(r.len).map_err(|_| corrupt("length overflows".into()))?;
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, r.offset)
            .map_err(|e| io(&path, e))?;
        if crc32fast::hash(&bytes) != r.crc {
            return Err(corrupt(format!(
                "its bytes in {} do not match their checksum",
                path.display()
            )));
        }
        Ok(bytes)
    }
}

impl Writer {
    /// Writes one record (its header, then its bytes) and returns where it starts. A large
    /// record goes directly when the file system takes it, in the open run of direct writes
    /// or in a new one from the next block boundary (a gap after a record written through
    /// the page cache, or torn by a crash, is left as a hole); any other goes through the page
    /// cache, after what the open run staged.
    fn write_record(&mut self, header: &[u8], bytes: &[u8]) -> std::io::Result<u64> {
        let direct = self.direct.as_mut().filter(|_| bytes.len() >= DIRECT_BYTES);
        if let Some(d) = direct {
            if !self.running {
                self.len = direct::align_up(self.len);
                d.start(self.len);
                self.running = true;
            }
            let at = self.len;
            d.push(header)?;
            d.push(bytes)?;
            self.len = d.pad();
            return Ok(at);
        }
        self.finish_run()?;
        let at = self.len;
        self.file.write_all(header)?;
        self.file.write_all(bytes)?;
        let size = (header.len() + bytes.len()) as u64;
        self.len += size;
        self.unsynced += size;
        Ok(at)
    }

    /// Drops an open run (what it staged is not written) and takes the end of the file as the
    /// place of the next record.
    fn reset_to_file(&mut self) {
        self.running = false;
        if let Ok(m) = self.file.metadata() {
            self.len = m.len();
        }
    }

    /// Writes what the open run of direct writes staged, and closes it.
    fn finish_run(&mut self) -> std::io::Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        match self.direct.as_mut() {
            Some(d) => d.finish(),
            None => Ok(()),
        }
    }
}

fn sync_writer(path: &Path, w: &mut Writer) -> Result<()> {
    if w.dirty {
        w.file.sync_data().map_err(|e| io(path, e))?;
        w.dirty = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `packs`' writer writes directly.
    fn direct(packs: &Packs) -> bool {
        let guard = packs.writer.lock().unwrap();
        guard.as_ref().unwrap().direct.is_some()
    }

    /// Runs `f` on `packs`' direct-write handle, if its writer has one.
    fn with_direct(packs: &Packs, f: impl FnOnce(&mut Direct)) {
        if let Some(d) = packs
            .writer
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .direct
            .as_mut()
        {
            f(d);
        }
    }

    #[test]
    fn appends_read_back_and_damage_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("images"));
        let a = vec![1u8; 1000];
        let b: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let refs = packs
            .append(&[(ImageId(1), &a), (ImageId(2), &b)], true)
            .unwrap();
        assert_eq!(packs.read(ImageId(1), &refs[0]).unwrap(), a);
        assert_eq!(packs.read(ImageId(2), &refs[1]).unwrap(), b);
        // A reopened pack appends after what is there (a torn tail included); a large record
        // written directly starts at the next block boundary.
        let path = dir.path().join("images").join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"torn").unwrap();
        drop(f);
        let packs = Packs::open(&dir.path().join("images"));
        let large = vec![7u8; DIRECT_BYTES];
        let c = packs
            .append(&[(ImageId(3), &a), (ImageId(4), &large)], false)
            .unwrap();
        let torn_end = refs[1].offset + 5000 + 4;
        assert_eq!(c[0].offset, torn_end + HEADER);
        let after = torn_end + HEADER + 1000;
        let start = if direct(&packs) {
            direct::align_up(after)
        } else {
            after
        };
        assert_eq!(c[1].offset, start + HEADER);
        assert_eq!(packs.read(ImageId(3), &c[0]).unwrap(), a);
        assert_eq!(packs.read(ImageId(4), &c[1]).unwrap(), large);
        // A wrong checksum, a length past the end, a missing segment.
        let bad = PackRef { crc: 0, ..refs[0] };
        assert!(matches!(
            packs.read(ImageId(1), &bad),
            Err(Error::Corrupt { .. })
        ));
        let long = PackRef {
            len: u64::MAX,
            ..refs[0]
        };
        assert!(matches!(
            packs.read(ImageId(1), &long),
            Err(Error::Corrupt { .. })
        ));
        let gone = PackRef {
            segment: 9,
            ..refs[0]
        };
        assert!(matches!(
            packs.read(ImageId(1), &gone),
            Err(Error::Corrupt { .. })
        ));
    }

    /// A direct write refused with `EINVAL` (a file system that reported direct-I/O alignment
    /// and does not honour it) sends this and later appends through the page cache.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("images"));
        let a: Vec<u8> = (0..DIRECT_BYTES as u32).map(|i| (i * 3) as u8).collect();
        let first = packs.append(&[(ImageId(1), &a)], true).unwrap();
        if !direct(&packs) {
            eprintln!("skipped: this file system takes no direct writes");
            return;
        }
        with_direct(&packs, Direct::misalign);
        let refs = packs
            .append(&[(ImageId(2), &a), (ImageId(3), &a)], true)
            .unwrap();
        assert!(!direct(&packs));
        for (id, r) in [(1, &first[0]), (2, &refs[0]), (3, &refs[1])] {
            assert_eq!(packs.read(ImageId(id), r).unwrap(), a);
        }
        assert_eq!(
            refs[1].offset,
            refs[0].offset + DIRECT_BYTES as u64 + HEADER
        );
    }

    /// A batch that fails after some of its records reached the file (a failed direct write
    /// after a small record written through the page cache) leaves the next batch's records
    /// where their references say.
    #[test]
    fn a_failed_batch_leaves_the_next_records_where_their_references_say() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("images"));
        let small = vec![3u8; 20_000];
        let large = vec![4u8; DIRECT_BYTES + 5];
        packs.append(&[(ImageId(1), &small)], false).unwrap();
        if !direct(&packs) {
            eprintln!("skipped: this file system takes no direct writes");
            return;
        }
        let path = dir.path().join("images").join(segment_name(1));
        with_direct(&packs, |d| d.break_writes(&path));
        let e = packs
            .append(&[(ImageId(2), &small), (ImageId(3), &large)], false)
            .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        // Small records go through the page cache, after what reached the file.
        let refs = packs
            .append(&[(ImageId(4), &small), (ImageId(5), &small)], true)
            .unwrap();
        for (id, r) in [(4, &refs[0]), (5, &refs[1])] {
            assert_eq!(packs.read(ImageId(id), r).unwrap(), small);
        }
    }

    /// Records larger than the staging buffer, records that end on a block boundary, small
    /// ones between large ones, written directly and through the page cache into the same
    /// segment, in turns: all read back, and the large ones written directly start on block
    /// boundaries.
    #[test]
    fn direct_and_cached_appends_mix_in_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(&dir.path().join("images"));
        packs.append(&[], false).unwrap();
        let can_direct = direct(&packs);
        eprintln!("direct writes on this file system: {can_direct}");
        let sizes = [
            17_000,                                        // through the page cache
            DIRECT_BYTES,                                  // the smallest direct record
            70 * direct::ALIGN as usize - HEADER as usize, // header + bytes: 70 whole blocks
            (9 << 20) + 123,                               // more than the staging buffer
            1,
            40_000,
            DIRECT_BYTES + 1,
        ];
        let images: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 7 + k) as u8).collect())
            .collect();
        let mut written = Vec::new();
        for round in 0..4 {
            // Rounds 1 and 3 through the page cache.
            let cached = round % 2 == 1;
            if cached {
                packs.writer.lock().unwrap().as_mut().unwrap().direct = None;
            }
            let batch: Vec<(ImageId, &[u8])> = images
                .iter()
                .enumerate()
                .map(|(k, b)| (ImageId((round * 10 + k) as u64), b.as_slice()))
                .collect();
            let refs = packs.append(&batch, round == 3).unwrap();
            for (r, (id, b)) in refs.iter().zip(&batch) {
                if can_direct && !cached && b.len() >= DIRECT_BYTES {
                    assert_eq!((r.offset - HEADER) % direct::ALIGN, 0, "{r:?}");
                }
                written.push((*id, r.to_owned(), b.to_vec()));
            }
            if cached {
                // The next round reopens the segment, directly where it can.
                *packs.writer.lock().unwrap() = None;
            }
        }
        packs.sync().unwrap();
        let reopened = Packs::open(&dir.path().join("images"));
        for (id, r, b) in &written {
            assert_eq!(&packs.read(*id, r).unwrap(), b, "{id:?}");
            assert_eq!(&reopened.read(*id, r).unwrap(), b, "{id:?}");
        }
    }
}
