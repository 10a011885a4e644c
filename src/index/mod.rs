//! The vector index: derived data, rebuilt from the embeddings tree whenever in doubt.
//!
//! A FAISS `IndexIDMap` over either a flat index (exact) or HNSW (approximate), built through
//! the index factory. FAISS ids are [`ImageId`]s. Flat indexes drop removed ids at once; HNSW
//! cannot, so removed ids are kept as "dead" and masked out of every search by an id selector
//! until the next rebuild. A snapshot on disk (see [`snapshot`]) makes open fast.

use std::collections::HashSet;

use faiss::index::IndexImpl;
use faiss::{Idx, Index, MetricType};
use lookalike_plugin::Metric;

use crate::error::{Error, Result};
use crate::ImageId;

pub(crate) mod faiss_file;
mod ffi;
pub(crate) mod snapshot;

/// The shape of a built index, stored in the snapshot stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Shape {
    /// Exact search.
    Flat,
    /// HNSW with `m` links per node.
    Hnsw { m: u32 },
}

impl Shape {
    fn factory(self) -> String {
        match self {
            Shape::Flat => "IDMap,Flat".to_string(),
            Shape::Hnsw { m } => format!("IDMap,HNSW{m},Flat"),
        }
    }
}

/// A FAISS index over the embeddings of one model version.
#[derive(Debug)]
pub(crate) struct VectorIndex {
    inner: faiss::index::id_map::IdMap<IndexImpl>,
    shape: Shape,
    metric: Metric,
    dim: usize,
    /// Ids present in FAISS (dead ones included).
    ids: HashSet<u64>,
    /// Ids removed from the store but still in an HNSW graph.
    dead: HashSet<u64>,
    /// Largest id ever added, for sizing selector bitmaps.
    max_id: u64,
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Neighbour {
    pub id: ImageId,
    pub distance: f32,
}

/// Which ids a search may return.
pub(crate) enum Allow<'a> {
    /// Every live id.
    All,
    /// Only these ids (all live).
    Only(&'a [u64]),
}

impl VectorIndex {
    /// An empty index.
    pub fn new(shape: Shape, metric: Metric, dim: usize, ef_search: u32) -> Result<Self> {
        let faiss_metric = match metric {
            Metric::Cosine => MetricType::InnerProduct,
            Metric::L2 => MetricType::L2,
        };
        let dim32 = u32::try_from(dim)
            .map_err(|_| Error::InvalidArgument(format!("dimension {dim} is too large")))?;
        let inner = faiss::index_factory(dim32, shape.factory(), faiss_metric)?.into_id_map()?;
        let mut index = VectorIndex {
            inner,
            shape,
            metric,
            dim,
            ids: HashSet::new(),
            dead: HashSet::new(),
            max_id: 0,
        };
        index.set_ef_search(ef_search)?;
        Ok(index)
    }

    /// Wraps an index read from a snapshot.
    fn from_parts(
        inner: faiss::index::id_map::IdMap<IndexImpl>,
        shape: Shape,
        metric: Metric,
        dim: usize,
    ) -> Self {
        let ids: HashSet<u64> = inner.id_map().iter().filter_map(|i| i.get()).collect();
        let max_id = ids.iter().copied().max().unwrap_or(0);
        VectorIndex {
            inner,
            shape,
            metric,
            dim,
            ids,
            dead: HashSet::new(),
            max_id,
        }
    }

