//! The vector index: derived data, rebuilt from the embeddings tree whenever in doubt.
//!
//! A FAISS `IndexIDMap` over either a flat index (exact) or HNSW (approximate), built through
//! the index factory. FAISS ids are [`ImageId`]s. Flat indexes drop removed ids at once; HNSW
//! cannot, so removed ids are kept as "dead" and masked out of every search by an id selector
//! until the next rebuild. A snapshot on disk (see [`snapshot`]) makes open fast.

use faiss::index::IndexImpl;
use faiss::{Idx, Index, MetricType};
use faiss_sys::idx_t;
use lookalike_plugin::Metric;

use crate::error::{Error, Result};
use crate::ImageId;

pub(crate) mod faiss_file;
pub(crate) mod ffi;
pub(crate) mod projection;
use ffi::Selector;
pub(crate) mod snapshot;
mod stitched;

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

/// A set of image ids, hashed with foldhash (ids are handed out by the store, not chosen by
/// callers, so a hash-flooding-resistant hasher buys nothing).
pub(crate) type IdSet = std::collections::HashSet<u64, foldhash::fast::RandomState>;

/// A FAISS index over the embeddings of one model version.
#[derive(Debug)]
pub(crate) struct VectorIndex {
    inner: faiss::index::id_map::IdMap<IndexImpl>,
    shape: Shape,
    metric: Metric,
    dim: usize,
    /// Ids present in FAISS (dead ones included).
    ids: IdSet,
    /// Ids removed from the store but still in an HNSW graph.
    dead: IdSet,
    /// Largest id ever added, for sizing selector bitmaps.
    max_id: u64,
    /// Bit `id` set for every live id, kept while ids are dense enough for a bitmap to be
    /// small (see [`DENSE_BYTES_PER_ID`]): HNSW searches with removed ids then pass it as it
    /// is. `None` for sparse ids (a store upgraded from format 1, whose ids jumped by two
    /// million at each reopen): searches use selectors sized by the number of ids instead.
    live_bits: Option<Vec<u8>>,
    /// How many vectors the last piece of an insert's HNSW adds took (`db/insert.rs` sizes
    /// the pieces by time): the next insert starts from there. A new or loaded index starts
    /// from one.
    pub(crate) add_piece: usize,
}

/// A bitmap of ids is used while it takes at most this many bytes per id in the index (plus a
/// page): dense ids (format 2) always qualify, as a bitmap is then an eighth of a byte an id.
const DENSE_BYTES_PER_ID: u64 = 4;

