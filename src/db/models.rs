//! Model versions: the active model, stored versions, switching between them, and embedding
//! images with a model as stored.

use std::path::Path;
use std::sync::Arc;

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::{Extractor, ExtractorSpec, FeaturesId, InputSpec, Metric};

use super::{l2_normalise, now_unix, ContentHash, Db, EMBED_BATCH};
use crate::error::{Error, Result};
use crate::index::projection::Projection;
use crate::index::snapshot;
use crate::options::Options;
use crate::preprocess;
use crate::registry::Registry;
use crate::store::{ModelRecord, Store};
use crate::ImageId;

/// A model version: which extractor, how configured, what it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The version number (1 for the model a database was created with).
    pub version: u32,
    /// The extractor plugin's registry name.
    pub extractor: String,
    /// The plugin's configuration string.
    pub config: String,
    /// Dimension of the vectors stored and searched: the extractor's own
    /// ([`ModelInfo::extractor_dim`]), or the projection's for a compacted model.
    pub dim: usize,
    /// Dimension of the extractor's output.
    pub extractor_dim: usize,
    /// For a model whose vectors are stored through a PCA projection (compact vectors, see
    /// [`crate::Options::compact`]): the model version it was fitted on and projected from.
    pub compacted_from: Option<u32>,
    /// Distance metric.
    pub metric: Metric,
    /// BLAKE3 of its weights (safetensors) as stored; `None` for a training-free extractor.
    /// Tells whether a weights file is the one a model runs.
    pub weights: Option<ContentHash>,
}

#[derive(Debug)]
pub(super) struct Model {
    pub(super) version: u32,
    pub(super) record: ModelRecord,
    pub(super) extractor: Arc<dyn Extractor>,
    pub(super) spec: ExtractorSpec,
    /// The projection its vectors are stored through (compact vectors), if any.
    pub(super) compact: Option<Compact>,
}

/// A model's projection to compact vectors, and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Compact {
    pub(super) projection: Arc<Projection>,
    pub(super) from_model: u32,
}

impl Model {
    pub(super) fn info(&self) -> ModelInfo {
        ModelInfo {
            version: self.version,
            extractor: self.record.plugin.clone(),
            config: self.record.config.clone(),
            dim: self.dim(),
            extractor_dim: self.spec.dim,
            compacted_from: self.compact.as_ref().map(|c| c.from_model),
            metric: self.spec.metric,
            weights: weights_hash(&self.record),
        }
    }

    /// Dimension of the vectors stored and searched.
    pub(super) fn dim(&self) -> usize {
        match &self.compact {
            Some(c) => c.projection.dim_out(),
            None => self.spec.dim,
        }
    }
}

pub(super) fn weights_hash(record: &ModelRecord) -> Option<ContentHash> {
    (!record.weights.is_empty()).then(|| ContentHash::of(&record.weights))
}

pub(super) fn metric_from_str(s: &str, version: u32) -> Result<Metric> {
    match s {
        "cosine" => Ok(Metric::Cosine),
        "l2" => Ok(Metric::L2),
        other => Err(Error::corrupt(
            "model",
            version,
            format!("unknown metric {other:?}"),
        )),
    }
}

