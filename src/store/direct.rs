//! Pack appends that bypass the page cache (`O_DIRECT`).
//!
//! Written through the page cache, a photo's bytes are copied by the kernel into freshly
//! allocated cache pages and later written back by the kernel's flusher: a profile of
//! `lookalike add` over 12 MP photos had that copy at 6.6-11 % of the CPU, on a job the
//! decoder should have to itself. Written directly, the bytes are staged once in a reused,
//! aligned buffer of ours and handed to the device from there.
//!
//! Direct writes must start at aligned file offsets and cover whole aligned blocks: a record
//! written this way starts at a multiple of [`ALIGN`], and its last block is padded with
//! zeros. Readers go by each record's [`PackRef`](super::packs::PackRef), so the padding is
//! invisible to them and segments written either way read the same (`docs/format.md`).
//! Where the file system does not take direct writes (`statx` reports no direct-I/O
//! alignment, as on tmpfs or before Linux 6.1), appends go through the page cache as before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};

/// Records written directly start at multiples of this; every direct write covers whole
/// blocks of it. Larger than any file system's direct-I/O alignment that is used here.
pub(super) const ALIGN: u64 = 4096;

/// The staging buffer: a run of records is written in pieces of at most this many bytes.
const STAGE: usize = 8 << 20;

/// `n` rounded up to a multiple of [`ALIGN`].
pub(super) fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// A direct (`O_DIRECT`) handle on a segment, and the aligned buffer its writes go through.
pub(super) struct Direct {
    file: File,
    /// `STAGE + ALIGN` bytes once used; the staged bytes start at `at`, an aligned address.
    stage: Vec<u8>,
    at: usize,
    /// Bytes staged and not written yet.
    fill: usize,
    /// The file offset that `stage[at]` is written to.
    pos: u64,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("pos", &self.pos).finish()
    }
}

impl Direct {
    /// A direct handle on `path` (already open as `file`), when its file system takes direct
    /// writes at [`ALIGN`]ed offsets from [`ALIGN`]ed memory; `None` otherwise.
    pub(super) fn open(path: &Path, file: &File) -> Option<Direct> {
        let st = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
        let mem = u64::from(st.stx_dio_mem_align);
        let offset = u64::from(st.stx_dio_offset_align);
        let supported = StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN)
            && mem > 0
            && offset > 0
            && ALIGN.is_multiple_of(mem)
            && ALIGN.is_multiple_of(offset);
        if !supported {
            return None;
        }
        let fd = rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        Some(Direct {
            file: File::from(fd),
            stage: Vec::new(),
            at: 0,
            fill: 0,
            pos: 0,
        })
    }

    /// Starts a run of records at file offset `pos`, a multiple of [`ALIGN`].
    pub(super) fn start(&mut self, pos: u64) {
        debug_assert_eq!(pos % ALIGN, 0);
        if self.stage.is_empty() {
            self.stage = vec![0; STAGE + ALIGN as usize];
            self.at = self.stage.as_ptr().align_offset(ALIGN as usize);
        }
        self.pos = pos;
        self.fill = 0;
    }

    /// Adds `bytes` to the run, writing the staging buffer each time it fills.
    pub(super) fn push(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let room = STAGE - self.fill;
            let n = room.min(bytes.len());
            let from = self.at + self.fill;
            self.stage[from..from + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == STAGE {
                self.write()?;
            }
        }
        Ok(())
    }

    /// Pads the run with zeros to a whole block; the file offset after it (where the next
    /// record starts).
    pub(super) fn pad(&mut self) -> u64 {
        let padded = align_up(self.fill as u64) as usize;
        let from = self.at + self.fill;
        self.stage[from..self.at + padded].fill(0);
        self.fill = padded;
        self.pos + padded as u64
    }

    /// Writes what is staged (whole blocks: call [`Direct::pad`] first).
    pub(super) fn finish(&mut self) -> std::io::Result<()> {
        debug_assert_eq!(self.fill as u64 % ALIGN, 0);
        if self.fill > 0 {
            self.write()?;
        }
        Ok(())
    }

    /// Stages from an address off the alignment, so that the next write is refused with
    /// `EINVAL`, as by a file system that does not take direct writes after all.
    #[cfg(test)]
    pub(super) fn misalign(&mut self) {
        self.start(0);
        self.at += 1;
    }

    /// Writes through a read-only handle on `path` from now on, so that they fail (`EBADF`).
    #[cfg(test)]
    pub(super) fn break_writes(&mut self, path: &Path) {
        self.file = File::open(path).unwrap();
    }

    fn write(&mut self) -> std::io::Result<()> {
        self.file
            .write_all_at(&self.stage[self.at..self.at + self.fill], self.pos)?;
        self.pos += self.fill as u64;
        self.fill = 0;
        Ok(())
    }
}
