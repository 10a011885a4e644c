//! The index snapshot: FAISS's own serialisation of the index, kept in two files, and
//! `index.stamp` (what they hold).
//!
//! The vectors, most of a snapshot (at a million 256-dimension vectors, 1 GB of 1.3 GB), only
//! grow between rebuilds: an insert appends, a removal leaves its vector until the clean-up
//! rebuild. So they are kept apart, in `index.vectors`, and a save appends only the vectors
//! added since the last one (checked: the CRC-32 of the index's first vectors in memory must
//! equal the stamp's for the file). `index.faiss` holds the rest of the stream (headers, the
//! HNSW graph, the ids), rewritten each time. Reading stitches the two back into FAISS's stream
//! (`stitched.rs`). Stamp format 1 (before this) kept the whole stream in `index.faiss`, with
//! no `index.vectors`; such a snapshot is still read, and the next save writes format 2.
//!
//! The stamp names the model version, shape, dimension and metric, and carries the length and
//! CRC-32 of the whole stream (and where the vectors go in it, how many bytes of
//! `index.vectors` are theirs, and that part's own CRC-32). A snapshot whose stamp is missing,
//! undecodable, for another model, or whose files do not match the checksum is not used: the
//! index is rebuilt from the embeddings tree. A valid one may still lag the store (written at
//! the last flush or close); the database then catches it up from the store's ids (see
//! `Db::open`).

use std::fs;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use faiss::index::{id_map::IdMap, IndexImpl};
use faiss::Index;
use lookalike_plugin::Metric;
use serde::{Deserialize, Serialize};

use super::stitched::Stitched;
use super::{faiss_file, ffi, Shape, VectorIndex};
use crate::error::{Error, Result};
use crate::store::sync_dir;

const MAGIC: [u8; 8] = *b"LKLINDEX";
/// 1: the whole stream in `index.faiss`; 2: the vectors apart in `index.vectors`.
const STAMP_FORMAT: u16 = 2;
const INDEX_FILE: &str = "index.faiss";
const VECTORS_FILE: &str = "index.vectors";
const STAMP_FILE: &str = "index.stamp";

#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    magic: [u8; 8],
    format: u16,
    model: u32,
    shape: Shape,
    dim: u32,
    metric: String,
    /// The whole stream's length and CRC-32.
    file_len: u64,
    crc32: u32,
}

/// Where the vectors are (stamp format 2, encoded after [`Stamp`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Split {
    /// Offset of the vectors in the stream (and of the cut in `index.faiss`).
    at: u64,
    /// The first `len` bytes of `index.vectors` are the vectors; their CRC-32.
    len: u64,
    crc32: u32,
}

/// Why a snapshot was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unusable {
    Missing,
    Corrupt(String),
    OtherModel,
}

/// The temporary files of [`save`]: never valid outside a running save.
const TEMP_FILES: [&str; 3] = ["index.faiss.tmp", "index.vectors.tmp", "index.stamp.tmp"];