impl Db {
    /// Every stored model version, oldest first; the active one is [`Db::active_model`].
    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        let mut out = Vec::new();
        for version in self.inner.store.model_versions()? {
            if let Some(r) = self.inner.store.model(version)? {
                let projection = self.inner.store.projection(version)?;
                out.push(ModelInfo {
                    version,
                    extractor: r.plugin.clone(),
                    config: r.config.clone(),
                    dim: projection.as_ref().map_or(r.dim, |p| p.dim_out) as usize,
                    extractor_dim: r.dim as usize,
                    compacted_from: projection.map(|p| p.from_model),
                    metric: metric_from_str(&r.metric, version)?,
                    weights: weights_hash(&r),
                });
            }
        }
        Ok(out)
    }

    /// Makes model `version` the active one: embeds any image it has no embedding for, builds
    /// its index, then switches in one step (queries see the old model and index, or the new
    /// ones, never a mix). The choice is durable.
    pub fn use_model(&self, version: u32) -> Result<()> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        if self.model().version == version {
            return Ok(());
        }
        let record = self
            .inner
            .store
            .model(version)?
            .ok_or(Error::UnknownModel(version))?;
        // The snapshot on disk is the active model's, not this one's: it stays.
        let (model, _) = model_from_record(
            &self.inner.store,
            &self.inner.registry,
            version,
            record,
            None,
        )?;
        // Embedded and indexed off the query path: queries keep running on the old model.
        let _one = self.one_build()?;
        self.rebuild(
            &Arc::new(model),
            true,
            format!("switched to model {version}"),
        )?;
        if self.inner.options.snapshot {
            self.save_snapshot()?;
        }
        Ok(())
    }

    /// Deletes model version `version` and its embeddings. The active model cannot be
    /// deleted ([`Error::ActiveModel`]).
    pub fn delete_model(&self, version: u32) -> Result<()> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        if self.model().version == version {
            return Err(Error::ActiveModel(version));
        }
        if self.inner.store.model(version)?.is_none() {
            return Err(Error::UnknownModel(version));
        }
        self.inner.store.delete_model(version)?;
        self.durable_write()
    }

    /// The active model's stored weights (safetensors; empty for a training-free extractor).
    pub(crate) fn active_weights(&self) -> Vec<u8> {
        self.model().record.weights.clone()
    }

    /// The active model's stored embeddings of `ids` (missing ones are skipped).
    pub(crate) fn active_embeddings(&self, ids: &[ImageId]) -> Result<Vec<Stored>> {
        self.embeddings_of(&self.model(), ids)
    }

    /// `model`'s stored embeddings of `ids` (missing ones are skipped).
    fn embeddings_of(&self, model: &Model, ids: &[ImageId]) -> Result<Vec<Stored>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self
                .inner
                .store
                .embedding(model.version, *id, model.dim())?
            {
                out.push((*id, v));
            }
        }
        Ok(out)
    }

    /// The active model's stored embeddings of `ids` (missing ones skipped) when they are the
    /// features `id` names for images decoded for `input` (see [`stores_features`]); `None`
    /// when they are not.
    pub(crate) fn stored_features(
        &self,
        id: Option<FeaturesId>,
        input: &InputSpec,
        ids: &[ImageId],
    ) -> Result<Option<Vec<Stored>>> {
        let model = self.model();
        if !stores_features(&model, id, input) {
            return Ok(None);
        }
        self.embeddings_of(&model, ids).map(Some)
    }

    /// Stores a new model version (not active): its record, then an embedding of every stored
    /// image under it, in batches; `progress(done, total)` after each batch, and `cancelled()`
    /// checked between batches (a cancelled install deletes what it wrote). An extractor
    /// derived from the active model's features ([`Extractor::derived_from`]) gets its
    /// embeddings from the active model's stored ones, without decoding the images.
    pub(crate) fn install_model(
        &self,
        record: ModelRecord,
        extractor: Arc<dyn Extractor>,
        progress: &mut dyn FnMut(usize, usize),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Installed> {
        self.check_poisoned()?;
        let _admin = self.admin()?;
        let version = self
            .inner
            .store
            .model_versions()?
            .into_iter()
            .max()
            .unwrap_or(0)
            + 1;
        let spec = extractor.spec();
        let model = Model {
            version,
            record: record.clone(),
            extractor,
            spec,
            compact: None,
        };
        self.inner.store.put_model(version, &record)?;
        self.inner
            .store
            .set_policy(version, &preprocess::policy(&model.spec.input))?;
        let active = self.model();
        let from_features = derivable(&active, &model);
        let ids: Vec<ImageId> = self.live_ids()?.into_iter().map(ImageId).collect();
        let result = (|| {
            for (done, chunk) in ids.chunks(EMBED_BATCH * 4).enumerate() {
                if cancelled() {
                    return Err(Error::Cancelled);
                }
                let embedded = if from_features {
                    self.embed_derived(&active, &model, chunk)?
                } else {
                    self.embed_stored(
                        &model.record.plugin,
                        model.extractor.as_ref(),
                        &model.spec,
                        chunk,
                    )?
                };
                for (id, v) in embedded {
                    self.inner.store.put_embedding(version, id, &v)?;
                }
                progress(((done + 1) * EMBED_BATCH * 4).min(ids.len()), ids.len());
            }
            self.durable_write_always()
        })();
        if let Err(e) = result {
            let _ = self.inner.store.delete_model(version);
            return Err(e);
        }
        Ok(Installed {
            version,
            from_features,
        })
    }

    /// `model`'s embeddings of stored images `ids`, computed from `base`'s stored embeddings
    /// ([`Extractor::embed_features`]; see [`derivable`]); an image without one (removed
    /// meanwhile, or never embedded) is decoded and embedded, or skipped if removed.
    fn embed_derived(
        &self,
        base: &Model,
        model: &Model,
        ids: &[ImageId],
    ) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let name = &model.record.plugin;
        let dim = base.dim();
        let stored = self.embeddings_of(base, ids)?;
        let found: std::collections::HashSet<ImageId> = stored.iter().map(|(id, _)| *id).collect();
        let missing: Vec<ImageId> = ids
            .iter()
            .filter(|id| !found.contains(id))
            .copied()
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for part in stored.chunks(EMBED_BATCH) {
            let values: Vec<f32> = part.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let features = Tensor::from_vec(values, (part.len(), dim), &Device::Cpu)
                .map_err(|e| Error::plugin(name, e.into()))?;
            let emb = model
                .extractor
                .embed_features(&features)
                .map_err(|e| Error::plugin(name, e))?;
            let rows = checked_rows(name, &model.spec, &emb, part.len())?;
            out.extend(part.iter().map(|(id, _)| *id).zip(rows));
        }
        out.extend(self.embed_stored(name, model.extractor.as_ref(), &model.spec, &missing)?);
        Ok(out)
    }

    /// Embeds stored images `ids` with `extractor` (declaring `spec`), in batches, reading
    /// and decoding on every core; images removed meanwhile are skipped. `name` labels errors.
    pub(crate) fn embed_stored(
        &self,
        name: &str,
        extractor: &dyn Extractor,
        spec: &ExtractorSpec,
        ids: &[ImageId],
    ) -> Result<Vec<(ImageId, Vec<f32>)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(EMBED_BATCH * 4) {
            let thumbs = prepare_stored(&self.inner.store, &spec.input, chunk);
            let mut got = Vec::with_capacity(chunk.len());
            let mut kept = Vec::with_capacity(chunk.len());
            for (id, t) in chunk.iter().zip(thumbs) {
                if let Some(t) = t? {
                    got.push(*id);
                    kept.push(t);
                }
            }
            let refs: Vec<_> = kept.iter().collect();
            out.extend(
                got.into_iter()
                    .zip(embed_with(name, extractor, spec, &refs)?),
            );
        }
        Ok(out)
    }
}

