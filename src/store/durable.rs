//! What sled 0.34's flush leaves unsynced, synced: its log file (`store/db`, written with
//! `sync_file_range`, which skips the file's metadata and the drive's write cache) and the
//! files it keeps values over its blob threshold in (`store/blobs/`, never synced), with the
//! directories that name them. Large image bytes do not go through sled (see `packs.rs`), but
//! model weights and training checkpoints do.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// sled's files in its directory.
#[derive(Debug)]
pub(super) struct SledFiles {
    dir: PathBuf,
    log: File,
    /// Blob files synced already (sled writes each once and never changes it).
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

/// fsyncs a directory, so that the files created in it survive power loss. The one helper for
/// this: the pack files, sled's files and the index snapshot use it.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

impl SledFiles {
    /// After sled opened `dir`: syncs the directory (sled may just have created its files).
    pub fn open(dir: &Path) -> Result<SledFiles> {
        let path = dir.join("db");
        let log = File::open(&path).map_err(|e| Error::io(&path, e))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(SledFiles {
            dir: dir.to_path_buf(),
            log,
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    /// After `sled::Db::flush`: the log's data and size, then any new blob file.
    pub fn sync(&self) -> Result<()> {
        self.log
            .sync_data()
            .map_err(|e| Error::io(self.dir.join("db"), e))?;
        self.sync_blobs()
    }

    /// Any blob file not synced yet, then the blob directory. Before `sled::Db::flush` too:
    /// sled writes a blob when the value is inserted, so this puts it on disk before the log
    /// record that refers to it.
    pub fn sync_blobs(&self) -> Result<()> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&blobs, e)),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| Error::Poisoned("a thread panicked while syncing the store".into()))?;
        let mut new = false;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&blobs, e))?;
            let name = entry.file_name();
            if synced.contains(&name) {
                continue;
            }
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|e| Error::io(&path, e))?,
                // sled removed it meanwhile (a value replaced or deleted).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
            synced.insert(name);
            new = true;
        }
        if new {
            sync_dir(&blobs)?;
        }
        Ok(())
    }
}
