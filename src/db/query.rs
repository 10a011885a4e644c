//! Queries: nearest neighbours of an image, a stored image or many images, with label and
//! metadata filters and re-ranking by a pair scorer.

use std::collections::BTreeSet;
use std::sync::Arc;

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::{Metric, PairScorer};

use super::{embed, meta, Db, Metadata, Model, State};
use crate::error::{Error, Result};
use crate::index::Allow;
use crate::preprocess;
use crate::ImageId;

/// One result of a nearest-neighbour query.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The image found.
    pub id: ImageId,
    /// Its distance to the query under the model's metric (`1 - cos` for cosine, squared
    /// Euclidean for L2): smaller is more similar.
    pub distance: f32,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// Where it came from, if the insert said ([`crate::ImageMeta::source`]).
    pub source: Option<String>,
    /// Its metadata object, if it has one.
    pub metadata: Option<Metadata>,
    /// P(same) from the pair scorer when the query re-ranked ([`Query::rerank`]); hits are
    /// then ordered by it, highest first.
    pub score: Option<f32>,
}

/// Re-ranking of a query's candidates by a pair scorer.
#[derive(Debug, Clone)]
pub struct Rerank {
    /// The scorer; its dimension must be the active model's.
    pub scorer: Arc<dyn PairScorer>,
    /// How many nearest candidates the index returns for the scorer to re-order (at least k).
    pub candidates: usize,
}

/// What a query asks for besides the image: how many results and which labels.
///
/// ```
/// let q = lookalike::Query::k(5).labels(["sneaker", "sandal"]);
/// assert_eq!(q.k, 5);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// How many hits to return (at most; fewer only if fewer images match).
    pub k: usize,
    /// Only images with one of these labels; `None` for every image.
    pub labels: Option<BTreeSet<String>>,
    /// Only images whose metadata has each of these keys equal to the value (a string,
    /// number or boolean, compared as JSON text: `1` and `1.0` differ).
    pub metadata: Vec<(String, serde_json::Value)>,
    /// Re-order the nearest `candidates` by a pair scorer's P(same).
    pub rerank: Option<Rerank>,
}

impl Query {
    /// The `k` nearest images, whatever their label.
    pub fn k(k: usize) -> Self {
        Query {
            k,
            ..Query::default()
        }
    }

    /// Takes the `candidates` nearest images (at least `k`) and returns the `k` that `scorer`
    /// finds most likely to show the same thing as the query.
    pub fn rerank(mut self, scorer: Arc<dyn PairScorer>, candidates: usize) -> Self {
        self.rerank = Some(Rerank { scorer, candidates });
        self
    }

    /// Restricts results to images carrying any of `labels`. The filter is applied during the
    /// search, so `k` hits come back whenever `k` matching images exist.
    pub fn labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels = Some(labels.into_iter().map(Into::into).collect());
        self
    }

    /// Restricts results to images whose metadata has `key` equal to `value` (a string,
    /// number or boolean; see [`crate::ImageMeta::metadata`] for what is indexed). Several calls
    /// must all match; with [`Query::labels`] both apply. Filtered during the search, like
    /// labels.
    ///
    /// ```
    /// let q = lookalike::Query::k(5).metadata("colour", "red");
    /// assert_eq!(q.metadata.len(), 1);
    /// ```
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

pub(super) fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => (1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()).max(0.0),
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
    }
}

impl Db {
    /// The `k` images nearest to the encoded image `bytes`, best first.
    pub fn nearest(&self, bytes: &[u8], k: usize) -> Result<Vec<Hit>> {
        self.nearest_with(bytes, &Query::k(k))
    }

    /// The `k` stored images nearest to the stored image `id`, best first, not counting `id`
    /// itself.
    pub fn nearest_to(&self, id: ImageId, k: usize) -> Result<Vec<Hit>> {
        self.nearest_to_with(id, &Query::k(k))
    }