/// An image's stored embedding.
pub(crate) type Stored = (ImageId, Vec<f32>);

/// What [`Db::install_model`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Installed {
    /// The new model version.
    pub version: u32,
    /// Whether its embeddings were computed from the active model's stored ones.
    pub from_features: bool,
}

/// Whether `model`'s embeddings can be computed from `base`'s stored ones (see
/// [`stores_features`]).
fn derivable(base: &Model, model: &Model) -> bool {
    stores_features(base, model.extractor.derived_from(), &model.spec.input)
}

/// Whether `base`'s stored embeddings are the features `id` names ([`Extractor::features`]
/// of `base`'s extractor answers it) of images decoded for `input` (the decode policy is a
/// function of the input, and embeddings made under an older policy are made again at open),
/// stored as its extractor makes them (no projection).
fn stores_features(base: &Model, id: Option<FeaturesId>, input: &InputSpec) -> bool {
    base.compact.is_none()
        && base.spec.input == *input
        && id.is_some()
        && id == base.extractor.features()
}

/// Reads and decodes stored images `ids` for `input` on every core: `None` for an image
/// removed meanwhile. The encoded bytes live only inside each task.
pub(super) fn prepare_stored(
    store: &Store,
    input: &lookalike_plugin::InputSpec,
    ids: &[ImageId],
) -> Vec<Result<Option<preprocess::Thumb>>> {
    use rayon::prelude::*;
    ids.par_iter().map(|id| store.thumb(*id, input)).collect()
}