/// Removes temporary files a save left behind (a crash, or a failure part way).
pub(crate) fn remove_temporary(dir: &Path) {
    for name in TEMP_FILES {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// Writes a snapshot of `index` for `model` into `dir`, atomically (temp files, fsync, rename;
/// appended vectors are past what the current stamp claims). A failure removes the temporary
/// files.
pub(crate) fn save(dir: &Path, index: &VectorIndex, model: u32) -> Result<()> {
    let result = save_inner(dir, index, model);
    if result.is_err() {
        remove_temporary(dir);
    }
    result
}

/// The current stamp's split, when its vectors file may be appended to: a format-2 stamp of
/// the same dimension whose vectors file is at least as long as it says.
fn current_split(dir: &Path, dim: usize) -> Option<Split> {
    let bytes = fs::read(dir.join(STAMP_FILE)).ok()?;
    let (stamp, split) = decode_stamp(&bytes).ok()?;
    let split = split?;
    let on_disk = fs::metadata(dir.join(VECTORS_FILE)).ok()?.len();
    (stamp.dim as usize == dim && on_disk >= split.len).then_some(split)
}

/// The save's handling of FAISS's stream: everything but the vectors to `graph`, the vectors
/// appended to (or written fresh into) the vectors file, the whole stream hashed.
struct Writer {
    graph: BufWriter<fs::File>,
    graph_path: PathBuf,
    dir: PathBuf,
    /// The vectors' length in bytes (count x dim x 4).
    vectors_len: usize,
    /// What the current stamp says of `index.vectors`.
    reuse: Option<Split>,
    hasher: crc32fast::Hasher,
    written: u64,
    split: Option<Split>,
    /// The vectors file to rename into place (a fresh one), if any.
    fresh: Option<PathBuf>,
    error: Option<Error>,
}

impl Writer {
    fn take(&mut self, bytes: &[u8], item: usize) -> Result<()> {
        if self.split.is_none() && item == 1 && bytes.len() == self.vectors_len {
            return self.vectors(bytes);
        }
        self.graph
            .write_all(bytes)
            .map_err(|e| Error::io(&self.graph_path, e))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// FAISS writes the vectors in one call of 1-byte items (`WRITEXBVECTOR` of the flat
    /// storage's codes), the only byte vector this long.
    fn vectors(&mut self, bytes: &[u8]) -> Result<()> {
        let mut kept = crc32fast::Hasher::new();
        let reuse = self.reuse.filter(|r| {
            let Ok(n) = usize::try_from(r.len) else {
                return false;
            };
            n <= bytes.len() && {
                kept.update(&bytes[..n]);
                kept.clone().finalize() == r.crc32
            }
        });
        let (path, from) = match reuse {
            Some(r) => (self.dir.join(VECTORS_FILE), r.len as usize),
            None => {
                kept = crc32fast::Hasher::new();
                let tmp = self.dir.join("index.vectors.tmp");
                self.fresh = Some(tmp.clone());
                (tmp, 0)
            }
        };
        let mut file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(from == 0)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // Past what the stamp claims: a tail left by a save that did not finish goes.
        file.set_len(from as u64)
            .and_then(|_| file.seek(SeekFrom::Start(from as u64)))
            .and_then(|_| file.write_all(&bytes[from..]))
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        let mut added = crc32fast::Hasher::new();
        added.update(&bytes[from..]);
        kept.combine(&added);
        let vectors_crc = kept.clone().finalize();
        self.hasher.combine(&kept);
        self.split = Some(Split {
            at: self.written,
            len: bytes.len() as u64,
            crc32: vectors_crc,
        });
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn save_inner(dir: &Path, index: &VectorIndex, model: u32) -> Result<()> {
    let graph_path = dir.join("index.faiss.tmp");
    let graph = fs::File::create(&graph_path).map_err(|e| Error::io(&graph_path, e))?;
    let mut w = Writer {
        graph: BufWriter::with_capacity(1 << 20, graph),
        graph_path: graph_path.clone(),
        dir: dir.to_path_buf(),
        vectors_len: index.inner.ntotal() as usize * index.dim * 4,
        reuse: current_split(dir, index.dim),
        hasher: crc32fast::Hasher::new(),
        written: 0,
        split: None,
        fresh: None,
        error: None,
    };
    let wrote = ffi::write_index_to(&index.inner, &mut |bytes, item| match w.take(bytes, item) {
        Ok(()) => true,
        Err(e) => {
            w.error = Some(e);
            false
        }
    });
    if let Some(e) = w.error.take() {
        return Err(e);
    }
    wrote?;
    let Some(split) = w.split else {
        return Err(Error::Index(
            "FAISS wrote no vectors where the snapshot expected them".into(),
        ));
    };
    let file = w
        .graph
        .into_inner()
        .map_err(|e| Error::io(&graph_path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&graph_path, e))?;
    let stamp = Stamp {
        magic: MAGIC,
        format: STAMP_FORMAT,
        model,
        shape: index.shape,
        dim: index.dim as u32,
        metric: index.metric.as_str().to_string(),
        file_len: w.written,
        crc32: w.hasher.finalize(),
    };
    let mut stamp_bytes = bincode::serde::encode_to_vec(&stamp, bincode::config::standard())
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the index stamp: {e}")))?;
    stamp_bytes.extend(
        bincode::serde::encode_to_vec(split, bincode::config::standard())
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the index stamp: {e}")))?,
    );
    let stamp_tmp = dir.join("index.stamp.tmp");
    let mut f = fs::File::create(&stamp_tmp).map_err(|e| Error::io(&stamp_tmp, e))?;
    f.write_all(&stamp_bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&stamp_tmp, e))?;
    // The stamp goes last: a crash in between leaves a stamp whose checksums fail.
    let (index_path, stamp_path) = paths(dir);
    if let Some(fresh) = &w.fresh {
        let to = dir.join(VECTORS_FILE);
        fs::rename(fresh, &to).map_err(|e| Error::io(&to, e))?;
    }
    fs::rename(&graph_path, &index_path).map_err(|e| Error::io(&index_path, e))?;
    fs::rename(&stamp_tmp, &stamp_path).map_err(|e| Error::io(&stamp_path, e))?;
    sync_dir(dir)
}

/// Decodes a stamp file: the stamp, and for format 2 where its vectors are.
fn decode_stamp(bytes: &[u8]) -> std::result::Result<(Stamp, Option<Split>), String> {
    let (stamp, used): (Stamp, usize) =
        crate::codec::decode(bytes).map_err(|e| format!("stamp does not decode: {e}"))?;
    if stamp.magic != MAGIC {
        return Err("stamp has a wrong magic number".into());
    }
    let rest = &bytes[used..];
    match stamp.format {
        1 if rest.is_empty() => Ok((stamp, None)),
        2 => match crate::codec::decode::<Split>(rest) {
            Ok((split, n)) if n == rest.len() => Ok((stamp, Some(split))),
            _ => Err("stamp's vector split does not decode".into()),
        },
        _ => Err("stamp has a wrong format or trailing bytes".into()),
    }
}

/// Removes the snapshot in `dir`, if any: the stamp first, so that what a crash leaves is
/// read as no snapshot.
pub(crate) fn remove(dir: &Path) -> Result<()> {
    let (index_path, stamp_path) = paths(dir);
    for path in [stamp_path, index_path, dir.join(VECTORS_FILE)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    sync_dir(dir)
}

/// The paths of the index file and the stamp in `dir`.
pub(crate) fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(INDEX_FILE), dir.join(STAMP_FILE))
}

/// The snapshot's stream, stitched from its files as the stamp says.
fn open_stream(dir: &Path, split: Option<Split>) -> std::io::Result<Stitched<fs::File>> {
    let split = split.unwrap_or_default();
    Stitched::open(
        &dir.join(INDEX_FILE),
        &dir.join(VECTORS_FILE),
        split.at,
        split.len,
    )
}

/// A snapshot that FAISS is reading on a thread of its own: started by [`start`] as soon as
/// the database is locked, before the store is open, and finished by [`finish`].
pub(crate) struct Reading {
    stamp: Stamp,
    dir: PathBuf,
    faiss: std::thread::JoinHandle<Result<IdMap<IndexImpl>>>,
    /// The whole stream's walk and checksum ([`faiss_file::check`], with any id allowed: the
    /// store's next id is not known yet), on a thread of its own beside the store's open.
    check: std::thread::JoinHandle<Checked>,
}

type Checked = std::io::Result<std::result::Result<faiss_file::Summary, String>>;

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reading").field("dir", &self.dir).finish()
    }
}

/// How a snapshot file that could not be opened or read counts: missing, damaged, or an error
/// of the disk.
fn unusable_or_io(dir: &Path, e: std::io::Error) -> Result<std::result::Result<Reading, Unusable>> {
    match e.kind() {
        std::io::ErrorKind::NotFound => Ok(Err(Unusable::Missing)),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            Ok(Err(Unusable::Corrupt(format!("index files: {e}"))))
        }
        _ => Err(Error::io(dir.join(INDEX_FILE), e)),
    }
}