    /// [`Db::nearest`] with a label filter.
    pub fn nearest_with(&self, bytes: &[u8], query: &Query) -> Result<Vec<Hit>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        self.with_model_retry(|model| {
            let thumb = preprocess::prepare(bytes, self.limits(), &model.spec.input)?;
            let vector = embed(model, &[&thumb])?.pop().unwrap_or_default();
            self.search(model, &vector, query, None)
        })
    }

    /// [`Db::nearest_with`] for many query images: decoded and embedded on every core (as
    /// [`Db::insert_images`] does), then searched. One outcome per image, in order: its hits,
    /// or why the image was refused. The outer error is for failures that are not an image's
    /// fault (the extractor, the index).
    pub fn nearest_batch(&self, images: &[&[u8]], query: &Query) -> Result<Vec<Result<Vec<Hit>>>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        let mut tries = 0;
        loop {
            let model = self.model();
            let embedded = self.embed_encoded(&model, images)?;
            let mut out = Vec::with_capacity(images.len());
            let mut changed = false;
            for e in embedded {
                match e.map(|e| self.search(&model, &e.vector, query, None)) {
                    Ok(Err(Error::ModelChanged)) => {
                        changed = true;
                        break;
                    }
                    Ok(hits) => out.push(hits),
                    Err(e) => out.push(Err(e)),
                }
            }
            if !changed {
                return Ok(out);
            }
            if tries == 3 {
                return Err(Error::ModelChanged);
            }
            tries += 1;
        }
    }

    /// Runs `query` with the active model; a model switch between getting the query's vector
    /// and searching makes the search refuse ([`Error::ModelChanged`]: it would mix models),
    /// and the query runs again with the new model (up to three times).
    fn with_model_retry(&self, query: impl Fn(&Model) -> Result<Vec<Hit>>) -> Result<Vec<Hit>> {
        let mut tries = 0;
        loop {
            match query(&self.model()) {
                Err(Error::ModelChanged) if tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// [`Db::nearest_to`] with a label filter.
    pub fn nearest_to_with(&self, id: ImageId, query: &Query) -> Result<Vec<Hit>> {
        if query.k == 0 {
            return Err(Error::ZeroK);
        }
        self.with_model_retry(|model| {
            if !self.read_state()?.catalogue.contains(id.0) {
                return Err(Error::UnknownImage(id));
            }
            let vector = self
                .inner
                .store
                .embedding(model.version, id, model.dim())?
                .ok_or(Error::UnknownImage(id))?;
            self.search(model, &vector, query, Some(id))
        })
    }

    fn search(
        &self,
        model: &Model,
        vector: &[f32],
        query: &Query,
        exclude: Option<ImageId>,
    ) -> Result<Vec<Hit>> {
        let state = self.read_state()?;
        if state.model.version != model.version {
            return Err(Error::ModelChanged);
        }
        let allowed = self.allowed(&state, query, exclude)?;
        let available = match &allowed {
            Some(a) => a.len(),
            None => state.catalogue.len() - usize::from(exclude.is_some()),
        };
        if available == 0 {
            return Err(Error::Empty {
                filter: describe_filter(query),
            });
        }
        let want = query.k.min(available);
        if let Some(r) = &query.rerank {
            if r.scorer.dim() != model.dim() {
                return Err(Error::DimensionMismatch {
                    what: format!("pair scorer {} against the active model", r.scorer.name()),
                    expected: model.dim(),
                    got: r.scorer.dim(),
                });
            }
        }
        let shortlist = match &query.rerank {
            Some(r) => r.candidates.max(want).min(available),
            None => want,
        };
        let fetch = shortlist + usize::from(exclude.is_some());
        let allow = match &allowed {
            Some(a) => Allow::Only(a),
            None => Allow::All,
        };
        let mut found: Vec<_> = state
            .index
            .search(vector, fetch, allow)?
            .into_iter()
            .filter(|n| Some(n.id) != exclude)
            .collect();
        found.truncate(shortlist);
        if found.len() < shortlist {
            // An approximate graph search can miss matches under a selective filter: scan the
            // allowed embeddings exactly instead.
            let candidates: Vec<u64> = match allowed {
                Some(a) => a,
                None => state
                    .catalogue
                    .ids()
                    .filter(|id| Some(ImageId(*id)) != exclude)
                    .collect(),
            };
            found = self.exact_scan(model, vector, &candidates, shortlist)?;
        }
        let scores = match &query.rerank {
            Some(r) => Some(self.pair_scores(model, r.scorer.as_ref(), vector, &found)?),
            None => None,
        };
        let mut hits: Vec<Hit> = found
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                // Source and metadata from the store (the catalogue in memory has labels
                // only, and knows which entries have neither: those are not read).
                let meta = if state.catalogue.has_details(n.id.0) {
                    self.inner
                        .store
                        .entry(n.id)
                        .ok()
                        .flatten()
                        .map(|e| meta::meta_of(&e))
                        .unwrap_or_default()
                } else {
                    crate::ImageMeta::default()
                };
                Hit {
                    id: n.id,
                    distance: n.distance,
                    label: state.catalogue.label(n.id.0).flatten().map(str::to_string),
                    source: meta.source,
                    metadata: meta.metadata,
                    score: scores.as_ref().map(|s| s[i]),
                }
            })
            .collect();
        if scores.is_some() {
            hits.sort_by(|a, b| {
                b.score
                    .unwrap_or(0.0)
                    .total_cmp(&a.score.unwrap_or(0.0))
                    .then(a.distance.total_cmp(&b.distance))
            });
        }
        hits.truncate(want);
        Ok(hits)
    }

    /// The ids a query's label and metadata filters allow (`None`: every id), without
    /// `exclude`, ascending.
    fn allowed(
        &self,
        state: &State,
        query: &Query,
        exclude: Option<ImageId>,
    ) -> Result<Option<Vec<u64>>> {
        let mut allowed: Option<BTreeSet<u64>> = query.labels.as_ref().map(|set| {
            set.iter()
                .filter_map(|l| state.catalogue.with_label(l))
                .flat_map(|ids| ids.iter().copied())
                .collect()
        });
        for (key, value) in &query.metadata {
            let ids = self.inner.store.find_by_meta(key, value).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot filter on metadata {key:?} = {value}: only strings, numbers and \
                     booleans of up to 256 bytes (and keys of up to 256 bytes) are indexed"
                ))
            })??;
            let ids: BTreeSet<u64> = ids
                .into_iter()
                // Committed by an insert that has not reached the catalogue yet: not yet.
                .filter(|id| state.catalogue.contains(*id))
                .collect();
            allowed = Some(match allowed {
                Some(a) => a.intersection(&ids).copied().collect(),
                None => ids,
            });
        }
        Ok(allowed.map(|a| {
            a.into_iter()
                .filter(|id| Some(ImageId(*id)) != exclude)
                .collect()
        }))
    }

    /// P(same) of the query against each found image.
    fn pair_scores(
        &self,
        model: &Model,
        scorer: &dyn PairScorer,
        query: &[f32],
        found: &[crate::index::Neighbour],
    ) -> Result<Vec<f32>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let dim = model.dim();
        let mut others = Vec::with_capacity(found.len() * dim);
        for n in found {
            let v = self
                .inner
                .store
                .embedding(model.version, n.id, dim)?
                .ok_or(Error::UnknownImage(n.id))?;
            others.extend_from_slice(&v);
        }
        let name = scorer.name().to_string();
        let to_plugin = |e: lookalike_plugin::candle_core::Error| Error::plugin(&name, e.into());
        let b = Tensor::from_vec(others, (found.len(), dim), &Device::Cpu).map_err(to_plugin)?;
        let a = Tensor::from_slice(query, (1, dim), &Device::Cpu)
            .and_then(|q| q.broadcast_as((found.len(), dim)))
            .and_then(|q| q.contiguous())
            .map_err(to_plugin)?;
        let p = scorer.score(&a, &b).map_err(|e| Error::plugin(&name, e))?;
        p.to_vec1::<f32>().map_err(to_plugin)
    }

    /// P(same) that `scorer` gives stored images `a` and `b`, from their embeddings under the
    /// active model.
    pub fn same(&self, a: ImageId, b: ImageId, scorer: &dyn PairScorer) -> Result<f32> {
        let model = self.model();
        if scorer.dim() != model.dim() {
            return Err(Error::DimensionMismatch {
                what: format!("pair scorer {} against the active model", scorer.name()),
                expected: model.dim(),
                got: scorer.dim(),
            });
        }
        let va = self.embedding(a)?;
        let hit = crate::index::Neighbour {
            id: b,
            distance: 0.0,
        };
        if !self.read_state()?.catalogue.contains(b.0) {
            return Err(Error::UnknownImage(b));
        }
        Ok(self.pair_scores(&model, scorer, &va, &[hit])?[0])
    }

    fn exact_scan(
        &self,
        model: &Model,
        query: &[f32],
        ids: &[u64],
        k: usize,
    ) -> Result<Vec<crate::index::Neighbour>> {
        let mut scored = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self
                .inner
                .store
                .embedding(model.version, ImageId(*id), model.dim())?
            {
                scored.push(crate::index::Neighbour {
                    id: ImageId(*id),
                    distance: distance(model.spec.metric, query, &v),
                });
            }
        }
        scored.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
        scored.truncate(k);
        Ok(scored)
    }
}

/// A query's filters in words, for [`Error::Empty`].
pub(super) fn describe_filter(query: &Query) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(labels) = &query.labels {
        parts.push(format!(
            "labelled {}",
            labels.iter().cloned().collect::<Vec<_>>().join(" or ")
        ));
    }
    for (k, v) in &query.metadata {
        parts.push(format!("with {k} = {v}"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}