/// Embeds decoded images with `extractor` (declaring `spec`) in batches, normalised as stored
/// (L2 for cosine). `name` labels errors.
fn embed_with(
    name: &str,
    extractor: &dyn Extractor,
    spec: &ExtractorSpec,
    images: &[&preprocess::Thumb],
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(EMBED_BATCH) {
        let batch = preprocess::batch_tensor(chunk, &spec.input)?;
        let emb = extractor
            .embed(&batch)
            .map_err(|e| Error::plugin(name, e))?;
        out.extend(checked_rows(name, spec, &emb, chunk.len())?);
    }
    Ok(out)
}

/// The rows of an extractor's output for `n` images, checked (shape `n x dim`, finite values)
/// and normalised as stored (L2 for cosine). `name` labels errors.
fn checked_rows(name: &str, spec: &ExtractorSpec, emb: &Tensor, n: usize) -> Result<Vec<Vec<f32>>> {
    let dims = emb.dims().to_vec();
    if dims != [n, spec.dim] {
        return Err(Error::DimensionMismatch {
            what: format!("output of extractor {name} (shape {dims:?})"),
            expected: spec.dim,
            got: dims.last().copied().unwrap_or(0),
        });
    }
    let mut rows = emb
        .to_dtype(lookalike_plugin::candle_core::DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(|e| Error::plugin(name, e.into()))?;
    for v in &mut rows {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::plugin(
                name,
                lookalike_plugin::PluginError::InvalidSpec(
                    "embedding has NaN or infinite values".into(),
                ),
            ));
        }
        if spec.metric == Metric::Cosine {
            l2_normalise(v);
        }
    }
    Ok(rows)
}

/// Embeds decoded images in batches as `model` stores them: through its projection when it
/// has one (then L2-normalised again for cosine).
pub(super) fn embed(model: &Model, images: &[&preprocess::Thumb]) -> Result<Vec<Vec<f32>>> {
    let vectors = embed_with(
        &model.record.plugin,
        model.extractor.as_ref(),
        &model.spec,
        images,
    )?;
    match &model.compact {
        None => Ok(vectors),
        Some(c) => project(&c.projection, model.spec.metric, &vectors.concat()),
    }
}

/// Projects rows (one after another) and splits them, normalised as stored.
pub(super) fn project(
    projection: &Projection,
    metric: Metric,
    rows: &[f32],
) -> Result<Vec<Vec<f32>>> {
    let out = projection.apply(rows)?;
    Ok(out
        .chunks(projection.dim_out())
        .map(|v| {
            let mut v = v.to_vec();
            if metric == Metric::Cosine {
                l2_normalise(&mut v);
            }
            v
        })
        .collect())
}

/// The stored projection of model `version` (whose extractor makes `dim` dimensions).
fn load_compact(store: &Store, version: u32, dim: usize) -> Result<Option<Compact>> {
    let Some(r) = store.projection(version)? else {
        return Ok(None);
    };
    let key = format!("projection {version}");
    if r.dim_in as usize != dim {
        return Err(Error::corrupt(
            "meta",
            key,
            format!(
                "projects {} dimensions, the extractor makes {dim}",
                r.dim_in
            ),
        ));
    }
    let projection =
        Projection::from_parts(r.dim_in as usize, r.dim_out as usize, r.matrix, r.bias)
            .map_err(|why| Error::corrupt("meta", &key, why))?;
    Ok(Some(Compact {
        projection: Arc::new(projection),
        from_model: r.from_model,
    }))
}

