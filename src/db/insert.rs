//! Inserting images: checks, content hashes, decoding and embedding on every core, one durable
//! write per batch, then the index and the catalogue.

use std::borrow::Cow;
use std::time::Duration;

use rayon::prelude::*;

use super::indexing::add_from_store;
use super::meta::{check_meta, ContentHash, ImageMeta, InsertMode, Inserted};
use super::{
    embed, in_batch, Db, Embedded, Model, HNSW_ADD_MAX, HNSW_HOLD, HNSW_PARALLEL_FROM, THUMB_BUDGET,
};
use crate::error::{Error, Result};
use crate::preprocess;
use crate::store::{EntryRecord, NewImage, ENTRY_V2};
use crate::ImageId;

/// A batch decoded and embedded by [`Db::prepare_images_with`], not stored yet.
pub struct Prepared<'a> {
    items: Vec<Item<'a>>,
    mode: InsertMode,
    /// The model the embeddings were made with.
    model: std::sync::Arc<Model>,
}

impl Prepared<'_> {
    /// Number of items in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True for a batch of no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("items", &self.items.len())
            .field("mode", &self.mode)
            .field("model", &self.model.version)
            .finish()
    }
}

/// One item of a batch on its way in.
struct Item<'a> {
    bytes: &'a [u8],
    meta: Cow<'a, ImageMeta>,
    hash: [u8; 32],
    /// The metadata object as JSON text, once checked.
    text: Option<String>,
    stage: Stage,
}

/// How far an item got before ids are given.
enum Stage {
    /// Checked, to be decoded.
    Pending,
    /// Refused (metadata, decoding): nothing of it is stored.
    Refused(Error),
    /// Its bytes are stored already, under this id (`InsertMode::SkipExisting`).
    Stored(ImageId),
    /// Decoded and embedded, to be stored.
    Embedded(Embedded),
}

impl Db {
    /// Inserts one encoded image (JPEG, PNG, WebP, GIF first frame, BMP, TIFF) with an optional
    /// label, and returns its new id. Under [`Durability::Immediate`](crate::Durability) the
    /// image is on disk when this returns. The bytes are stored as given; what the extractor
    /// sees is decoded by the model's decode policy (upright by EXIF orientation, transparency
    /// over the input's background, JPEG decoded at a reduced DCT scale; see
    /// `docs/architecture.md`).
    pub fn insert_image(&self, bytes: &[u8], label: Option<&str>) -> Result<ImageId> {
        let ids = self.insert_images([(bytes, label)])?;
        Ok(ids[0])
    }