/// Starts reading the snapshot in `dir`: its stamp, then the sizes in its stream
/// ([`faiss_file::check_sizes`], against the stamp's dimension and metric), then, each on a
/// thread of its own, FAISS's read of it and the whole stream's walk and checksum
/// ([`faiss_file::check`]), while the caller opens the store. FAISS thus never sees sizes
/// that disagree with the files (it allocates no more than they hold); [`finish`] uses the
/// index only if the walk passed too.
pub(crate) fn start(dir: &Path) -> Result<std::result::Result<Reading, Unusable>> {
    let stamp_path = dir.join(STAMP_FILE);
    let stamp_bytes = match fs::read(&stamp_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Unusable::Missing)),
        Err(e) => return Err(Error::io(stamp_path, e)),
    };
    let corrupt = |why: String| Ok(Err(Unusable::Corrupt(why)));
    let (stamp, split) = match decode_stamp(&stamp_bytes) {
        Ok(s) => s,
        Err(why) => return corrupt(why),
    };
    let Some(metric) = [Metric::Cosine, Metric::L2]
        .into_iter()
        .find(|m| m.as_str() == stamp.metric)
    else {
        return corrupt(format!("stamp names an unknown metric {:?}", stamp.metric));
    };
    let stream = match open_stream(dir, split) {
        Ok(s) => s,
        Err(e) => return unusable_or_io(dir, e),
    };
    let len = stream.len();
    // Ids are checked against the store by `finish`, once it is open.
    match faiss_file::check_sizes(stream, len, stamp.dim as usize, metric, u64::MAX) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return corrupt(format!("index file rejected: {why}")),
        Err(e) => return unusable_or_io(dir, e),
    }
    let owned = dir.to_path_buf();
    let shape = stamp.shape;
    let faiss = std::thread::Builder::new()
        .name("lookalike-snapshot".into())
        .spawn(move || -> Result<IdMap<IndexImpl>> {
            let stream = open_stream(&owned, split).map_err(|e| Error::io(&owned, e))?;
            // HNSW's vectors are mapped rather than copied (most of a large snapshot; see
            // `mapped.cpp`). Exact indexes are read into memory: their adds could not grow a
            // mapped array ahead of time, as HNSW's growth does (`db/insert.rs`).
            let index = if split.is_some() && matches!(shape, Shape::Hnsw { .. }) {
                stream.read_mapped()?
            } else {
                let mut r = BufReader::with_capacity(1 << 20, stream);
                ffi::read_index_from(&mut |buf| r.read_exact(buf).is_ok())?
            };
            Ok(index.into_id_map()?)
        })
        .map_err(|e| Error::io(dir, e))?;
    let owned = dir.to_path_buf();
    let dim = stamp.dim as usize;
    let check = std::thread::Builder::new()
        .name("lookalike-snapshot-check".into())
        .spawn(move || -> Checked {
            let stream = open_stream(&owned, split)?;
            let len = stream.len();
            faiss_file::check(stream, len, dim, metric, u64::MAX)
        });
    let check = match check {
        Ok(c) => c,
        Err(e) => {
            let _ = faiss.join();
            return Err(Error::io(dir, e));
        }
    };
    Ok(Ok(Reading {
        stamp,
        dir: dir.to_path_buf(),
        faiss,
        check,
    }))
}

