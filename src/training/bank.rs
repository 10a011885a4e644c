//! The feature bank of a trainable with frozen pretrained layers
//! ([`Trainable::frozen_features`]): each image's features computed once per view, so that the
//! head trains on rows of the bank instead of running the frozen layers at every step.
//!
//! View 0 is the image as queries see it (no augmentation), for every training and validation
//! image; views 1, 2, ... are the job's augmentation drawn afresh (seeded by view and batch),
//! for the training images only. A training step takes one of an image's views at random.
//! Views are added while they fit: at most [`TrainOptions::feature_views`], within
//! [`MAX_BANK_BYTES`] of memory, and, for a job with a time budget, while the next view is
//! expected to end before half of the budget is spent; a view still running at that point is
//! kept as far as it got (view 0 is always complete).
//!
//! Where the database's active model stores exactly these features (a head on the active
//! model's frozen backbone: [`Trainable::frozen_features_id`]), view 0 is read from the
//! stored embeddings instead of running the frozen layers over every image.

use std::collections::HashMap;
use std::time::Instant;

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::{ExtractorSpec, Trainable};
use rand::rngs::StdRng;
use rand::Rng;

use super::loader::Loader;
use super::{Augment, TrainOptions};
use crate::error::{Error, Result};
use crate::{Db, ImageId};

/// The most memory the bank takes (rows of f32).
pub(crate) const MAX_BANK_BYTES: usize = 1 << 30;
/// Images per forward pass of the frozen layers.
const CHUNK: usize = 16;

/// Features per image and view.
pub(crate) struct FeatureBank {
    dim: usize,
    rows: Vec<f32>,
    /// Each image's rows, view 0 first.
    index: HashMap<ImageId, Vec<u32>>,
    /// Complete views (1 = unaugmented only).
    pub views: usize,
    /// Images whose view 0 was read from the database's stored embeddings.
    pub from_store: usize,
}

impl FeatureBank {
    /// Computes the bank: view 0 of `train` and `eval` images, then augmented views of `train`.
    /// `on_progress(done, total)` follows the images of the view being computed; `cancelled`
    /// is polled between batches.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        db: &Db,
        name: &str,
        trainable: &dyn Trainable,
        spec: &ExtractorSpec,
        opts: &TrainOptions,
        train: &[ImageId],
        eval: &[ImageId],
        cancelled: &dyn Fn() -> bool,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<FeatureBank> {
        let started = Instant::now();
        let mut bank = FeatureBank {
            dim: 0,
            rows: Vec::new(),
            index: HashMap::new(),
            views: 0,
            from_store: 0,
        };
        let mut first: Vec<ImageId> = train.iter().chain(eval).copied().collect();
        first.sort_unstable();
        first.dedup();
        let budget = opts.max_minutes.map(|m| m * 60.0 / 2.0);
        // Seconds per image through the frozen layers, once measured.
        let mut per_image: Option<f64> = None;
        for view in 0..opts.feature_views.max(1) {
            let (ids, augment) = if view == 0 {
                (first.as_slice(), Augment::none())
            } else {
                (train, opts.augment)
            };
            let rest;
            let ids = if view == 0 {
                rest = bank.add_stored(db, trainable, spec, ids, on_progress)?;
                rest.as_slice()
            } else {
                let bytes = (bank.rows.len() + ids.len() * bank.dim) * 4;
                let expected = per_image.unwrap_or(0.0) * ids.len() as f64;
                let expected_end = started.elapsed().as_secs_f64() + expected;
                if augment == Augment::none()
                    || bytes > MAX_BANK_BYTES
                    || budget.is_some_and(|b| expected_end > b)
                {
                    break;
                }
                ids
            };
            // A view ends at half of the budget, complete or not (the estimate above is
            // missing when view 0 came from the store, and machines slow down).
            let stop_at = if view == 0 { None } else { budget };
            let t = Instant::now();
            let complete = bank.add_view(
                db,
                name,
                trainable,
                spec,
                augment,
                ids,
                opts,
                view,
                (started, stop_at),
                cancelled,
                on_progress,
            )?;
            if !ids.is_empty() {
                per_image = Some(t.elapsed().as_secs_f64() / ids.len() as f64);
            }
            if !complete {
                break;
            }
            bank.views = view + 1;
        }
        Ok(bank)
    }

