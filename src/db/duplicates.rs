//! Groups of near-identical images: connected components of the graph whose edges join images
//! within a distance, found with the index's k-nearest-neighbour search (never an N x N
//! matrix): memory is the union-find array and one chunk of query vectors.

use lookalike_plugin::Metric;

use super::{distance, Db, Model};
use crate::error::{Error, Result};
use crate::index::Allow;
use crate::ImageId;

/// Stored vectors searched at once (a flat index answers them with one matrix product).
const CHUNK: usize = 256;
/// Neighbours asked for first; a vector whose neighbours are all within the distance is asked
/// again for four times as many, until one is not.
const FIRST_K: usize = 16;
/// Neighbours asked for in one search at most (queries times k): a vector in a dense cluster
/// can need k in the tens of thousands, and 256 such queries at k = 65,536 would ask for 0.4 GB
/// of results.
const RESULTS_PER_SEARCH: usize = 1 << 16;

/// A group of near-identical images.
#[derive(Debug, Clone, PartialEq)]
pub struct DuplicateGroup {
    /// The images, ascending: the first is the one stored first.
    pub ids: Vec<ImageId>,
    /// Each image's distance to the first under the active model (0 for the first). Members
    /// joined through a chain can be further from the first than the grouping distance.
    pub distances: Vec<f32>,
}

/// Union-find over positions.
struct Sets {
    parent: Vec<u32>,
}

impl Sets {
    fn new(n: usize) -> Sets {
        Sets {
            parent: (0..n as u32).collect(),
        }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let up = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = up;
            x = up;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // The smaller position becomes the root: stable, and the oldest image leads.
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

impl Db {
    /// The default of [`Db::duplicates`]'s `max_distance` for the active model's metric:
    /// 0.05 for cosine (`1 - cos`); for squared L2 the same for unit-length embeddings, 0.1
    /// (pass a distance for others). Measured with the default extractor on re-encoded,
    /// scaled, cropped and colour-shifted copies against other images (`docs/benchmarks.md`,
    /// "Duplicates"): it groups every re-encoded, scaled and colour-shifted copy (at most
    /// 0.029 from its original) and copies cropped by a per cent or two, but only about half
    /// of those cropped by up to 10 % (median 0.081); no image there was closer than 0.09 to
    /// one that was not its copy, while distinct products photographed alike (the bundled
    /// 28-pixel sample's trousers) can come within 0.08. A false group costs more than a
    /// missed one when groups decide what to delete: pass a larger distance (0.08-0.1) to
    /// catch more crops.
    pub fn default_duplicate_distance(&self) -> f32 {
        match self.model().spec.metric {
            Metric::Cosine => 0.05,
            Metric::L2 => 0.1,
        }
    }

    /// Groups of near-identical images: the connected components, of two or more images, of
    /// the graph joining every two stored images within `max_distance` of each other under
    /// the active model (`None`: [`Db::default_duplicate_distance`]). Groups come in order of
    /// their first id. Built from the index's nearest-neighbour search, one chunk of stored
    /// vectors at a time; with an approximate (HNSW) index a pair can be missed, as a query
    /// can miss a neighbour.
    pub fn duplicates(&self, max_distance: Option<f32>) -> Result<Vec<DuplicateGroup>> {
        let max = max_distance.unwrap_or_else(|| self.default_duplicate_distance());
        if !(max.is_finite() && max >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "max_distance must be a finite number of at least 0, not {max}"
            )));
        }
        let model = self.model();
        let ids: Vec<u64> = self.ids().into_iter().map(|i| i.0).collect();
        let pos = |id: u64| ids.binary_search(&id).ok().map(|p| p as u32);
        let mut sets = Sets::new(ids.len());
        let mut chunk: Vec<(u64, Vec<f32>)> = Vec::with_capacity(CHUNK);
        let flush = |chunk: &mut Vec<(u64, Vec<f32>)>, sets: &mut Sets| -> Result<()> {
            self.join_neighbours(&model, chunk, max, ids.len(), &mut |a, b| {
                if let (Some(a), Some(b)) = (pos(a), pos(b)) {
                    sets.union(a, b);
                }
            })?;
            chunk.clear();
            Ok(())
        };
        // One embedding at a time by id: a sled iterator over the whole tree grew the process
        // by 0.59 GB while it read the 0.96 GB of 100,000 embeddings of 2,408 dimensions;
        // point reads of the same, by 0.16 GB.
        for id in &ids {
            let Some(v) = self
                .inner
                .store
                .embedding(model.version, ImageId(*id), model.dim())?
            else {
                continue; // removed since the ids were taken
            };
            chunk.push((*id, v));
            if chunk.len() == CHUNK {
                flush(&mut chunk, &mut sets)?;
            }
        }
        flush(&mut chunk, &mut sets)?;

        let mut members: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        for (p, id) in ids.iter().enumerate() {
            let root = sets.find(p as u32);
            members.entry(root).or_default().push(*id);
        }
        let mut groups = Vec::new();
        for (_, group) in members.into_iter().filter(|(_, m)| m.len() > 1) {
            let first =
                self.inner
                    .store
                    .embedding(model.version, ImageId(group[0]), model.dim())?;
            let mut distances = Vec::with_capacity(group.len());
            distances.push(0.0);
            for id in &group[1..] {
                let v = self
                    .inner
                    .store
                    .embedding(model.version, ImageId(*id), model.dim())?;
                distances.push(match (&first, v) {
                    (Some(f), Some(v)) => distance(model.spec.metric, f, &v),
                    _ => f32::NAN,
                });
            }
            groups.push(DuplicateGroup {
                ids: group.into_iter().map(ImageId).collect(),
                distances,
            });
        }
        Ok(groups)
    }

    /// Searches the index for the neighbours of each vector of `chunk` and reports each pair
    /// within `max` to `join`, widening the search for a vector whose neighbours all are.
    fn join_neighbours(
        &self,
        model: &Model,
        chunk: &[(u64, Vec<f32>)],
        max: f32,
        total: usize,
        join: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let mut todo: Vec<&(u64, Vec<f32>)> = chunk.iter().collect();
        let mut k = FIRST_K;
        while !todo.is_empty() {
            let mut wider = Vec::new();
            // Fewer queries per search as k grows: results (and FAISS's buffers) stay within
            // RESULTS_PER_SEARCH neighbours, whatever k a dense cluster needs.
            let per = (RESULTS_PER_SEARCH / (k + 1)).max(1);
            for part in todo.chunks(per) {
                let flat: Vec<f32> = part.iter().flat_map(|(_, v)| v.iter().copied()).collect();
                let found = {
                    let state = self.read_state()?;
                    if state.model.version != model.version {
                        return Err(Error::ModelChanged);
                    }
                    // k + 1: the vector finds itself.
                    state.index.search_many(&flat, k + 1, Allow::All)?
                };
                for (item, hits) in part.iter().zip(found) {
                    let id = item.0;
                    let within = hits.iter().filter(|h| h.distance <= max).count();
                    for h in hits.iter().filter(|h| h.distance <= max && h.id.0 != id) {
                        join(id, h.id.0);
                    }
                    if within == hits.len() && hits.len() == k + 1 && k + 1 < total {
                        wider.push(*item);
                    }
                }
            }
            todo = wider;
            k *= 4;
        }
        Ok(())
    }
}