    pub fn set_ef_search(&mut self, ef: u32) -> Result<()> {
        if matches!(self.shape, Shape::Hnsw { .. }) {
            let ps = faiss::index::autotune::ParameterSpace::new()?;
            ps.set_index_parameter(&self.inner, "efSearch", ef)?;
        }
        Ok(())
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of live vectors.
    pub fn len(&self) -> usize {
        self.ids.len() - self.dead.len()
    }

    /// Ids in FAISS, dead ones included.
    pub fn ids(&self) -> &HashSet<u64> {
        &self.ids
    }

    /// Share of dead ids, in `[0, 1]`.
    pub fn dead_share(&self) -> f64 {
        if self.ids.is_empty() {
            0.0
        } else {
            self.dead.len() as f64 / self.ids.len() as f64
        }
    }

    /// Adds vectors (already normalised for cosine). Ids must be new.
    pub fn add(&mut self, ids: &[ImageId], vectors: &[f32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        if vectors.len() != ids.len() * self.dim {
            return Err(Error::DimensionMismatch {
                what: "vectors added to the index".into(),
                expected: self.dim,
                got: vectors.len() / ids.len().max(1),
            });
        }
        let fids: Vec<Idx> = ids.iter().map(|i| Idx::new(i.0)).collect();
        self.inner.add_with_ids(vectors, &fids)?;
        for i in ids {
            self.ids.insert(i.0);
            self.max_id = self.max_id.max(i.0);
        }
        Ok(())
    }

    /// Removes ids: at once from a flat index, as dead ids from HNSW.
    pub fn remove(&mut self, ids: &[ImageId]) -> Result<()> {
        let present: Vec<Idx> = ids
            .iter()
            .filter(|i| self.ids.contains(&i.0) && !self.dead.contains(&i.0))
            .map(|i| Idx::new(i.0))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        match self.shape {
            Shape::Flat => {
                let sel = faiss::selector::IdSelector::batch(&present)?;
                self.inner.remove_ids(&sel)?;
                for i in &present {
                    if let Some(v) = i.get() {
                        self.ids.remove(&v);
                    }
                }
            }
            Shape::Hnsw { .. } => {
                self.dead.extend(present.iter().filter_map(|i| i.get()));
            }
        }
        Ok(())
    }

    /// The `k` nearest live vectors to `query`, best first, restricted by `allow`.
    /// Distances: `1 - cos` for cosine, squared L2 for L2.
    pub fn search(&self, query: &[f32], k: usize, allow: Allow<'_>) -> Result<Vec<Neighbour>> {
        if query.len() != self.dim {
            return Err(Error::DimensionMismatch {
                what: "query embedding".into(),
                expected: self.dim,
                got: query.len(),
            });
        }
        let total = self.ids.len();
        if total == 0 {
            return Ok(Vec::new());
        }
        let k = k.min(total);
        let bitmap = match allow {
            Allow::All if self.dead.is_empty() => None,
            Allow::All => {
                let mut b = Bitmap::new(self.max_id);
                for id in &self.ids {
                    if !self.dead.contains(id) {
                        b.set(*id);
                    }
                }
                Some(b)
            }
            Allow::Only(ids) => {
                let mut b = Bitmap::new(self.max_id);
                for id in ids {
                    if self.ids.contains(id) && !self.dead.contains(id) {
                        b.set(*id);
                    }
                }
                Some(b)
            }
        };
        let (distances, labels) = ffi::search(
            &self.inner,
            query,
            k,
            bitmap.as_ref().map(|b| b.bytes.as_slice()),
        )?;
        Ok(labels
            .iter()
            .zip(distances)
            .filter(|(l, _)| **l >= 0)
            .map(|(l, d)| Neighbour {
                id: ImageId(*l as u64),
                distance: match self.metric {
                    Metric::Cosine => 1.0 - d,
                    Metric::L2 => d,
                },
            })
            .collect())
    }
}

/// A FAISS `IDSelectorBitmap` bitmap: bit `id` set means allowed.
struct Bitmap {
    bytes: Vec<u8>,
}

impl Bitmap {
    fn new(max_id: u64) -> Self {
        Bitmap {
            bytes: vec![0; (max_id / 8 + 1) as usize],
        }
    }

    fn set(&mut self, id: u64) {
        if let Some(b) = self.bytes.get_mut((id / 8) as usize) {
            *b |= 1 << (id % 8);
        }
    }
}