    /// View 0 of `ids` from the database's stored embeddings, where they are the trainable's
    /// frozen features ([`Trainable::frozen_features_id`]: a head on the active model's
    /// backbone); the ids left for the frozen layers.
    fn add_stored(
        &mut self,
        db: &Db,
        trainable: &dyn Trainable,
        spec: &ExtractorSpec,
        ids: &[ImageId],
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageId>> {
        let id = trainable.frozen_features_id();
        let Some(stored) = db.stored_features(id, &spec.input, ids)? else {
            return Ok(ids.to_vec());
        };
        for (id, v) in stored {
            self.push_row(id, &v)?;
        }
        self.from_store = self.index.len();
        on_progress(self.index.len(), ids.len());
        Ok(ids
            .iter()
            .filter(|id| !self.index.contains_key(id))
            .copied()
            .collect())
    }

    /// Adds a row of `id`'s features.
    fn push_row(&mut self, id: ImageId, row: &[f32]) -> Result<()> {
        if self.dim == 0 {
            self.dim = row.len();
        }
        if row.len() != self.dim {
            return Err(Error::DimensionMismatch {
                what: "frozen features".into(),
                expected: self.dim,
                got: row.len(),
            });
        }
        let r = (self.rows.len() / self.dim) as u32;
        self.rows.extend_from_slice(row);
        self.index.entry(id).or_default().push(r);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_view(
        &mut self,
        db: &Db,
        name: &str,
        trainable: &dyn Trainable,
        spec: &ExtractorSpec,
        augment: Augment,
        ids: &[ImageId],
        opts: &TrainOptions,
        view: usize,
        (started, stop_at): (Instant, Option<f64>),
        cancelled: &dyn Fn() -> bool,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<bool> {
        if ids.is_empty() {
            return Ok(true);
        }
        let c_err = |e: lookalike_plugin::candle_core::Error| Error::plugin(name, e.into());
        // The loader's label slot carries each image's position in `ids`, so that the rows
        // of a batch can be matched to their images (an image removed meanwhile is skipped).
        let plan: Vec<Vec<(ImageId, u32)>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as u32))
            .collect::<Vec<_>>()
            .chunks(CHUNK)
            .map(<[_]>::to_vec)
            .collect();
        let input = &spec.input;
        let (c, h, w) = (
            input.channels as usize,
            input.height as usize,
            input.width as usize,
        );
        let mut loader = Loader::start(
            db.clone(),
            input.clone(),
            augment,
            plan,
            opts.seed ^ 0xBA4C,
            view,
            opts.workers,
        );
        let mut done = 0;
        while let Some(batch) = loader.next_batch() {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let batch = batch?;
            let n = batch.labels.len();
            done += CHUNK;
            on_progress(done.min(ids.len()), ids.len());
            if n == 0 {
                continue;
            }
            let x = Tensor::from_vec(batch.pixels, (n, c, h, w), &Device::Cpu).map_err(c_err)?;
            let f = trainable
                .frozen_features(&x)
                .ok_or_else(|| Error::NotTrainable(name.to_string()))?
                .map_err(|e| Error::plugin(name, e))?;
            let dim = f.dim(1).map_err(c_err)?;
            let values: Vec<f32> = f.flatten_all().and_then(|t| t.to_vec1()).map_err(c_err)?;
            for (row, pos) in values.chunks_exact(dim).zip(&batch.labels) {
                self.push_row(ids[*pos as usize], row)?;
            }
            if stop_at.is_some_and(|s| started.elapsed().as_secs_f64() > s) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Rows for `items` (one random view each; images not in the bank are left out), `n x dim`
    /// values in row order, with the labels of the rows taken.
    pub fn gather(&self, items: &[(ImageId, u32)], rng: &mut StdRng) -> (Vec<f32>, Vec<u32>) {
        let mut values = Vec::with_capacity(items.len() * self.dim);
        let mut labels = Vec::with_capacity(items.len());
        for (id, label) in items {
            let Some(rows) = self.index.get(id) else {
                continue;
            };
            let r = rows[rng.random_range(0..rows.len())] as usize;
            values.extend_from_slice(&self.rows[r * self.dim..(r + 1) * self.dim]);
            labels.push(*label);
        }
        (values, labels)
    }

    /// View 0 (unaugmented) rows of `ids` present in the bank, with their ids.
    pub fn plain(&self, ids: &[ImageId]) -> (Vec<ImageId>, Vec<f32>) {
        let mut found = Vec::with_capacity(ids.len());
        let mut values = Vec::with_capacity(ids.len() * self.dim);
        for id in ids {
            if let Some(r) = self.index.get(id).and_then(|rows| rows.first()) {
                let r = *r as usize;
                found.push(*id);
                values.extend_from_slice(&self.rows[r * self.dim..(r + 1) * self.dim]);
            }
        }
        (found, values)
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.dim
    }
}