    /// [`Db::insert_image`] with a source and metadata besides the label.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let db = lookalike::Db::open(dir.path())?;
    /// # let png = std::fs::read("examples/data/fashion-mnist-sample/bag/t10k-00018.png")?;
    /// use lookalike::ImageMeta;
    /// let meta = ImageMeta::label("bag")
    ///     .source("photos/bag.png")
    ///     .metadata(serde_json::json!({"sku": "B-12", "price": 40}))?;
    /// let id = db.insert_image_with(&png, &meta)?;
    /// assert_eq!(db.meta(id)?, meta);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn insert_image_with(&self, bytes: &[u8], meta: &ImageMeta) -> Result<ImageId> {
        let outcome = self
            .insert_batch(vec![(bytes, Cow::Borrowed(meta))], InsertMode::Always, true)?
            .pop()
            .ok_or_else(|| Error::InvalidArgument("nothing was inserted".into()))?;
        outcome.map(|o| o.id())
    }

    /// Inserts a batch atomically: every image or none (the first bad one fails the batch
    /// with [`Error::InBatch`]). One durable flush covers the whole batch, so this is much
    /// faster than inserting one by one. Images are decoded on every core; memory holds the
    /// caller's bytes and a small decoded copy of at most a few images per core, whatever the
    /// batch size.
    pub fn insert_images<'a, I>(&self, items: I) -> Result<Vec<ImageId>>
    where
        I: IntoIterator<Item = (&'a [u8], Option<&'a str>)>,
    {
        self.insert_batch(labelled(items), InsertMode::Always, true)?
            .into_iter()
            .map(|o| o.map(|o| o.id()))
            .collect()
    }

    /// Inserts the images of a batch that decode and have a valid label, in one durable
    /// write, and returns each item's outcome in order: its new id, or why it was refused
    /// (nothing of a refused image is stored). The outer error is for failures that are not
    /// the images' fault (storage, the extractor): then nothing of the batch is stored. For
    /// loading folders where one bad file must not stop the rest; [`Db::insert_images`] is
    /// the all-or-nothing form.
    pub fn insert_images_each<'a, I>(&self, items: I) -> Result<Vec<Result<ImageId>>>
    where
        I: IntoIterator<Item = (&'a [u8], Option<&'a str>)>,
    {
        Ok(self
            .insert_batch(labelled(items), InsertMode::Always, false)?
            .into_iter()
            .map(|o| o.map(|o| o.id()))
            .collect())
    }

    /// [`Db::insert_images_each`] with sources and metadata, and a [`InsertMode`]: under
    /// [`InsertMode::SkipExisting`] an image whose bytes are identical to a stored one (or to
    /// an earlier item of the batch) is not decoded or stored again, and its outcome is
    /// [`Inserted::Existing`] with the stored image's id (the smallest, if there are several).
    pub fn insert_images_with<'a, I>(
        &self,
        items: I,
        mode: InsertMode,
    ) -> Result<Vec<Result<Inserted>>>
    where
        I: IntoIterator<Item = (&'a [u8], &'a ImageMeta)>,
    {
        let batch = self.prepare_images_with(items, mode)?;
        self.commit_prepared(batch)
    }

    /// The first half of [`Db::insert_images_with`]: checks, hashes, decodes and embeds a
    /// batch on every core, storing nothing. [`Db::commit_prepared`] stores it. Ids are given
    /// at the commit, in the batch's order, so a pipeline that prepares batches at once and
    /// commits them in order stores them with ascending ids (`lookalike add` does).
    pub fn prepare_images_with<'a, I>(&self, items: I, mode: InsertMode) -> Result<Prepared<'a>>
    where
        I: IntoIterator<Item = (&'a [u8], &'a ImageMeta)>,
    {
        let items = items
            .into_iter()
            .map(|(b, m)| (b, Cow::Borrowed(m)))
            .collect();
        self.prepare(items, mode, false)
    }

    /// Stores a prepared batch: each item's outcome, in order, as [`Db::insert_images_with`]
    /// returns them. If the active model changed since the batch was prepared, its images are
    /// embedded with the new one too.
    pub fn commit_prepared(&self, batch: Prepared<'_>) -> Result<Vec<Result<Inserted>>> {
        self.check_poisoned()?;
        let Prepared { items, mode, model } = batch;
        let n = items.len();
        let mut outcomes: Vec<Result<Inserted>> = Vec::with_capacity(n);
        let mut new = Vec::with_capacity(n);
        // The ids handed out stay in flight until the batch is in the catalogue.
        let mut held = self.inner.pending.hold();
        // Items stored by this batch, by hash, for SkipExisting within the batch.
        let mut first_of: std::collections::HashMap<[u8; 32], ImageId> = Default::default();
        for item in items {
            let e = match item.stage {
                Stage::Embedded(e) => e,
                Stage::Refused(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
                Stage::Stored(id) => {
                    outcomes.push(Ok(Inserted::Existing(id)));
                    continue;
                }
                Stage::Pending => {
                    outcomes.push(Err(Error::InvalidArgument(
                        "an image was not embedded".into(),
                    )));
                    continue;
                }
            };
            if mode == InsertMode::SkipExisting {
                if let Some(id) = first_of.get(&item.hash) {
                    outcomes.push(Ok(Inserted::Existing(*id)));
                    continue;
                }
            }
            let id = held.id(&self.inner.store);
            first_of.insert(item.hash, id);
            outcomes.push(Ok(Inserted::New(id)));
            new.push(NewImage {
                id,
                bytes: item.bytes,
                entry: EntryRecord {
                    format: ENTRY_V2,
                    label: item.meta.label.clone(),
                    width: e.width,
                    height: e.height,
                    source: item.meta.source.clone(),
                    metadata: item.text,
                    hash: item.hash,
                },
                vector: e.vector,
            });
        }
        if mode == InsertMode::SkipExisting {
            // Another writer may have stored the same bytes while this batch decoded: look
            // again under the lock that such writers store under.
            let _dedup = self
                .inner
                .dedup
                .lock()
                .map_err(|_| Error::Poisoned("a thread panicked while inserting".into()))?;
            let mut kept = Vec::with_capacity(new.len());
            for image in new {
                match self.stored_copy(&image.entry.hash)? {
                    Some(existing) => {
                        for o in outcomes.iter_mut() {
                            if matches!(o, Ok(Inserted::New(id)) | Ok(Inserted::Existing(id)) if *id == image.id)
                            {
                                *o = Ok(Inserted::Existing(existing));
                            }
                        }
                    }
                    None => kept.push(image),
                }
            }
            self.store_new(&model, kept)?;
        } else {
            self.store_new(&model, new)?;
        }
        Ok(outcomes)
    }

    /// Checks, hashes, decodes, embeds and stores a batch; `all_or_nothing` fails it (storing
    /// nothing) at its first bad image, with [`Error::InBatch`].
    fn insert_batch(
        &self,
        items: Vec<(&[u8], Cow<'_, ImageMeta>)>,
        mode: InsertMode,
        all_or_nothing: bool,
    ) -> Result<Vec<Result<Inserted>>> {
        let batch = self.prepare(items, mode, all_or_nothing)?;
        self.commit_prepared(batch)
    }

    /// Everything of an insert before ids are given: see [`Db::prepare_images_with`].
    fn prepare<'a>(
        &self,
        items: Vec<(&'a [u8], Cow<'a, ImageMeta>)>,
        mode: InsertMode,
        all_or_nothing: bool,
    ) -> Result<Prepared<'a>> {
        self.check_poisoned()?;
        let model = self.model();
        let n = items.len();
        let mut items: Vec<Item> = items
            .into_par_iter()
            .map(|(bytes, meta)| Item {
                hash: ContentHash::of(bytes).0,
                bytes,
                meta,
                text: None,
                stage: Stage::Pending,
            })
            .collect();
        // What is decided before decoding: bad metadata, and images already stored.
        for item in &mut items {
            match check_meta(&item.meta) {
                Err(e) => item.stage = Stage::Refused(e),
                Ok(text) => {
                    item.text = text;
                    if mode == InsertMode::SkipExisting {
                        if let Some(id) = self.stored_copy(&item.hash)? {
                            item.stage = Stage::Stored(id);
                        }
                    }
                }
            }
        }
        let pending = |i: &&mut Item| matches!(i.stage, Stage::Pending);
        let todo: Vec<&[u8]> = items
            .iter()
            .filter(|i| matches!(i.stage, Stage::Pending))
            .map(|i| i.bytes)
            .collect();
        let embedded = self.embed_encoded(&model, &todo)?;
        for (item, e) in items.iter_mut().filter(pending).zip(embedded) {
            item.stage = match e {
                Ok(e) => Stage::Embedded(e),
                Err(e) => Stage::Refused(e),
            };
        }
        if all_or_nothing {
            if let Some(i) = items
                .iter()
                .position(|i| matches!(i.stage, Stage::Refused(_)))
            {
                if let Stage::Refused(e) = std::mem::replace(&mut items[i].stage, Stage::Pending) {
                    return Err(in_batch(i, n, e));
                }
            }
        }
        Ok(Prepared { items, mode, model })
    }

    /// The smallest id of a stored image with these bytes.
    fn stored_copy(&self, hash: &[u8; 32]) -> Result<Option<ImageId>> {
        Ok(self.inner.store.find_by_hash(hash)?.first().copied())
    }

    /// Stores embedded images durably and adds them to the index and the catalogue.
    fn store_new(&self, model: &Model, new: Vec<NewImage<'_>>) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        self.inner.store.insert(model.version, &new)?;
        self.durable_write()?;

        // Arrays that these adds would make FAISS reallocate (a copy of every vector, inside
        // an add, under the write lock) are grown first, under the shared lock: searches go on
        // meanwhile; the writer mutex keeps other changes out until the swap.
        let writer = self.writer()?;
        let growth = self.read_state()?.index.prepare_growth(new.len());
        let mut state = self.lock_state(writer)?;
        if let Some(g) = &growth {
            state.index.commit_growth(g);
        }
        // The catalogue first, then the vectors: a query meanwhile may miss some of this
        // batch, never see a vector without its label.
        for n in &new {
            state.catalogue.set(n.id.0, &n.entry);
        }
        state.dirty = true;
        if state.model.version != model.version {
            // The active model changed while we embedded: embed these with the new model too
            // (stored under its version) and add them to its index.
            let ids: Vec<u64> = new.iter().map(|n| n.id.0).collect();
            let active = state.model.clone();
            if let Err(e) = add_from_store(&self.inner.store, &active, &mut state.index, &ids) {
                return Err(self.poison(e));
            }
            return Ok(());
        }
        // Into an HNSW graph a piece at a time (see HNSW_HOLD), handing the lock to waiting
        // queries in between; a flat index takes the batch at once.
        let hnsw = matches!(state.index.shape(), crate::index::Shape::Hnsw { .. });
        // Pieces on every core, unless an index build runs beside (it has all cores but one,
        // and two OpenMP teams on too few cores made 16-vector adds take seconds) or the graph
        // is small: then one vector at a time on one core. Pieces into a graph of 2,000
        // vectors cut recall@10 from over 0.9 to 0.5-0.7 (tests/exact.rs); into graphs of
        // 300,000 and 1,000,000 it stayed 0.995 (benches/scale.rs).
        let serial = self
            .inner
            .building
            .load(std::sync::atomic::Ordering::Acquire)
            || state.index.len() < HNSW_PARALLEL_FROM;
        let mut step = match (hnsw, serial) {
            (false, _) => new.len(),
            (true, true) => 1,
            (true, false) => state.index.add_piece,
        };
        let mut done = 0;
        while done < new.len() {
            if done > 0 {
                state.let_queries_in();
            }
            let part = &new[done..(done + step).min(new.len())];
            let ids: Vec<ImageId> = part.iter().map(|n| n.id).collect();
            let flat: Vec<f32> = part.iter().flat_map(|n| n.vector.iter().copied()).collect();
            let started = std::time::Instant::now();
            let added = if serial {
                state.index.add_serial(&ids, &flat)
            } else {
                state.index.add(&ids, &flat)
            };
            if let Err(e) = added {
                return Err(self.poison(e));
            }
            done += part.len();
            if hnsw && !serial {
                step = next_piece(part.len(), started.elapsed(), crate::index::cores());
                state.index.add_piece = step;
            }
        }
        drop(state);
        let rebuilt = self.maybe_rebuild();
        self.maybe_snapshot();
        rebuilt
    }

    /// Decodes and embeds encoded images with `model`, on every core, a chunk at a time (the
    /// chunk's decoded images fit in [`THUMB_BUDGET`]): one outcome per image, in order. The
    /// outer error is the extractor's.
    pub(super) fn embed_encoded(
        &self,
        model: &Model,
        images: &[&[u8]],
    ) -> Result<Vec<Result<Embedded>>> {
        let limits = self.limits();
        let input = &model.spec.input;
        let per = (input.channels * input.width * input.height) as usize;
        let chunk = (THUMB_BUDGET / per.max(1)).max(1);
        let mut out = Vec::with_capacity(images.len());
        for part in images.chunks(chunk) {
            let thumbs = preprocess::prepare_many(part, limits, input);
            let ok: Vec<&preprocess::Thumb> =
                thumbs.iter().filter_map(|t| t.as_ref().ok()).collect();
            let mut vectors = embed(model, &ok)?.into_iter();
            for t in thumbs {
                out.push(t.and_then(|t| {
                    let vector = vectors.next().ok_or_else(|| {
                        Error::plugin(
                            &model.record.plugin,
                            lookalike_plugin::PluginError::InvalidSpec(
                                "fewer embeddings than images".into(),
                            ),
                        )
                    })?;
                    Ok(Embedded {
                        width: t.width,
                        height: t.height,
                        vector,
                    })
                }));
            }
        }
        Ok(out)
    }
}

