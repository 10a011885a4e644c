//! A check of an index snapshot's FAISS file before FAISS reads it, in one streaming pass that
//! also computes the file's CRC-32.
//!
//! FAISS's reader trusts the sizes in the file: a vector length of up to 2^40 is allocated
//! (and zero-filled) before the bytes are read, and an HNSW graph's offsets and neighbour ids
//! are used as array indices when searching. A snapshot is derived data, so instead of letting
//! a damaged or crafted file reach it, the file is walked here first: only the two layouts
//! this crate writes are accepted (`IDMap` over `Flat`, and `IDMap` over `HNSW,Flat`), every
//! length must agree with the header's vector count and the dimension, the graph must be
//! consistent (offsets, levels, neighbours, entry point), every id must be one the store could
//! have handed out, and nothing may follow the end. Memory used: the graph's per-node levels
//! (4 bytes a vector) and a 1 MiB read buffer.

use std::io::{BufReader, Read, Seek};

use lookalike_plugin::Metric;

/// What a valid file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Vectors in the file (removed ones of an HNSW graph included).
    pub count: u64,
    /// HNSW (true) or flat.
    pub hnsw: bool,
    /// The file's length and CRC-32.
    pub len: u64,
    pub crc32: u32,
    /// The largest id in the file (0 for none).
    pub max_id: u64,
}

/// Walks `reader` (`len` bytes) as a snapshot's stream for vectors of `dim` values under
/// `metric`, with ids below `id_bound`. `Ok(Err(why))` for a stream that must not be used.
pub(crate) fn check(
    reader: impl Read + Seek,
    len: u64,
    dim: usize,
    metric: Metric,
    id_bound: u64,
) -> std::io::Result<Result<Summary, String>> {
    walk_file(reader, len, dim, metric, id_bound, false)
}

/// The part of [`check`] that FAISS's reader depends on: the layout and every length,
/// read without the vectors and the graph's neighbours (it seeks over them: milliseconds at a
/// million vectors). A stream that passes makes FAISS allocate no more than it holds, so
/// FAISS may read it while [`check`] looks at the rest; the index must not be searched
/// before [`check`] accepted the stream too.
pub(crate) fn check_sizes(
    reader: impl Read + Seek,
    len: u64,
    dim: usize,
    metric: Metric,
    id_bound: u64,
) -> std::io::Result<Result<(), String>> {
    Ok(walk_file(reader, len, dim, metric, id_bound, true)?.map(|_| ()))
}

fn walk_file(
    reader: impl Read + Seek,
    len: u64,
    dim: usize,
    metric: Metric,
    id_bound: u64,
    sizes_only: bool,
) -> std::io::Result<Result<Summary, String>> {
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 20, reader),
        hasher: crc32fast::Hasher::new(),
        left: len,
        sizes_only,
    };
    let walked = walk(&mut r, dim, metric, id_bound);
    let summary = match walked {
        Ok(s) => s,
        Err(Bad::Io(e)) => return Err(e),
        Err(Bad::Invalid(why)) => return Ok(Err(why)),
    };
    if r.left != 0 {
        return Ok(Err(format!("{} bytes follow the index", r.left)));
    }
    Ok(Ok(Summary {
        len,
        crc32: r.hasher.finalize(),
        ..summary
    }))
}

enum Bad {
    Io(std::io::Error),
    Invalid(String),
}

type Walk<T> = Result<T, Bad>;

fn invalid<T>(why: impl Into<String>) -> Walk<T> {
    Err(Bad::Invalid(why.into()))
}

/// Reads little-endian values, counting what is left of the file and hashing what it reads.
struct Reader<R: Read + Seek> {
    inner: BufReader<R>,
    hasher: crc32fast::Hasher,
    left: u64,
    /// [`check_sizes`]: bulk data is skipped, not read (nor hashed).
    sizes_only: bool,
}

