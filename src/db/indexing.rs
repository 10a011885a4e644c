//! The index's upkeep: building it from the store, catching a snapshot up on open, and
//! rebuilding, reshaping, switching and snapshotting it while the database is in use, off the
//! query path.
//!
//! Locking. Queries read `Inner::state` (a parking_lot `RwLock`). Every change to the state takes
//! `Inner::writer` (a mutex) first and the write lock second, for as short as it can ([`Db::
//! write_state`]). Long index work never holds the write lock: a build (the switch to HNSW, the
//! clean-up of removed vectors, [`Db::rebuild_index`], [`Db::use_model`]) makes a new index
//! from the store with no lock held, catches it up with what writers did meanwhile (once with
//! writers running, then under the writer mutex), and takes the write lock only to move it in;
//! a snapshot save holds the writer mutex and a read lock. Writers wait behind long work on the
//! mutex, never on the `RwLock`, where a waiting writer would queue queries behind it. An insert
//! into an HNSW index (milliseconds a vector) adds its vectors a few at a time and hands the
//! lock to waiting queries in between ([`StateWriter::let_queries_in`]).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, MutexGuard};

use parking_lot::{RwLockReadGuard, RwLockWriteGuard};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::catalogue::{self, Catalogue};
use super::{
    embed, prepare_stored, snapshot_lag_limit, Db, IndexInfo, IndexSource, Model, Stale, State,
    AUTO_EF_SEARCH, AUTO_HNSW_M, EMBED_BATCH, MAX_DEAD_SHARE,
};
use crate::error::{Error, Result};
use crate::index::snapshot::{self, Unusable};
use crate::index::{Shape, VectorIndex};
use crate::options::{IndexKind, Options};
use crate::store::Store;
use crate::ImageId;

/// The state's write lock, held with the writer mutex (dropped first).
pub(super) struct StateWriter<'a> {
    state: RwLockWriteGuard<'a, State>,
    _writer: MutexGuard<'a, ()>,
}

impl Deref for StateWriter<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for StateWriter<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl StateWriter<'_> {
    /// Hands the write lock to the queries waiting for it, if any, and takes it back after
    /// them (parking_lot's fair hand-off); the writer mutex stays held, so no other change
    /// comes in between.
    pub(super) fn let_queries_in(&mut self) {
        RwLockWriteGuard::bump(&mut self.state);
    }
}

fn poisoned() -> Error {
    Error::Poisoned("a thread panicked while changing the index".into())
}

