//! The index snapshot: `index.faiss` (FAISS's own format) and `index.stamp` (what it holds).
//!
//! The stamp names the model version, shape, dimension and metric, and carries the length and
//! CRC-32 of `index.faiss`. A snapshot whose stamp is missing, undecodable, for another model,
//! or whose file does not match the checksum is not used: the index is rebuilt from the
//! embeddings tree. A valid one may still lag the store (written at the last flush or close);
//! the database then catches it up from the store's ids (see `Db::open`).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use faiss::index::io::{read_index, write_index};
use faiss::index::{id_map::IdMap, IndexImpl};
use lookalike_plugin::Metric;
use serde::{Deserialize, Serialize};

use super::{faiss_file, Shape, VectorIndex};
use crate::error::{Error, Result};
use crate::store::sync_dir;

const MAGIC: [u8; 8] = *b"LKLINDEX";
const STAMP_FORMAT: u16 = 1;
const INDEX_FILE: &str = "index.faiss";
const STAMP_FILE: &str = "index.stamp";

#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    magic: [u8; 8],
    format: u16,
    model: u32,
    shape: Shape,
    dim: u32,
    metric: String,
    file_len: u64,
    crc32: u32,
}

/// Why a snapshot was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unusable {
    Missing,
    Corrupt(String),
    OtherModel,
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("path {} is not UTF-8", p.display())))
}

/// The temporary files of [`save`]: never valid outside a running save.
const TEMP_FILES: [&str; 2] = ["index.faiss.tmp", "index.stamp.tmp"];