impl<R: Read + Seek> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Walk<[u8; N]> {
        if self.left < N as u64 {
            return invalid("the file ends early");
        }
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(Bad::Io)?;
        self.hasher.update(&b);
        self.left -= N as u64;
        Ok(b)
    }

    fn u8(&mut self) -> Walk<u8> {
        Ok(self.bytes::<1>()?[0])
    }

    fn i32(&mut self) -> Walk<i32> {
        Ok(i32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Walk<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn fourcc(&mut self) -> Walk<[u8; 4]> {
        self.bytes()
    }

    /// A vector length, checked to fit in what is left of the file at `width` bytes each.
    fn len(&mut self, width: u64) -> Walk<u64> {
        let n = self.u64()?;
        match n.checked_mul(width) {
            Some(b) if b <= self.left => Ok(n),
            _ => invalid(format!(
                "a vector of {n} values does not fit in the {} bytes left",
                self.left
            )),
        }
    }

    /// Skips `n` bytes (hashing them, unless only sizes are checked).
    fn skip(&mut self, mut n: u64) -> Walk<()> {
        if self.sizes_only {
            if n > self.left {
                return invalid("the file ends early");
            }
            let step = i64::try_from(n).map_err(|_| Bad::Invalid("a skip too long".into()))?;
            self.inner.seek_relative(step).map_err(Bad::Io)?;
            self.left -= n;
            return Ok(());
        }
        let mut buf = [0u8; 1 << 16];
        while n > 0 {
            let take = n.min(buf.len() as u64) as usize;
            let chunk = &mut buf[..take];
            self.inner.read_exact(chunk).map_err(Bad::Io)?;
            self.hasher.update(chunk);
            self.left -= take as u64;
            n -= take as u64;
        }
        Ok(())
    }

    /// Reads `count` values of `W` bytes a buffer at a time (hashing each buffer once, not
    /// each value: at a million vectors the graph alone is 64 million values), passing each
    /// value's bytes to `each` with its index.
    fn each<const W: usize>(
        &mut self,
        count: u64,
        mut each: impl FnMut(u64, [u8; W]) -> Walk<()>,
    ) -> Walk<()> {
        let total = match count.checked_mul(W as u64) {
            Some(t) if t <= self.left => t,
            _ => return invalid("the file ends early"),
        };
        let mut buf = vec![0u8; (1 << 16) / W * W];
        let mut done = 0u64;
        let mut i = 0u64;
        while done < total {
            let take = (total - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..take];
            self.inner.read_exact(chunk).map_err(Bad::Io)?;
            self.hasher.update(chunk);
            for value in chunk.chunks_exact(W) {
                let mut b = [0u8; W];
                b.copy_from_slice(value);
                each(i, b)?;
                i += 1;
            }
            done += take as u64;
            self.left -= take as u64;
        }
        Ok(())
    }

    /// [`Reader::each`] over little-endian `i32`s.
    fn each_i32(&mut self, count: u64, mut each: impl FnMut(u64, i32) -> Walk<()>) -> Walk<()> {
        self.each::<4>(count, |i, b| each(i, i32::from_le_bytes(b)))
    }

    /// [`Reader::each`] over little-endian `u64`s.
    fn each_u64(&mut self, count: u64, mut each: impl FnMut(u64, u64) -> Walk<()>) -> Walk<()> {
        self.each::<8>(count, |i, b| each(i, u64::from_le_bytes(b)))
    }
}

/// FAISS's `write_index_header`: dimension, count, two unused words, trained flag, metric.
fn header(r: &mut Reader<impl Read + Seek>, dim: usize, metric: Metric) -> Walk<u64> {
    let d = r.i32()?;
    if usize::try_from(d).ok() != Some(dim) {
        return invalid(format!("dimension {d}, expected {dim}"));
    }
    let ntotal = r.u64()?;
    r.u64()?;
    r.u64()?;
    if r.u8()? > 1 {
        return invalid("bad trained flag");
    }
    let m = r.i32()?;
    let want = match metric {
        Metric::Cosine => 0, // inner product
        Metric::L2 => 1,
    };
    if m != want {
        return invalid(format!("metric {m}, expected {want}"));
    }
    Ok(ntotal)
}

/// A flat index (after its fourcc `kind`): the vectors themselves.
fn flat(
    r: &mut Reader<impl Read + Seek>,
    kind: [u8; 4],
    dim: usize,
    metric: Metric,
    count: u64,
) -> Walk<()> {
    let want: &[u8; 4] = match metric {
        Metric::Cosine => b"IxFI",
        Metric::L2 => b"IxF2",
    };
    if &kind != want {
        return invalid("the vectors are not a flat index of this metric");
    }
    if header(r, dim, metric)? != count {
        return invalid("the vector store's count differs from the index's");
    }
    // Stored as a count of 4-byte words.
    let words = r.len(4)?;
    if Some(words) != count.checked_mul(dim as u64) {
        return invalid(format!("{words} values for {count} vectors of {dim}"));
    }
    r.skip(words * 4)
}

/// HNSW's graph: level sizes, per-node levels and offsets, neighbours, entry point.
fn graph(r: &mut Reader<impl Read + Seek>, count: u64) -> Walk<()> {
    let probas = r.len(8)?;
    if probas > 64 {
        return invalid("too many HNSW levels");
    }
    r.skip(probas * 8)?;
    let levels_n = r.len(4)?;
    if levels_n == 0 || levels_n > 65 {
        return invalid("bad HNSW level table");
    }
    let mut cum = Vec::with_capacity(levels_n as usize);
    r.each_i32(levels_n, |_, v| {
        match (u32::try_from(v), cum.last()) {
            (Ok(v), Some(&last)) if v >= last => cum.push(v),
            (Ok(0), None) => cum.push(0),
            _ => return invalid("HNSW level sizes are not increasing from 0"),
        }
        Ok(())
    })?;
    if r.len(4)? != count {
        return invalid("HNSW level count differs from the vector count");
    }
    // Bounded by the file's length, checked by `len`.
    let mut levels = Vec::with_capacity(count as usize);
    let mut top = 0;
    r.each_i32(count, |_, l| {
        if l < 1 || l as u64 >= levels_n {
            return invalid(format!("HNSW node level {l} out of range"));
        }
        top = top.max(l);
        levels.push(l as usize);
        Ok(())
    })?;
    if r.len(8)? != count + 1 {
        return invalid("HNSW offsets differ from the vector count");
    }
    let mut expected = 0u64;
    r.each_u64(count + 1, |i, offset| {
        if offset != expected {
            return invalid("HNSW offsets do not match the node levels");
        }
        if let Some(l) = levels.get(i as usize) {
            expected += u64::from(cum[*l]);
        }
        Ok(())
    })?;
    if r.len(4)? != expected {
        return invalid("HNSW neighbour count differs from the offsets");
    }
    let n = i64::try_from(count).unwrap_or(i64::MAX);
    if r.sizes_only {
        // Used only by searches, which wait for the full check.
        r.skip(expected * 4)?;
    } else {
        r.each_i32(expected, |_, v| {
            if i64::from(v) < -1 || i64::from(v) >= n {
                return invalid("an HNSW neighbour is out of range");
            }
            Ok(())
        })?;
    }
    let entry = r.i32()?;
    let max_level = r.i32()?;
    if i64::from(entry) < -1 || i64::from(entry) >= n || (count > 0 && entry < 0) {
        return invalid("bad HNSW entry point");
    }
    if count > 0 && max_level != top - 1 {
        return invalid("HNSW top level differs from the node levels");
    }
    r.i32()?; // efConstruction
    r.i32()?; // efSearch (set again after loading)
    r.i32()?; // unused
    Ok(())
}

fn walk(
    r: &mut Reader<impl Read + Seek>,
    dim: usize,
    metric: Metric,
    id_bound: u64,
) -> Walk<Summary> {
    if &r.fourcc()? != b"IxMp" {
        return invalid("not an id-mapped index");
    }
    let count = header(r, dim, metric)?;
    let kind = r.fourcc()?;
    let hnsw = &kind == b"IHNf";
    if hnsw {
        if header(r, dim, metric)? != count {
            return invalid("the graph's count differs from the index's");
        }
        graph(r, count)?;
        let storage = r.fourcc()?;
        flat(r, storage, dim, metric, count)?;
    } else {
        flat(r, kind, dim, metric, count)?;
    }
    if r.len(8)? != count {
        return invalid("the id map's length differs from the vector count");
    }
    let mut max_id = 0;
    r.each_u64(count, |_, id| {
        if id >= id_bound {
            return invalid(format!("an id is not below the store's next id {id_bound}"));
        }
        max_id = max_id.max(id);
        Ok(())
    })?;
    Ok(Summary {
        count,
        hnsw,
        len: 0,
        crc32: 0,
        max_id,
    })
}

/// The bytes FAISS writes for `n` vectors of 8 under `shape`, with ids 1..=n.
#[cfg(test)]
pub(crate) fn written(shape: super::Shape, metric: Metric, n: u64) -> Vec<u8> {
    let mut index = super::VectorIndex::new(shape, metric, 8, 16).unwrap();
    let ids: Vec<crate::ImageId> = (1..=n).map(crate::ImageId).collect();
    let vectors: Vec<f32> = (0..n * 8)
        .map(|i| ((i * 7919) % 101) as f32 / 101.0)
        .collect();
    index.add(&ids, &vectors).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i");
    faiss::index::io::write_index(&index.inner, path.to_str().unwrap()).unwrap();
    std::fs::read(path).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Shape;

    fn run(bytes: &[u8], metric: Metric, bound: u64) -> Result<Summary, String> {
        let r = check(
            std::io::Cursor::new(bytes),
            bytes.len() as u64,
            8,
            metric,
            bound,
        );
        let sizes = walk_file(
            std::io::Cursor::new(bytes),
            bytes.len() as u64,
            8,
            metric,
            bound,
            true,
        );
        let r = r.unwrap();
        // Whatever the full check accepts, the sizes check accepts.
        if r.is_ok() {
            assert!(sizes.unwrap().is_ok());
        }
        r
    }

    #[test]
    fn accepts_what_faiss_writes_and_checksums_it() {
        for (shape, metric) in [
            (Shape::Flat, Metric::Cosine),
            (Shape::Flat, Metric::L2),
            (Shape::Hnsw { m: 8 }, Metric::Cosine),
            (Shape::Hnsw { m: 8 }, Metric::L2),
        ] {
            for n in [0, 1, 300] {
                let bytes = written(shape, metric, n);
                let s = run(&bytes, metric, n + 1).unwrap_or_else(|e| panic!("{shape:?} {n}: {e}"));
                assert_eq!(s.count, n);
                assert_eq!(s.hnsw, matches!(shape, Shape::Hnsw { .. }));
                assert_eq!(s.crc32, crc32fast::hash(&bytes));
                assert_eq!(s.len, bytes.len() as u64);
            }
        }
    }

    #[test]
    fn rejects_bad_sizes_ids_metrics_and_tails() {
        let flat = written(Shape::Flat, Metric::Cosine, 50);
        // An id the store never handed out.
        assert!(run(&flat, Metric::Cosine, 50).is_err());
        // Another metric.
        assert!(run(&flat, Metric::L2, 51).is_err());
        // A byte too many, a byte too few.
        let mut longer = flat.clone();
        longer.push(0);
        assert!(run(&longer, Metric::Cosine, 51).is_err());
        assert!(run(&flat[..flat.len() - 1], Metric::Cosine, 51).is_err());
        // The vector count in the IDMap header (offset 4 + 4) set to 2^40: refused before any
        // allocation.
        let mut huge = flat.clone();
        huge[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(run(&huge, Metric::Cosine, 51).is_err());
        // Every single-byte change in the headers and in the HNSW graph is refused or leaves
        // a file that still checks out (then FAISS reads consistent sizes).
        let hnsw = written(Shape::Hnsw { m: 8 }, Metric::L2, 40);
        let mut refused = 0;
        for i in 0..hnsw.len().min(4096) {
            let mut b = hnsw.clone();
            b[i] ^= 0x80;
            if run(&b, Metric::L2, 41).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 100, "only {refused} changes refused");
    }
}