impl Db {
    /// The writer mutex: held by every change to the state, and by long work that needs the
    /// state to stand still.
    pub(super) fn writer(&self) -> Result<MutexGuard<'_, ()>> {
        self.inner.writer.lock().map_err(|_| poisoned())
    }

    pub(super) fn read_state(&self) -> Result<RwLockReadGuard<'_, State>> {
        Ok(self.inner.state.read())
    }

    /// The state, for a short change.
    pub(super) fn write_state(&self) -> Result<StateWriter<'_>> {
        let writer = self.writer()?;
        self.lock_state(writer)
    }

    /// The state's write lock, for a holder of the writer mutex.
    pub(super) fn lock_state<'a>(&'a self, writer: MutexGuard<'a, ()>) -> Result<StateWriter<'a>> {
        let state = self.inner.state.write();
        Ok(StateWriter {
            state,
            _writer: writer,
        })
    }

    /// Writes the index snapshot if the index changed since the last one, and `catalogue.bin`
    /// if the catalogue did, under a read lock (queries go on; writers wait). Best effort: a
    /// failure is kept in `index_info().snapshot_error` and the next call tries again; only a
    /// poisoned lock, or a store that cannot be flushed, is an error.
    pub(super) fn save_snapshot(&self) -> Result<()> {
        self.save_snapshot_if(|_| true, true)
    }

    /// After an insert: saves the snapshot when the index holds [`snapshot_lag_limit`] more
    /// vectors than the one on disk. Best effort, as [`Db::save_snapshot`]; the insert is
    /// done whatever happens here.
    pub(super) fn maybe_snapshot(&self) {
        let lagging = |state: &State| {
            self.inner.options.snapshot
                && state.index.len().saturating_sub(state.saved_len)
                    >= snapshot_lag_limit(state.index.len())
        };
        if self.read_state().is_ok_and(|s| lagging(&s)) {
            // Checked again under the writer mutex: another insert may have saved meanwhile.
            let _ = self.save_snapshot_if(lagging, false);
        }
    }

    /// [`Db::save_snapshot`] if `wanted` says so of the state, under the writer mutex;
    /// `catalogue.bin` too if `with_catalogue`.
    fn save_snapshot_if(
        &self,
        wanted: impl Fn(&State) -> bool,
        with_catalogue: bool,
    ) -> Result<()> {
        let writer = self.writer()?;
        let (index_saved, catalogue_saved) = {
            let state = self.read_state()?;
            if !wanted(&state) {
                return Ok(());
            }
            let index_saved = (state.dirty && self.inner.options.snapshot).then(|| {
                snapshot::save(&self.inner.dir, &state.index, state.model.version)
                    .map(|()| state.index.len())
            });
            let catalogue_saved = if with_catalogue && state.catalogue.dirty {
                // The file must not claim writes the store could still lose.
                self.durable_write_always()?;
                let (id_bound, seen) = self.inner.pending.marks(&self.inner.store);
                Some(
                    catalogue::save(&self.inner.dir, &state.catalogue, id_bound, seen)
                        .map(|()| seen),
                )
            } else {
                None
            };
            (index_saved, catalogue_saved)
        };
        let mut state = self.lock_state(writer)?;
        if index_saved.is_none() && catalogue_saved.is_none() {
            return Ok(());
        }
        let mut error = None;
        if let Some(saved) = index_saved {
            match saved {
                Ok(len) => {
                    state.dirty = false;
                    state.saved_len = len;
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        let mut trim = None;
        if let Some(saved) = catalogue_saved {
            match saved {
                Ok(seen) => {
                    state.catalogue.dirty = false;
                    trim = Some(seen);
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        state.index_info.snapshot_error = error;
        drop(state);
        if let Some(seen) = trim {
            // What the file has seen need not stay in the log (best effort: a longer log only
            // costs the next open a few reads).
            let _ = self.inner.store.trim_changes(seen);
        }
        Ok(())
    }

    /// After a write: rebuilds the index when `IndexKind::Auto` crossed the exact limit or
    /// removed vectors passed [`MAX_DEAD_SHARE`], unless a rebuild is running already. The
    /// write stays done whatever happens here: a failure is kept in
    /// `index_info().rebuild_error`, and the next write tries again.
    pub(super) fn maybe_rebuild(&self) -> Result<()> {
        self.maybe_compact()?;
        let (model, reason) = {
            let state = self.read_state()?;
            let want = desired_shape(&self.inner.options, state.catalogue.len());
            if want != state.index.shape() {
                let reason = format!(
                    "{} images: {} index",
                    state.catalogue.len(),
                    kind_name(want)
                );
                (state.model.clone(), reason)
            } else if state.index.dead_share() > MAX_DEAD_SHARE {
                let reason = format!(
                    "removed images passed {:.0} % of the index",
                    MAX_DEAD_SHARE * 100.0
                );
                (state.model.clone(), reason)
            } else {
                return Ok(());
            }
        };
        // One build at a time: a running one covers this write too.
        let _one = match self.inner.rebuilds.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(poisoned()),
        };
        let result = self.rebuild(&model, false, reason);
        let error = result.err().map(|e| e.to_string());
        self.write_state()?.index_info.rebuild_error = error;
        Ok(())
    }

    /// The lock that keeps index builds one at a time, for [`Db::rebuild`]'s callers.
    pub(super) fn one_build(&self) -> Result<MutexGuard<'_, ()>> {
        self.inner.rebuilds.lock().map_err(|_| poisoned())
    }

    /// Builds a new index of `model` from the store, off the query path (see the module
    /// docs), and moves it in. With `switch`, `model` becomes the active model in the same
    /// step (recorded durably first); without, a build whose model stopped being the active
    /// one meanwhile is dropped.
    pub(super) fn rebuild(&self, model: &Arc<Model>, switch: bool, reason: String) -> Result<()> {
        /// Clears `Inner::building` however the build ends.
        struct Building<'a>(&'a AtomicBool);
        impl Drop for Building<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        self.inner.building.store(true, Ordering::Release);
        let _building = Building(&self.inner.building);
        let started = Instant::now();
        let store = &self.inner.store;
        let live = {
            let _writer = self.writer()?;
            self.read_state()?.catalogue.ids_only()
        };
        let mut index =
            crate::index::leaving_a_core(|| build_index(store, model, &self.inner.options, &live))?;
        drop(live);
        // What writers did during the build: once while they go on, then (less by then) with
        // them waiting.
        // A build whose model stopped being the active one is of no use: dropped.
        let changes = {
            let _writer = self.writer()?;
            self.changes_since(&index, model, switch)?
        };
        let Some((missing, gone)) = changes else {
            return Ok(());
        };
        index.remove(&gone)?;
        add_from_store(store, model, &mut index, &missing)?;
        let writer = self.writer()?;
        let Some((missing, gone)) = self.changes_since(&index, model, switch)? else {
            return Ok(());
        };
        index.remove(&gone)?;
        add_from_store(store, model, &mut index, &missing)?;
        if switch {
            store.set_active_model(model.version)?;
            self.durable_write_always()?;
        }
        let mut state = self.lock_state(writer)?;
        state.index_info = IndexInfo {
            kind: kind_name(index.shape()),
            len: index.len(),
            dim: index.dim(),
            source: IndexSource::Rebuilt { reason },
            open_seconds: started.elapsed().as_secs_f64(),
            snapshot_error: state.index_info.snapshot_error.take(),
            rebuild_error: None,
        };
        state.model = model.clone();
        *self.inner.active.lock() = model.clone();
        state.index = index;
        state.dirty = true;
        Ok(())
    }

    /// Ids stored but not in `index`, and ids in `index` no longer stored; `None` when
    /// `model` is no longer the active model (and is not being switched to).
    #[allow(clippy::type_complexity)]
    fn changes_since(
        &self,
        index: &VectorIndex,
        model: &Model,
        switch: bool,
    ) -> Result<Option<(Vec<u64>, Vec<ImageId>)>> {
        let state = self.read_state()?;
        if !switch && state.model.version != model.version {
            return Ok(None);
        }
        let missing = state
            .catalogue
            .ids()
            .filter(|id| !index.ids().contains(id))
            .collect();
        let gone = index
            .ids()
            .iter()
            .filter(|id| !state.catalogue.contains(**id))
            .map(|id| ImageId(*id))
            .collect();
        Ok(Some((missing, gone)))
    }
}

pub(super) fn kind_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Flat => "exact",
        Shape::Hnsw { .. } => "hnsw",
    }
}