/// Label-only items as [`ImageMeta`]s.
fn labelled<'a, I>(items: I) -> Vec<(&'a [u8], Cow<'a, ImageMeta>)>
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a str>)>,
{
    items
        .into_iter()
        .map(|(b, l)| {
            let meta = ImageMeta {
                label: l.map(str::to_string),
                ..ImageMeta::default()
            };
            (b, Cow::Owned(meta))
        })
        .collect()
}

/// FAISS adds a piece of more than this many vectors on every core, a smaller one on one core
/// (`hnsw_add_vertices`: `omp parallel if (i1 > i0 + 100)`).
const FAISS_PARALLEL_ADD: usize = 100;

/// The size of the next piece of HNSW adds, from the last one (`last` vectors in `took`):
/// as many as fit in [`HNSW_HOLD`], at most [`HNSW_ADD_MAX`]. A piece of up to
/// [`FAISS_PARALLEL_ADD`] vectors ran on one core; when the same work spread over `cores`
/// would fit more than that, the next piece is large enough for FAISS to use them all. At a
/// million vectors of 256 dimensions, pieces sized from one core's speed stayed at about 60
/// vectors and cost 400 us a vector against 190 us on two cores.
fn next_piece(last: usize, took: Duration, cores: usize) -> usize {
    let per_vector = took.as_secs_f64() / last.max(1) as f64;
    let hold = HNSW_HOLD.as_secs_f64();
    let cores = cores.max(1) as f64;
    let (on_one_core, on_all_cores) = if last > FAISS_PARALLEL_ADD {
        (per_vector * cores, per_vector)
    } else {
        (per_vector, per_vector / cores)
    };
    let fits_all = (hold / on_all_cores.max(1e-9)) as usize;
    if cores > 1.0 && fits_all > FAISS_PARALLEL_ADD {
        fits_all.min(HNSW_ADD_MAX)
    } else {
        let fits_one = (hold / on_one_core.max(1e-9)) as usize;
        fits_one.clamp(1, FAISS_PARALLEL_ADD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_grow_past_faiss_threshold_when_all_cores_fit_the_hold() {
        let ms = Duration::from_millis;
        // 60 vectors on one core in 24 ms (0.4 ms each): 0.2 ms each on two cores, so about
        // 125 fit in 25 ms.
        let n = next_piece(60, ms(24), 2);
        assert!(n > FAISS_PARALLEL_ADD && n <= HNSW_ADD_MAX, "{n}");
        // And stay there once measured on two cores.
        assert_eq!(next_piece(125, ms(25), 2), 125);
        // One core: never past FAISS's threshold.
        assert_eq!(next_piece(60, ms(24), 1), 62);
        // 20 ms a vector (2,408 dimensions): one at a time.
        assert_eq!(next_piece(1, ms(20), 2), 1);
        // Cheap vectors: capped.
        assert_eq!(next_piece(256, ms(2), 2), HNSW_ADD_MAX);
        // A slow piece on all cores falls back to one-core pieces that fit.
        let n = next_piece(150, ms(150), 2);
        assert!((1..=FAISS_PARALLEL_ADD).contains(&n), "{n}");
    }
}
