//! The feature bank of a trainable with frozen pretrained layers
//! ([`Trainable::frozen_features`]): each image's features computed once per view, so that the
//! head trains on rows of the bank instead of running the frozen layers at every step.
//!
//! View 0 is the image as queries see it (no augmentation), for every training and validation
//! image; views 1, 2, ... are the job's augmentation drawn afresh (seeded by view and batch),
//! for the training images only. A training step takes one of an image's views at random.
//! Views are added while they fit: at most [`TrainOptions::feature_views`], within
//! [`MAX_BANK_BYTES`] of memory, and, for a job with a time budget, while the next view is
//! expected to end before half of the budget is spent (view 0 is always complete).

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
        };
        let mut first: Vec<ImageId> = train.iter().chain(eval).copied().collect();
        first.sort_unstable();
        first.dedup();
        let budget = opts.max_minutes.map(|m| m * 60.0 / 2.0);
        let mut last_view_seconds = 0.0;
        for view in 0..opts.feature_views.max(1) {
            let (ids, augment) = if view == 0 {
                (first.as_slice(), Augment::none())
            } else {
                (train, opts.augment)
            };
            if view > 0 {
                let bytes = (bank.rows.len() + ids.len() * bank.dim) * 4;
                let expected_end = started.elapsed().as_secs_f64() + last_view_seconds;
                if augment == Augment::none()
                    || bytes > MAX_BANK_BYTES
                    || budget.is_some_and(|b| expected_end > b)
                {
                    break;
                }
            }
            let t = Instant::now();
            bank.add_view(
                db,
                name,
                trainable,
                spec,
                augment,
                ids,
                opts,
                view,
                cancelled,
                on_progress,
            )?;
            last_view_seconds = t.elapsed().as_secs_f64();
            bank.views = view + 1;
        }
        Ok(bank)
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
        cancelled: &dyn Fn() -> bool,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
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
            if self.dim == 0 {
                self.dim = dim;
            }
            let values: Vec<f32> = f.flatten_all().and_then(|t| t.to_vec1()).map_err(c_err)?;
            for (row, pos) in values.chunks_exact(dim).zip(&batch.labels) {
                let r = (self.rows.len() / dim) as u32;
                self.rows.extend_from_slice(row);
                self.index.entry(ids[*pos as usize]).or_default().push(r);
            }
        }
        Ok(())
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