/// Removes temporary files a save left behind (a crash, or a failure part way).
pub(crate) fn remove_temporary(dir: &Path) {
    for name in TEMP_FILES {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// Writes a snapshot of `index` for `model` into `dir`, atomically (temp files, fsync, rename).
/// A failure removes the temporary files.
pub(crate) fn save(dir: &Path, index: &VectorIndex, model: u32) -> Result<()> {
    let result = save_inner(dir, index, model);
    if result.is_err() {
        remove_temporary(dir);
    }
    result
}

fn save_inner(dir: &Path, index: &VectorIndex, model: u32) -> Result<()> {
    let tmp = dir.join("index.faiss.tmp");
    write_index(&index.inner, path_str(&tmp)?)?;
    // Checksummed by streaming the file back: the index is in memory once, not twice.
    let (file_len, crc32) = stream_crc(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    let stamp = Stamp {
        magic: MAGIC,
        format: STAMP_FORMAT,
        model,
        shape: index.shape,
        dim: index.dim as u32,
        metric: index.metric.as_str().to_string(),
        file_len,
        crc32,
    };
    let stamp_bytes = bincode::serde::encode_to_vec(&stamp, bincode::config::standard())
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the index stamp: {e}")))?;
    let stamp_tmp = dir.join("index.stamp.tmp");
    let mut f = fs::File::create(&stamp_tmp).map_err(|e| Error::io(&stamp_tmp, e))?;
    f.write_all(&stamp_bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&stamp_tmp, e))?;
    // The stamp goes last: a crash in between leaves a stamp whose checksum fails.
    let (index_path, stamp_path) = paths(dir);
    fs::rename(&tmp, &index_path).map_err(|e| Error::io(&index_path, e))?;
    fs::rename(&stamp_tmp, &stamp_path).map_err(|e| Error::io(&stamp_path, e))?;
    sync_dir(dir)
}

/// The length and CRC-32 of a file, read in 1 MiB pieces.
fn stream_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Removes the snapshot in `dir`, if any: the stamp first, so that what a crash leaves is
/// read as no snapshot.
pub(crate) fn remove(dir: &Path) -> Result<()> {
    let (index_path, stamp_path) = paths(dir);
    for path in [stamp_path, index_path] {
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

/// A snapshot that FAISS is reading on a thread of its own: started by [`start`] as soon as
/// the database is locked, before the store is open, and finished by [`finish`].
pub(crate) struct Reading {
    stamp: Stamp,
    path: PathBuf,
    faiss: std::thread::JoinHandle<faiss::error::Result<IdMap<IndexImpl>>>,
}

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reading").field("path", &self.path).finish()
    }
}

/// Starts reading the snapshot in `dir`: its stamp, then the sizes in its FAISS file
/// ([`faiss_file::check_sizes`], against the stamp's dimension and metric), then FAISS's read
/// of it on another thread. FAISS thus never sees sizes that disagree with the file (it
/// allocates no more than the file holds); the rest of the file is checked by [`finish`],
/// and the index is used only if that passes too.
pub(crate) fn start(dir: &Path) -> Result<std::result::Result<Reading, Unusable>> {
    let (index_path, stamp_path) = paths(dir);
    let stamp_bytes = match fs::read(&stamp_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Unusable::Missing)),
        Err(e) => return Err(Error::io(stamp_path, e)),
    };
    let corrupt = |why: String| Ok(Err(Unusable::Corrupt(why)));
    let stamp: Stamp = match crate::codec::decode(&stamp_bytes) {
        Ok((s, _)) => s,
        Err(e) => return corrupt(format!("stamp does not decode: {e}")),
    };
    if stamp.magic != MAGIC || stamp.format != STAMP_FORMAT {
        return corrupt("stamp has a wrong magic number or format".into());
    }
    let Some(metric) = [Metric::Cosine, Metric::L2]
        .into_iter()
        .find(|m| m.as_str() == stamp.metric)
    else {
        return corrupt(format!("stamp names an unknown metric {:?}", stamp.metric));
    };
    // Ids are checked against the store by `finish`, once it is open.
    match faiss_file::check_sizes(&index_path, stamp.dim as usize, metric, u64::MAX) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return corrupt(format!("index file rejected: {why}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Unusable::Missing)),
        Err(e) => return Err(Error::io(index_path, e)),
    }
    let path = path_str(&index_path)?.to_string();
    let faiss = std::thread::Builder::new()
        .name("lookalike-snapshot".into())
        .spawn(move || read_index(&path).and_then(|i| i.into_id_map()))
        .map_err(|e| Error::io(&index_path, e))?;
    Ok(Ok(Reading {
        stamp,
        path: index_path,
        faiss,
    }))
}

/// Drops a [`start`]ed read that is of no use (the model's vectors are being made again),
/// after FAISS's read ends, so that its memory is given back before the rebuild.
pub(crate) fn abandon(reading: std::result::Result<Reading, Unusable>) {
    if let Ok(r) = reading {
        let _ = r.faiss.join();
    }
}

/// Finishes [`start`]: the snapshot, if it is intact and belongs to `model` with this
/// dimension and metric, and every id in it is below `id_bound` (the store's next id); says
/// why not otherwise. The whole file is walked and checksummed ([`faiss_file::check`]) while
/// FAISS's read finishes.
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
        let _ = r.faiss.join();
        return Ok(Err(Unusable::OtherModel));
    }
    let checked = faiss_file::check(&r.path, dim, metric, id_bound);
    let read = r.faiss.join();
    let summary = match checked {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return corrupt(format!("index file rejected: {why}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Unusable::Missing)),
        Err(e) => return Err(Error::io(&r.path, e)),
    };
    if summary.len != stamp.file_len || summary.crc32 != stamp.crc32 {
        return corrupt("index file does not match the stamp's checksum".into());
    }
    if summary.hnsw != matches!(stamp.shape, Shape::Hnsw { .. }) {
        return corrupt("index kind differs from the stamp".into());
    }
    let inner = match read {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return corrupt(format!("FAISS could not read it: {e}")),
        Err(_) => return corrupt("FAISS's reader panicked".into()),
    };
    let index = VectorIndex::from_parts(inner, stamp.shape, metric, dim);
    if index.ids().len() as u64 != summary.count {
        return corrupt("an id appears twice".into());
    }
    Ok(Ok(index))
}

/// The snapshot fuzz target's entry (`src/fuzzing.rs`): `bytes` as a stamp, and as an index
/// file of 8-dimensional vectors that FAISS reads (from a file in `scratch`) whenever the walk
/// accepts it.
pub(crate) fn fuzz(bytes: &[u8], scratch: &Path) {
    let _ = crate::codec::decode::<Stamp>(bytes);
    for metric in [Metric::Cosine, Metric::L2] {
        let _ = faiss_file::check_reader(
            std::io::Cursor::new(bytes),
            bytes.len() as u64,
            8,
            metric,
            1 << 20,
        );
        // FAISS reads what passes the sizes check, as on open.
        let path = scratch.join("index.faiss");
        if fs::write(&path, bytes).is_err() {
            continue;
        }
        if let Ok(Ok(())) = faiss_file::check_sizes(&path, 8, metric, 1 << 20) {
            if let Some(p) = path.to_str() {
                let _ = read_index(p).and_then(|i| i.into_id_map());
            }
        }
    }
}