pub(super) fn desired_shape(options: &Options, len: usize) -> Shape {
    match &options.index {
        IndexKind::Exact => Shape::Flat,
        IndexKind::Hnsw { m, .. } => Shape::Hnsw { m: *m },
        IndexKind::Auto if len > options.exact_limit => Shape::Hnsw { m: AUTO_HNSW_M },
        IndexKind::Auto => Shape::Flat,
    }
}

pub(super) fn ef_search(options: &Options) -> u32 {
    match &options.index {
        IndexKind::Hnsw { ef_search, .. } => *ef_search,
        _ => AUTO_EF_SEARCH,
    }
}
/// Catches up the snapshot `read` at open (`None`: snapshots are off) with the catalogue, or
/// rebuilds.
pub(super) fn open_index(
    store: &Store,
    model: &Model,
    options: &Options,
    live: &Catalogue,
    stale: Option<Stale>,
    read: Option<std::result::Result<VectorIndex, Unusable>>,
) -> Result<(VectorIndex, IndexSource)> {
    let reason = match (stale, read) {
        (Some(stale), _) => stale.reason,
        (None, None) => "snapshots are off".to_string(),
        (None, Some(Ok(mut index))) => {
            if index.shape() != desired_shape(options, live.len()) {
                "the index shape options changed".to_string()
            } else {
                index.set_ef_search(ef_search(options))?;
                let missing: Vec<u64> = live.ids().filter(|id| !index.ids().contains(id)).collect();
                // Every live id is in the index: with as many ids, it holds no others.
                let extra: Vec<ImageId> = if missing.is_empty() && index.ids().len() == live.len() {
                    Vec::new()
                } else {
                    index
                        .ids()
                        .iter()
                        .filter(|id| !live.contains(**id))
                        .map(|id| ImageId(*id))
                        .collect()
                };
                if missing.is_empty() && extra.is_empty() {
                    return Ok((index, IndexSource::Snapshot));
                }
                index.remove(&extra)?;
                add_from_store(store, model, &mut index, &missing)?;
                if index.dead_share() <= MAX_DEAD_SHARE {
                    return Ok((
                        index,
                        IndexSource::CaughtUp {
                            added: missing.len(),
                            removed: extra.len(),
                        },
                    ));
                }
                "too many removed vectors in the snapshot".to_string()
            }
        }
        (None, Some(Err(Unusable::Missing))) => "no snapshot".to_string(),
        (None, Some(Err(Unusable::OtherModel))) => "snapshot of another model".to_string(),
        (None, Some(Err(Unusable::Corrupt(why)))) => format!("corrupt snapshot: {why}"),
    };
    let index = build_index(store, model, options, live)?;
    Ok((index, IndexSource::Rebuilt { reason }))
}

