//! FAISS's serialisation of an index, read back from the two files a snapshot keeps it in
//! (`snapshot.rs`): `index.graph` holds all of it but the vectors, which sit in
//! `index.vectors` and belong at offset `at`. Reads and seeks see the one stream.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// The stream `graph[..at] ++ vectors[..vectors_len] ++ graph[at..]`.
#[derive(Debug)]
pub(crate) struct Stitched<R> {
    graph: R,
    vectors: R,
    at: u64,
    vectors_len: u64,
    graph_len: u64,
    pos: u64,
    /// Where each file's own cursor is (seeks only when a read must jump).
    graph_pos: Option<u64>,
    vectors_pos: Option<u64>,
}

impl Stitched<File> {
    /// Opens the two files; fails with `InvalidData` when either is shorter than `at` and
    /// `vectors_len` say.
    pub fn open(
        graph: &std::path::Path,
        vectors: &std::path::Path,
        at: u64,
        vectors_len: u64,
    ) -> io::Result<Stitched<File>> {
        let g = File::open(graph)?;
        let graph_len = g.metadata()?.len();
        let v = if vectors_len > 0 {
            File::open(vectors)?
        } else {
            // No vectors: any handle does (it is never read).
            File::open(graph)?
        };
        if v.metadata()?.len() < vectors_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the vectors file is shorter than the stamp says",
            ));
        }
        Stitched::new(g, graph_len, v, at, vectors_len)
    }

    /// Has FAISS read the stream with the vectors mapped from their file instead of copied
    /// ([`super::ffi::read_mapped`]).
    pub fn read_mapped(&self) -> crate::error::Result<faiss::index::IndexImpl> {
        super::ffi::read_mapped(
            &self.graph,
            self.graph_len,
            &self.vectors,
            self.at,
            self.vectors_len,
        )
    }
}

impl<R: Read + Seek> Stitched<R> {
    pub fn new(
        graph: R,
        graph_len: u64,
        vectors: R,
        at: u64,
        vectors_len: u64,
    ) -> io::Result<Stitched<R>> {
        if at > graph_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the vectors' place is past the end of the graph file",
            ));
        }
        Ok(Stitched {
            graph,
            vectors,
            at,
            vectors_len,
            graph_len,
            pos: 0,
            graph_pos: None,
            vectors_pos: None,
        })
    }

    /// The stream's length.
    pub fn len(&self) -> u64 {
        self.graph_len + self.vectors_len
    }
}

fn read_at<R: Read + Seek>(
    file: &mut R,
    cursor: &mut Option<u64>,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<usize> {
    if *cursor != Some(offset) {
        file.seek(SeekFrom::Start(offset))?;
    }
    let n = file.read(buf)?;
    *cursor = Some(offset + n as u64);
    Ok(n)
}

impl<R: Read + Seek> Read for Stitched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.len();
        if self.pos >= end || buf.is_empty() {
            return Ok(0);
        }
        // Which file this position is in, where in it, and where its piece of the stream ends.
        let (file, cursor, offset, piece_end) = if self.pos < self.at {
            (&mut self.graph, &mut self.graph_pos, self.pos, self.at)
        } else if self.pos < self.at + self.vectors_len {
            let piece_end = self.at + self.vectors_len;
            (
                &mut self.vectors,
                &mut self.vectors_pos,
                self.pos - self.at,
                piece_end,
            )
        } else {
            (
                &mut self.graph,
                &mut self.graph_pos,
                self.pos - self.vectors_len,
                end,
            )
        };
        let take = (piece_end - self.pos).min(buf.len() as u64) as usize;
        let n = read_at(file, cursor, offset, &mut buf[..take])?;
        if n == 0 && self.pos < piece_end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a snapshot file ended early",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for Stitched<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len().checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_and_seeks_the_one_stream() {
        let whole: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for (at, vlen) in [(0, 0), (10, 0), (100, 300), (0, 1000), (700, 300), (3, 1)] {
            let graph: Vec<u8> = [&whole[..at], &whole[at + vlen..]].concat();
            // The vectors file may be longer than the stamp says (a save cut short).
            let vectors: Vec<u8> = [&whole[at..at + vlen], &[9u8; 7][..]].concat();
            let mut s = Stitched::new(
                Cursor::new(graph.clone()),
                graph.len() as u64,
                Cursor::new(vectors),
                at as u64,
                vlen as u64,
            )
            .unwrap();
            assert_eq!(s.len(), 1000);
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            assert_eq!(all, whole, "at {at}, {vlen}");
            for start in [0u64, 5, 99, 100, 101, 399, 400, 999] {
                s.seek(SeekFrom::Start(start)).unwrap();
                let mut b = [0u8; 37];
                let n = s.read(&mut b).unwrap();
                assert!(n > 0);
                assert_eq!(&b[..n], &whole[start as usize..start as usize + n]);
            }
        }
        let err = Stitched::new(Cursor::new(vec![0u8; 5]), 5, Cursor::new(vec![]), 6, 0);
        assert!(err.is_err());
    }
}