/// The active model (created on first open), and what [`model_from_record`] says about its
/// stored embeddings.
pub(super) fn load_or_create_model(
    dir: &Path,
    store: &Store,
    registry: &Registry,
    options: &Options,
) -> Result<(Model, Option<Stale>)> {
    let version = match store.active_model()? {
        Some(v) => v,
        None => {
            let weights = match &options.extractor_weights {
                Some(path) => Some(std::fs::read(path).map_err(|e| Error::io(path, e))?),
                None => None,
            };
            let extractor = registry.build(
                &options.extractor,
                &options.extractor_config,
                weights.as_deref(),
            )?;
            let spec = extractor.spec();
            let record = ModelRecord {
                format: 1,
                plugin: options.extractor.clone(),
                plugin_version: extractor.version(),
                config: options.extractor_config.clone(),
                dim: spec.dim as u32,
                metric: spec.metric.as_str().to_string(),
                weights: extractor
                    .save_weights()
                    .map_err(|e| Error::plugin(&options.extractor, e))?,
                created_unix: now_unix(),
            };
            store.put_model(1, &record)?;
            store.set_policy(1, &preprocess::policy(&spec.input))?;
            store.set_active_model(1)?;
            store.flush()?;
            let model = Model {
                version: 1,
                record,
                extractor,
                spec,
                compact: None,
            };
            return Ok((model, None));
        }
    };
    let record = store.model(version)?.ok_or_else(|| {
        Error::corrupt(
            "meta",
            "active_model",
            format!("model {version} is not stored"),
        )
    })?;
    model_from_record(store, registry, version, record, Some(dir))
}

/// A stored model whose embeddings were made by other code than this build's: its extractor's
/// code version ([`Extractor::version`]) or the decode policy ([`preprocess::policy`])
/// changed. They were dropped, to be made again from the images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stale {
    /// What changed, for [`IndexSource::Rebuilt`].
    pub(super) reason: String,
}

/// Builds a stored model version's extractor and checks it against the record. When the
/// extractor's code version or the decode policy differs from the recorded one, the same
/// weights no longer embed to the stored vectors: they are derived data, so they are dropped
/// (the index build embeds the images again) and the record takes the new version and policy
/// (see [`forget_embeddings`]). A model stored before policies were recorded has none: its
/// images are embedded again once, on the first open by a build that records them.
pub(super) fn model_from_record(
    store: &Store,
    registry: &Registry,
    version: u32,
    record: ModelRecord,
    snapshot_dir: Option<&Path>,
) -> Result<(Model, Option<Stale>)> {
    let weights = (!record.weights.is_empty()).then_some(record.weights.as_slice());
    let extractor = registry.build(&record.plugin, &record.config, weights)?;
    let spec = extractor.spec();
    let policy = preprocess::policy(&spec.input);
    let stale = if record.plugin_version != extractor.version() {
        Some(Stale {
            reason: format!(
                "the extractor's code changed (version {} to {}): images embedded again",
                record.plugin_version,
                extractor.version()
            ),
        })
    } else if store.policy(version)?.as_deref() != Some(policy.as_str()) {
        Some(Stale {
            reason: "the decode policy changed (orientation, transparency, scaled JPEG \
                     decoding): images embedded again"
                .to_string(),
        })
    } else {
        None
    };
    if spec.dim != record.dim as usize {
        return Err(Error::DimensionMismatch {
            what: format!("extractor {} against stored model {version}", record.plugin),
            expected: record.dim as usize,
            got: spec.dim,
        });
    }
    if spec.metric != metric_from_str(&record.metric, version)? {
        return Err(Error::corrupt(
            "model",
            version,
            format!(
                "stored metric {} but the extractor declares {}",
                record.metric,
                spec.metric.as_str()
            ),
        ));
    }
    let compact = load_compact(store, version, spec.dim)?;
    let mut model = Model {
        version,
        record,
        extractor,
        spec,
        compact,
    };
    if stale.is_some() {
        forget_embeddings(store, snapshot_dir, &mut model, &policy)?;
    }
    Ok((model, stale))
}

/// Drops the stored embeddings of a [`Stale`] model, and the index snapshot in `snapshot_dir`
/// that may hold them, then records the extractor's code version and the decode `policy`. In
/// this order, so that a crash part way leaves the old version or policy recorded and the next
/// open repeats it; a snapshot left behind would be trusted once the new ones are recorded.
fn forget_embeddings(
    store: &Store,
    snapshot_dir: Option<&Path>,
    model: &mut Model,
    policy: &str,
) -> Result<()> {
    if let Some(dir) = snapshot_dir {
        snapshot::remove(dir)?;
    }
    store.delete_embeddings(model.version)?;
    model.record.plugin_version = model.extractor.version();
    store.put_model(model.version, &model.record)?;
    store.set_policy(model.version, policy)?;
    store.flush()
}