/// Adds the stored embeddings of `ids` to `index`, embedding (and storing) any that are
/// missing from the store: those are read and decoded on every core, a batch at a time.
pub(super) fn add_from_store(
    store: &Store,
    model: &Model,
    index: &mut VectorIndex,
    ids: &[u64],
) -> Result<()> {
    const CHUNK: usize = 4096;
    for chunk in ids.chunks(CHUNK) {
        let mut got_ids = Vec::with_capacity(chunk.len());
        let mut vectors = Vec::with_capacity(chunk.len());
        let mut missing = Vec::new();
        for id in chunk {
            let id = ImageId(*id);
            match store.embedding(model.version, id, model.dim())? {
                Some(v) => {
                    got_ids.push(id);
                    vectors.push(v);
                }
                None => missing.push(id),
            }
        }
        for part in missing.chunks(EMBED_BATCH * 4) {
            let mut thumbs = Vec::with_capacity(part.len());
            for (id, t) in part
                .iter()
                .zip(prepare_stored(store, &model.spec.input, part))
            {
                thumbs.push(t?.ok_or(Error::UnknownImage(*id))?);
            }
            let refs: Vec<_> = thumbs.iter().collect();
            for (id, v) in part.iter().zip(embed(model, &refs)?) {
                store.put_embedding(model.version, *id, &v)?;
                got_ids.push(*id);
                vectors.push(v);
            }
        }
        let flat: Vec<f32> = vectors.concat();
        index.add(&got_ids, &flat)?;
    }
    Ok(())
}

fn build_index(
    store: &Store,
    model: &Model,
    options: &Options,
    live: &Catalogue,
) -> Result<VectorIndex> {
    let shape = desired_shape(options, live.len());
    let mut index = VectorIndex::new(shape, model.spec.metric, model.dim(), ef_search(options))?;
    let mut ids = Vec::new();
    let mut flat = Vec::new();
    let mut seen = crate::index::IdSet::default();
    for item in store.embeddings(model.version, model.dim()) {
        let (id, v) = item?;
        if !live.contains(id.0) {
            continue;
        }
        seen.insert(id.0);
        ids.push(id);
        flat.extend_from_slice(&v);
        if ids.len() == 4096 {
            index.add(&ids, &flat)?;
            ids.clear();
            flat.clear();
        }
    }
    index.add(&ids, &flat)?;
    let missing: Vec<u64> = live.ids().filter(|id| !seen.contains(id)).collect();
    add_from_store(store, model, &mut index, &missing)?;
    Ok(index)
}