/// Drops a [`start`]ed read that is of no use (the model's vectors are being made again),
/// after FAISS's read ends, so that its memory is given back before the rebuild.
pub(crate) fn abandon(reading: std::result::Result<Reading, Unusable>) {
    if let Ok(r) = reading {
        let _ = r.faiss.join();
        let _ = r.check.join();
    }
}

/// Finishes [`start`]: the snapshot, if it is intact and belongs to `model` with this
/// dimension and metric, and every id in it is below `id_bound` (the store's next id); says
/// why not otherwise (the walk [`start`] began found the largest id).
pub(crate) fn finish(
    reading: std::result::Result<Reading, Unusable>,
    model: u32,
    dim: usize,
    metric: Metric,
    id_bound: u64,
) -> Result<std::result::Result<VectorIndex, Unusable>> {
    let r = match reading {
        Ok(r) => r,
        Err(why) => return Ok(Err(why)),
    };
    let corrupt = |why: String| Ok(Err(Unusable::Corrupt(why)));
    let stamp = &r.stamp;
    if stamp.model != model || stamp.dim as usize != dim || stamp.metric != metric.as_str() {
        abandon(Ok(r));
        return Ok(Err(Unusable::OtherModel));
    }
    let checked = r
        .check
        .join()
        .unwrap_or_else(|_| Ok(Err("the check of the index file panicked".into())));
    let read = r.faiss.join();
    let summary = match checked {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return corrupt(format!("index file rejected: {why}")),
        Err(e) => {
            return unusable_or_io(&r.dir, e).map(|u| match u {
                Ok(_) => Err(Unusable::Missing),
                Err(why) => Err(why),
            })
        }
    };
    if summary.len != stamp.file_len || summary.crc32 != stamp.crc32 {
        return corrupt("index file does not match the stamp's checksum".into());
    }
    if summary.max_id >= id_bound {
        return corrupt(format!(
            "index file rejected: an id is not below the store's next id {id_bound}"
        ));
    }
    if summary.hnsw != matches!(stamp.shape, Shape::Hnsw { .. }) {
        return corrupt("index kind differs from the stamp".into());
    }
    let inner = match read {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return corrupt(format!("FAISS could not read it: {e}")),
        Err(_) => return corrupt("FAISS's reader panicked".into()),
    };
    let index = VectorIndex::from_parts(inner, stamp.shape, metric, dim)?;
    if index.ids().len() as u64 != summary.count {
        return corrupt("an id appears twice".into());
    }
    Ok(Ok(index))
}

