//! Compact vectors: the switch of the active model to a PCA projection of its own vectors
//! ([`crate::Options::compact`]).
//!
//! When a write leaves the database with at least `compact_after` images and the active
//! model's extractor makes more than `compact_dim` dimensions, that write (the one thread
//! doing it; queries and other writes go on):
//!
//! 1. fits a PCA on up to [`FIT_SAMPLE`] stored vectors, spread evenly over the ids;
//! 2. stores a new model version: the same extractor record, its decode policy, and the
//!    projection (`meta/projection`, store format 4), not active;
//! 3. projects every stored vector of the active model into the new version (no image is
//!    decoded again), then builds its index and switches to it in one step, as
//!    [`Db::use_model`] does, embedding any image inserted meanwhile;
//! 4. deletes the old version's full-size vectors. Its record stays: `use_model` on it
//!    embeds every image again.
//!
//! A failure before the switch deletes the new version and leaves the active model as it
//! was; the next write tries again. A version already projected from the active model (left
//! by a crash before the switch, or one the user switched away from with `use_model`) is
//! filled and switched to instead of fitting another. A model change or an index build under
//! way puts compaction off to a later write (the write does not wait for them).

use std::sync::Arc;

use super::models::{model_from_record, project, Compact, Model};
use super::{now_unix, Db};
use crate::error::Result;
use crate::index::projection::{Projection, FIT_SAMPLE};
use crate::preprocess;
use crate::store::ProjectionRecord;
use crate::ImageId;

/// Stored vectors projected and written per step.
const CHUNK: usize = 4096;

impl Db {
    /// Compacts the active model when it is due (see the module docs). The write that called
    /// it stands whatever happens here.
    pub(super) fn maybe_compact(&self) -> Result<()> {
        let options = &self.inner.options;
        let model = {
            let state = self.read_state()?;
            let m = &state.model;
            let due = options.compact_dim > 0
                && m.compact.is_none()
                && m.spec.dim > options.compact_dim
                && state.catalogue.len() >= options.compact_after;
            if !due {
                return Ok(());
            }
            m.clone()
        };
        let Ok(_admin) = self.inner.admin.try_lock() else {
            return Ok(());
        };
        let Ok(_one) = self.inner.rebuilds.try_lock() else {
            return Ok(());
        };
        let result = self.compact(&model);
        let error = result.err().map(|e| format!("compacting the vectors: {e}"));
        self.write_state()?.index_info.rebuild_error = error;
        Ok(())
    }

    /// Steps 1-4 of the module docs, for the active `model`; the caller holds the admin and
    /// build locks.
    fn compact(&self, model: &Arc<Model>) -> Result<()> {
        let store = &self.inner.store;
        let (compacted, reason, fresh) = match self.earlier_compaction(model)? {
            Some(m) => {
                let reason = format!("compact vectors: switched back to model {}", m.version);
                (m, reason, false)
            }
            None => {
                let (m, reason) = self.fit_compaction(model)?;
                (m, reason, true)
            }
        };
        let result = (|| {
            self.project_stored(model, &compacted)?;
            self.durable_write_always()?;
            self.rebuild(&compacted, true, reason)
        })();
        if let Err(e) = result {
            if fresh {
                let _ = store.delete_model(compacted.version);
            }
            return Err(e);
        }
        // The switch is durable: the full-size vectors are no longer searched.
        store.delete_embeddings(model.version)?;
        self.durable_write()?;
        if self.inner.options.snapshot {
            self.save_snapshot()?;
        }
        Ok(())
    }

    /// A stored version projected from `model` to the configured dimension (the user switched
    /// back to `model`, or a compaction was cut short): switched to again rather than fitted
    /// anew.
    fn earlier_compaction(&self, model: &Model) -> Result<Option<Arc<Model>>> {
        let store = &self.inner.store;
        let dim_out = self.inner.options.compact_dim;
        let mut earlier = None;
        for v in store.model_versions()? {
            if v != model.version
                && store
                    .projection(v)?
                    .is_some_and(|p| p.from_model == model.version && p.dim_out as usize == dim_out)
            {
                earlier = Some(v);
            }
        }
        let Some(v) = earlier else {
            return Ok(None);
        };
        let record = store.model(v)?.ok_or(crate::Error::UnknownModel(v))?;
        let (compacted, _) = model_from_record(store, &self.inner.registry, v, record, None)?;
        Ok(Some(Arc::new(compacted)))
    }

    /// Fits a PCA on up to [`FIT_SAMPLE`] of `model`'s stored vectors, spread evenly over the
    /// ids, and stores the new version (record, decode policy, projection; not active). Returns
    /// it and the reason the switch will give.
    fn fit_compaction(&self, model: &Model) -> Result<(Arc<Model>, String)> {
        let store = &self.inner.store;
        let dim_out = self.inner.options.compact_dim;
        let ids = self.live_ids()?;
        let step = ids.len().div_ceil(FIT_SAMPLE).max(1);
        let mut sample = Vec::new();
        let mut fitted_on = 0u64;
        for id in ids.iter().step_by(step) {
            if let Some(v) = store.embedding(model.version, ImageId(*id), model.dim())? {
                sample.extend_from_slice(&v);
                fitted_on += 1;
            }
        }
        drop(ids);
        let projection =
            crate::index::leaving_a_core(|| Projection::fit(&sample, model.spec.dim, dim_out))?;
        drop(sample);

        let version = store.model_versions()?.into_iter().max().unwrap_or(0) + 1;
        let mut record = model.record.clone();
        record.created_unix = now_unix();
        let (matrix, bias) = projection.parts()?;
        let projection_record = ProjectionRecord {
            format: 1,
            from_model: model.version,
            fitted_on,
            dim_in: model.spec.dim as u32,
            dim_out: dim_out as u32,
            matrix,
            bias,
            created_unix: record.created_unix,
        };
        // The active model's decode policy is this build's for its input.
        let policy = preprocess::policy(&model.spec.input);
        let stored = (|| {
            store.put_model(version, &record)?;
            store.set_policy(version, &policy)?;
            store.put_projection(version, &projection_record)
        })();
        if let Err(e) = stored {
            let _ = store.delete_model(version);
            return Err(e);
        }
        let compacted = Model {
            version,
            record,
            extractor: model.extractor.clone(),
            spec: model.spec.clone(),
            compact: Some(Compact {
                projection: Arc::new(projection),
                from_model: model.version,
            }),
        };
        let reason = format!(
            "compact vectors: {} to {dim_out} dimensions (PCA on {fitted_on} stored vectors)",
            model.spec.dim
        );
        Ok((Arc::new(compacted), reason))
    }

    /// Writes `to`'s projection of every vector stored under `from`.
    fn project_stored(&self, from: &Model, to: &Model) -> Result<()> {
        let store = &self.inner.store;
        let Some(compact) = &to.compact else {
            return Ok(());
        };
        let mut ids = Vec::with_capacity(CHUNK);
        let mut rows = Vec::with_capacity(CHUNK * from.dim());
        let write = |ids: &mut Vec<ImageId>, rows: &mut Vec<f32>| -> Result<()> {
            let projected = project(&compact.projection, to.spec.metric, rows)?;
            for (id, v) in ids.iter().zip(projected) {
                store.put_embedding(to.version, *id, &v)?;
            }
            ids.clear();
            rows.clear();
            Ok(())
        };
        for item in store.embeddings(from.version, from.dim()) {
            let (id, v) = item?;
            ids.push(id);
            rows.extend_from_slice(&v);
            if ids.len() == CHUNK {
                write(&mut ids, &mut rows)?;
            }
        }
        write(&mut ids, &mut rows)
    }
}