/// Bytes of a bitmap with bit `max_id`, when ids are dense enough for one.
fn bitmap_len(max_id: u64, ids: usize) -> Option<usize> {
    let bytes = max_id / 8 + 1;
    (bytes <= DENSE_BYTES_PER_ID * ids as u64 + 4096).then_some(bytes as usize)
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
        let mut inner =
            faiss::index_factory(dim32, shape.factory(), faiss_metric)?.into_id_map()?;
        ffi::use_own_kernels(&mut inner)?;
        let mut index = VectorIndex {
            inner,
            shape,
            metric,
            dim,
            ids: IdSet::default(),
            dead: IdSet::default(),
            max_id: 0,
            live_bits: Some(Vec::new()),
            add_piece: 1,
        };
        index.set_ef_search(ef_search)?;
        Ok(index)
    }

    /// Wraps an index read from a snapshot.
    fn from_parts(
        mut inner: faiss::index::id_map::IdMap<IndexImpl>,
        shape: Shape,
        metric: Metric,
        dim: usize,
    ) -> Result<Self> {
        ffi::use_own_kernels(&mut inner)?;
        let ids: IdSet = inner.id_map().iter().filter_map(|i| i.get()).collect();
        let max_id = ids.iter().copied().max().unwrap_or(0);
        let mut index = VectorIndex {
            inner,
            shape,
            metric,
            dim,
            ids,
            dead: IdSet::default(),
            max_id,
            live_bits: None,
            add_piece: 1,
        };
        index.refresh_bits();
        Ok(index)
    }

    /// Remakes [`VectorIndex::live_bits`] from the ids, or drops it when they are sparse.
    fn refresh_bits(&mut self) {
        self.live_bits = bitmap_len(self.max_id, self.ids.len()).map(|len| {
            let mut bits = vec![0u8; len];
            for id in self.ids.difference(&self.dead) {
                set_bit(&mut bits, *id);
            }
            bits
        });
    }

    /// Grows, ahead of an add of `extra` vectors, the arrays FAISS would otherwise reallocate
    /// inside that add (copying them all): the copy is made here, through `&self`, while
    /// searches may run. Apply it with [`VectorIndex::commit_growth`]; `None` when nothing
    /// needs to grow.
    pub fn prepare_growth(&self, extra: usize) -> Option<ffi::Growth> {
        ffi::prepare_growth(&self.inner, extra)
    }

    /// Swaps in a [`VectorIndex::prepare_growth`] made since the last change (else nothing
    /// happens); `growth` then holds the old arrays, to drop outside the lock.
    pub fn commit_growth(&mut self, growth: &ffi::Growth) -> bool {
        ffi::commit_growth(&mut self.inner, growth)
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
    pub fn ids(&self) -> &IdSet {
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

    /// Adds a few vectors on this thread alone: for adds made under the index lock, where a
    /// parallel team competes for the cores with a build running in the background (16-vector
    /// HNSW adds took seconds that way).
    pub fn add_serial(&mut self, ids: &[ImageId], vectors: &[f32]) -> Result<()> {
        ffi::with_threads(1, || self.add(ids, vectors))
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
        // A snapshot read with its vectors mapped (HNSW only; removals from HNSW do not touch
        // FAISS) holds views FAISS cannot grow; the insert path copies them ahead
        // ([`VectorIndex::prepare_growth`]), any other add here.
        ffi::own_arrays(&mut self.inner)?;
        self.inner.add_with_ids(vectors, &fids)?;
        for i in ids {
            self.ids.insert(i.0);
            self.max_id = self.max_id.max(i.0);
        }
        match (&mut self.live_bits, bitmap_len(self.max_id, self.ids.len())) {
            (Some(bits), Some(len)) => {
                bits.resize(len, 0);
                for i in ids {
                    set_bit(bits, i.0);
                }
            }
            (None, None) => {}
            _ => self.refresh_bits(),
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
        if let Some(bits) = &mut self.live_bits {
            for id in present.iter().filter_map(|i| i.get()) {
                if let Some(b) = bits.get_mut((id / 8) as usize) {
                    *b &= !(1 << (id % 8));
                }
            }
        }
        Ok(())
    }

    /// The `k` nearest live vectors to `query`, best first, restricted by `allow`.
    /// Distances: `1 - cos` for cosine, squared L2 for L2.
    pub fn search(&self, query: &[f32], k: usize, allow: Allow<'_>) -> Result<Vec<Neighbour>> {
        Ok(self.search_many(query, k, allow)?.pop().unwrap_or_default())
    }

    /// [`VectorIndex::search`] for several queries at once (`queries` holds them one after
    /// another): one list per query. A flat index answers a batch with one matrix product.
    pub fn search_many(
        &self,
        queries: &[f32],
        k: usize,
        allow: Allow<'_>,
    ) -> Result<Vec<Vec<Neighbour>>> {
        if queries.is_empty() || !queries.len().is_multiple_of(self.dim) {
            return Err(Error::DimensionMismatch {
                what: "query embedding".into(),
                expected: self.dim,
                got: queries.len(),
            });
        }
        let n = queries.len() / self.dim;
        let total = self.ids.len();
        if total == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let k = k.min(total);
        if k == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        // A selector sized by the live ids: the kept bitmap of live ids, or for sparse ids a
        // hash set of the dead or the allowed ones; never a pass over every id per query.
        let dead: Vec<idx_t>;
        let only: Vec<idx_t>;
        let built: Vec<u8>;
        let selector = match allow {
            Allow::All if self.dead.is_empty() => Selector::All,
            Allow::All => match &self.live_bits {
                Some(bits) => Selector::Bitmap(bits),
                None => {
                    dead = self.dead.iter().map(|i| *i as idx_t).collect();
                    Selector::AllBut(&dead)
                }
            },
            Allow::Only(ids) => {
                let live = ids
                    .iter()
                    .filter(|id| self.ids.contains(id) && !self.dead.contains(id));
                match &self.live_bits {
                    Some(bits) => {
                        built = {
                            let mut b = vec![0u8; bits.len()];
                            for id in live {
                                set_bit(&mut b, *id);
                            }
                            b
                        };
                        Selector::Bitmap(&built)
                    }
                    None => {
                        only = live.map(|i| *i as idx_t).collect();
                        Selector::Only(&only)
                    }
                }
            }
        };
        let (distances, labels) = ffi::search(&self.inner, queries, n, k, selector)?;
        Ok(labels
            .chunks(k)
            .zip(distances.chunks(k))
            .map(|(labels, distances)| {
                labels
                    .iter()
                    .zip(distances)
                    .filter(|(l, _)| **l >= 0)
                    .map(|(l, d)| Neighbour {
                        id: ImageId(*l as u64),
                        distance: match self.metric {
                            // Never below 0: an image's distance to itself can come out
                            // as -1e-7 in float arithmetic.
                            Metric::Cosine => (1.0 - d).max(0.0),
                            Metric::L2 => d.max(0.0),
                        },
                    })
                    .collect()
            })
            .collect())
    }
}

/// Runs `f` (index building in the background) with FAISS using one core less than the
/// machine has, so that queries and the adds of concurrent inserts, which hold the index lock,
/// keep a core: with every core in the build, those adds ran at a third of their speed and
/// queries waited up to 0.7 s behind them (`benches/stalls.rs`).
pub(crate) fn leaving_a_core<T>(f: impl FnOnce() -> T) -> T {
    ffi::with_threads(cores().saturating_sub(1), f)
}

/// The machine's cores (FAISS's OpenMP teams use them all unless told otherwise).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets bit `id` of a FAISS `IDSelectorBitmap` bitmap (bit `id` set means allowed).
fn set_bit(bits: &mut [u8], id: u64) {
    if let Some(b) = bits.get_mut((id / 8) as usize) {
        *b |= 1 << (id % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense ids keep a bitmap of live ids; sparse ones (a format-1 store's) do not, and
    /// searches with removed or filtered ids give the same answers either way.
    #[test]
    fn dense_and_sparse_ids_search_alike() {
        for (step, dense) in [(1u64, true), (2_000_000, false)] {
            let mut index = VectorIndex::new(Shape::Hnsw { m: 8 }, Metric::L2, 4, 64).unwrap();
            let ids: Vec<ImageId> = (1..=200).map(|i| ImageId(i * step)).collect();
            let vectors: Vec<f32> = (0..200).flat_map(|i| [i as f32, 0.0, 0.0, 0.0]).collect();
            index.add(&ids, &vectors).unwrap();
            assert_eq!(index.live_bits.is_some(), dense);
            // Remove the 10 nearest to the query at 0.
            index.remove(&ids[..10]).unwrap();
            let hits = index.search(&[0.0; 4], 3, Allow::All).unwrap();
            let got: Vec<u64> = hits.iter().map(|h| h.id.0).collect();
            assert_eq!(got, vec![11 * step, 12 * step, 13 * step], "step {step}");
            let allowed = [5 * step, 50 * step, 60 * step];
            let hits = index.search(&[0.0; 4], 3, Allow::Only(&allowed)).unwrap();
            let got: Vec<u64> = hits.iter().map(|h| h.id.0).collect();
            assert_eq!(got, vec![50 * step, 60 * step], "step {step}");
        }
    }

    /// Arrays grown ahead of adds (copied while searches could run, swapped in after) leave
    /// the index answering exactly as one grown by FAISS inside its adds; a growth made
    /// before a change is not applied.
    #[test]
    fn arrays_grown_ahead_of_adds_change_no_answer() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dim = 24;
        let vectors: Vec<f32> = (0..3_000 * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        for shape in [Shape::Hnsw { m: 8 }, Shape::Flat] {
            let mut plain = VectorIndex::new(shape, Metric::L2, dim, 32).unwrap();
            let mut grown = VectorIndex::new(shape, Metric::L2, dim, 32).unwrap();
            let mut swaps = 0;
            for (b, chunk) in vectors.chunks(100 * dim).enumerate() {
                let ids: Vec<ImageId> = (0..100)
                    .map(|i| ImageId((b * 100 + i + 1) as u64))
                    .collect();
                plain.add_serial(&ids, chunk).unwrap();
                if let Some(g) = grown.prepare_growth(ids.len()) {
                    assert!(grown.commit_growth(&g));
                    swaps += 1;
                }
                grown.add_serial(&ids, chunk).unwrap();
            }
            assert!(swaps >= 3, "{shape:?}: {swaps} growths");
            for q in 0..50 {
                let query = &vectors[q * 61 * dim..(q * 61 + 1) * dim];
                assert_eq!(
                    grown.search(query, 10, Allow::All).unwrap(),
                    plain.search(query, 10, Allow::All).unwrap()
                );
            }
            // Prepared, then the index changed: not applied.
            let g = loop {
                let ids = [ImageId(grown.len() as u64 + 1)];
                if let Some(g) = grown.prepare_growth(1_000_000) {
                    grown.add_serial(&ids, &vectors[..dim]).unwrap();
                    break g;
                }
            };
            assert!(!grown.commit_growth(&g));
        }
    }

    /// One-query HNSW searches go through `hnsw.cpp` (a reused visited table); batches through
    /// FAISS's `IndexIDMap::search`. Both give the same ids and distances, for both metrics,
    /// dimensions with and without a SIMD tail, and with removed ids masked out; the distances
    /// (from `hnsw.cpp`'s kernels, which FAISS's adds and searches use too) are the exact ones.
    #[test]
    fn one_query_hnsw_search_matches_faiss_own() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for metric in [Metric::L2, Metric::Cosine] {
            for dim in [5usize, 37, 64] {
                let mut index = VectorIndex::new(Shape::Hnsw { m: 8 }, metric, dim, 32).unwrap();
                let n = 2_000;
                let mut vectors: Vec<f32> =
                    (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                if metric == Metric::Cosine {
                    for v in vectors.chunks_mut(dim) {
                        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                        v.iter_mut().for_each(|x| *x /= norm);
                    }
                }
                let ids: Vec<ImageId> = (1..=n as u64).map(ImageId).collect();
                index.add(&ids, &vectors).unwrap();
                index.remove(&ids[..50]).unwrap();
                for q in 0..100 {
                    let query = &vectors[q * 17 * dim..(q * 17 + 1) * dim];
                    let one = index.search(query, 10, Allow::All).unwrap();
                    let twice = [query, query].concat();
                    let batch = index.search_many(&twice, 10, Allow::All).unwrap();
                    assert_eq!(one.len(), 10);
                    for (a, b) in one.iter().zip(&batch[0]) {
                        assert_eq!(a.id, b.id, "{metric:?} dim {dim} query {q}");
                        assert!((a.distance - b.distance).abs() < 1e-4, "{a:?} {b:?}");
                        assert!(a.id.0 > 50, "a removed id came back: {a:?}");
                        // The kernels' distance, against the one computed here.
                        let i = (a.id.0 - 1) as usize;
                        let v = &vectors[i * dim..(i + 1) * dim];
                        let want = match metric {
                            Metric::L2 => query.iter().zip(v).map(|(x, y)| (x - y) * (x - y)).sum(),
                            Metric::Cosine => (1.0
                                - query.iter().zip(v).map(|(x, y)| x * y).sum::<f32>())
                            .max(0.0),
                        };
                        assert!((a.distance - want).abs() < 1e-4, "{a:?} against {want}");
                    }
                }
            }
        }
    }
}