/// The snapshot fuzz target's entry (`src/fuzzing.rs`): `bytes` as a stamp, and as an index
/// stream of 8-dimensional vectors that FAISS reads whenever the size checks accept it (as on
/// open).
pub(crate) fn fuzz(bytes: &[u8]) {
    let _ = decode_stamp(bytes);
    for metric in [Metric::Cosine, Metric::L2] {
        let len = bytes.len() as u64;
        let _ = faiss_file::check(std::io::Cursor::new(bytes), len, 8, metric, 1 << 20);
        if let Ok(Ok(())) =
            faiss_file::check_sizes(std::io::Cursor::new(bytes), len, 8, metric, 1 << 20)
        {
            let mut r = std::io::Cursor::new(bytes);
            let _ = ffi::read_index_from(&mut |buf| r.read_exact(buf).is_ok())
                .and_then(|i| Ok(i.into_id_map()?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageId;
    use std::os::unix::fs::MetadataExt;

    fn index(shape: Shape, from: u64, to: u64, into: Option<VectorIndex>) -> VectorIndex {
        let mut index = into.unwrap_or_else(|| VectorIndex::new(shape, Metric::L2, 8, 16).unwrap());
        let ids: Vec<ImageId> = (from..to).map(ImageId).collect();
        let vectors: Vec<f32> = (from * 8..to * 8)
            .map(|i| ((i * 7919) % 101) as f32 / 101.0)
            .collect();
        index.add(&ids, &vectors).unwrap();
        index
    }

    fn load(dir: &Path, bound: u64) -> std::result::Result<VectorIndex, Unusable> {
        finish(start(dir).unwrap(), 1, 8, Metric::L2, bound).unwrap()
    }

    fn vectors_inode(dir: &Path) -> u64 {
        fs::metadata(dir.join(VECTORS_FILE)).unwrap().ino()
    }

    #[test]
    fn saves_append_the_new_vectors_and_read_back_whole() {
        for shape in [Shape::Flat, Shape::Hnsw { m: 8 }] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let first = index(shape, 1, 200, None);
            save(d, &first, 1).unwrap();
            let inode = vectors_inode(d);
            let before = fs::read(d.join(VECTORS_FILE)).unwrap();
            assert_eq!(before.len(), 199 * 8 * 4);
            let grown = index(shape, 200, 260, Some(first));
            save(d, &grown, 1).unwrap();
            // Appended in place: the same file, its first bytes as they were.
            assert_eq!(vectors_inode(d), inode, "{shape:?}");
            let after = fs::read(d.join(VECTORS_FILE)).unwrap();
            assert_eq!(after.len(), 259 * 8 * 4);
            assert_eq!(&after[..before.len()], &before[..]);
            let back = load(d, 260).unwrap();
            assert_eq!(back.len(), 259);
            let q: Vec<f32> = (0..8).map(|i| i as f32 / 10.0).collect();
            let want = grown.search(&q, 5, super::super::Allow::All).unwrap();
            assert_eq!(back.search(&q, 5, super::super::Allow::All).unwrap(), want);
            // A tail left by a save that did not finish is not read, and the next save cuts it.
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(d.join(VECTORS_FILE))
                .unwrap();
            f.write_all(&[7u8; 100]).unwrap();
            drop(f);
            assert_eq!(load(d, 260).unwrap().len(), 259);
            save(d, &grown, 1).unwrap();
            assert_eq!(fs::read(d.join(VECTORS_FILE)).unwrap(), after);
        }
    }

    /// Whether this process maps `path` (a line of `/proc/self/maps` names it).
    fn is_mapped(path: &Path) -> bool {
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let name = path.to_str().unwrap();
        maps.lines().any(|l| l.trim_end().ends_with(name))
    }

    /// An HNSW snapshot's vectors are mapped, not copied: searches see them as they were
    /// saved; a save while mapped appends nothing; adds (through the insert path's growth or a
    /// plain add) first copy them into the index's own memory and then agree with each other;
    /// the mapping goes with the index, and outlives the files. Exact indexes are read into
    /// memory.
    #[test]
    fn hnsw_vectors_are_mapped_and_copied_before_adds() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shape = Shape::Hnsw { m: 8 };
        let vectors_path = d.join(VECTORS_FILE);
        // 199 vectors of 32 bytes: they end inside a page, where the ids begin.
        let original = index(shape, 1, 200, None);
        save(d, &original, 1).unwrap();
        let queries: Vec<Vec<f32>> = (0..30)
            .map(|q| {
                (0..8)
                    .map(|i| ((q * 13 + i * 5) % 17) as f32 / 17.0)
                    .collect()
            })
            .collect();
        let answers = |ix: &VectorIndex| -> Vec<Vec<super::super::Neighbour>> {
            queries
                .iter()
                .map(|q| ix.search(q, 5, super::super::Allow::All).unwrap())
                .collect()
        };
        let back = load(d, 200).unwrap();
        assert!(is_mapped(&vectors_path));
        assert_eq!(answers(&back), answers(&original));
        let inode = vectors_inode(d);
        let before = fs::read(&vectors_path).unwrap();
        save(d, &back, 1).unwrap();
        assert_eq!(vectors_inode(d), inode);
        assert_eq!(fs::read(&vectors_path).unwrap(), before);
        assert_eq!(load(d, 200).unwrap().len(), 199);

        let mut grown = back;
        let g = grown
            .prepare_growth(60)
            .expect("a mapped index always grows");
        assert!(grown.commit_growth(&g));
        drop(g);
        assert!(
            !is_mapped(&vectors_path),
            "the growth's copy left the mapping"
        );
        let grown = index(shape, 200, 260, Some(grown));
        let plain = load(d, 200).unwrap();
        assert!(is_mapped(&vectors_path));
        let plain = index(shape, 200, 260, Some(plain));
        assert!(!is_mapped(&vectors_path), "the add's copy left the mapping");
        assert_eq!(answers(&grown), answers(&plain));
        for id in [1u64, 150, 200, 259] {
            let v: Vec<f32> = (id * 8..id * 8 + 8)
                .map(|i| ((i * 7919) % 101) as f32 / 101.0)
                .collect();
            let hit = grown.search(&v, 1, super::super::Allow::All).unwrap()[0];
            assert_eq!(hit.distance, 0.0, "id {id}");
        }

        let kept = load(d, 200).unwrap();
        remove(d).unwrap();
        assert_eq!(answers(&kept), answers(&original));
        drop(kept);
        assert!(!is_mapped(&vectors_path));

        let flat = index(Shape::Flat, 1, 200, None);
        save(d, &flat, 1).unwrap();
        let back = load(d, 200).unwrap();
        assert!(!is_mapped(&vectors_path));
        assert_eq!(answers(&back), answers(&flat));
    }

    /// The part after the vectors starts inside their last page, or (here: 128 vectors of 32
    /// bytes, one page) on a page of its own; and a single vector is a part of a page.
    #[test]
    fn mapped_vectors_of_any_length_read_back() {
        for n in [128u64, 1, 129] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let original = index(Shape::Hnsw { m: 8 }, 1, n + 1, None);
            save(d, &original, 1).unwrap();
            let back = load(d, n + 1).unwrap();
            assert!(is_mapped(&d.join(VECTORS_FILE)), "{n}");
            assert_eq!(back.len(), n as usize);
            for q in 0..10 {
                let query: Vec<f32> = (0..8).map(|i| ((q * 7 + i) % 11) as f32 / 11.0).collect();
                assert_eq!(
                    back.search(&query, 3, super::super::Allow::All).unwrap(),
                    original
                        .search(&query, 3, super::super::Allow::All)
                        .unwrap(),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn vectors_that_differ_from_the_stamp_are_written_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(d, &index(Shape::Flat, 1, 50, None), 1).unwrap();
        let inode = vectors_inode(d);
        // Another index of as many vectors or more (a rebuild in another order): not a prefix.
        save(d, &index(Shape::Flat, 3, 80, None), 1).unwrap();
        assert_ne!(vectors_inode(d), inode);
        assert_eq!(load(d, 80).unwrap().len(), 77);
    }

    #[test]
    fn damaged_or_missing_vectors_are_unusable_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(d, &index(Shape::Hnsw { m: 8 }, 1, 120, None), 1).unwrap();
        let good = fs::read(d.join(VECTORS_FILE)).unwrap();
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        fs::write(d.join(VECTORS_FILE), &flipped).unwrap();
        assert!(matches!(load(d, 120), Err(Unusable::Corrupt(_))));
        fs::write(d.join(VECTORS_FILE), &good[..good.len() - 3]).unwrap();
        assert!(matches!(load(d, 120), Err(Unusable::Corrupt(_))));
        fs::remove_file(d.join(VECTORS_FILE)).unwrap();
        assert!(matches!(load(d, 120), Err(Unusable::Missing)));
        // Ids the store never gave.
        fs::write(d.join(VECTORS_FILE), &good).unwrap();
        assert!(matches!(load(d, 100), Err(Unusable::Corrupt(_))));
        assert_eq!(load(d, 120).unwrap().len(), 119);
    }

    #[test]
    fn a_format_1_snapshot_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let idx = index(Shape::Hnsw { m: 8 }, 1, 90, None);
        faiss::index::io::write_index(&idx.inner, d.join(INDEX_FILE).to_str().unwrap()).unwrap();
        let bytes = fs::read(d.join(INDEX_FILE)).unwrap();
        let stamp = Stamp {
            magic: MAGIC,
            format: 1,
            model: 1,
            shape: idx.shape,
            dim: 8,
            metric: "l2".into(),
            file_len: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
        };
        let encoded = bincode::serde::encode_to_vec(&stamp, bincode::config::standard()).unwrap();
        fs::write(d.join(STAMP_FILE), encoded).unwrap();
        assert_eq!(load(d, 90).unwrap().len(), 89);
        // The next save writes format 2 beside it.
        save(d, &idx, 1).unwrap();
        assert!(fs::metadata(d.join(INDEX_FILE)).unwrap().len() < bytes.len() as u64);
        assert_eq!(load(d, 90).unwrap().len(), 89);
    }
}
