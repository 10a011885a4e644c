//! Batch loading on worker threads: decode the stored bytes by the decode policy (see
//! `preprocess`), normalise to the extractor's input, augment, and hand finished batches to the trainer through bounded
//! crossbeam channels (two batches in flight per worker at most, so memory stays flat).
//!
//! Which images form each batch is decided up front for the epoch ([`plan_epoch`]) from the
//! job's seed, and each batch's augmentation draws from a generator seeded by (seed, epoch,
//! batch): the batches are the same whatever the thread timing, which is what lets a resumed
//! job repeat an uninterrupted one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use lookalike_plugin::InputSpec;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::store::Store;
use crate::Db;
use crate::ImageId;

use super::Augment;

/// One batch ready for the model: `n x C x H x W` values and a label index per image.
#[derive(Debug)]
pub(crate) struct Batch {
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

/// A seed for a (job seed, epoch, batch, purpose) tuple.
pub(crate) fn derive_seed(seed: u64, epoch: usize, batch: usize, purpose: u64) -> u64 {
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (batch as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ purpose.wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The batches of one epoch: `steps` batches of `labelled` images in groups of `per_label`
/// from one label each (labels taken round-robin in a shuffled order, images in a shuffled
/// order per label), plus `random` images from anywhere in the training split (and any room a
/// group could not fill). A label with fewer than `per_label` images gives all it has (never
/// an image twice in a batch) and the batch takes more labels; a label with one image is never
/// a group (it has no positive pair), only a random image, a negative for the others.
pub(crate) fn plan_epoch(
    train: &BTreeMap<u32, Vec<ImageId>>,
    seed: u64,
    epoch: usize,
    steps: usize,
    labelled: usize,
    per_label: usize,
    random: usize,
) -> Vec<Vec<(ImageId, u32)>> {
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, epoch, 0, 1));
    let mut pools: Vec<(u32, Vec<ImageId>, usize)> = train
        .iter()
        .filter(|(_, ids)| ids.len() >= 2)
        .map(|(l, ids)| {
            let mut ids = ids.clone();
            ids.shuffle(&mut rng);
            (*l, ids, 0)
        })
        .collect();
    let all: Vec<(ImageId, u32)> = train
        .iter()
        .flat_map(|(l, ids)| ids.iter().map(move |id| (*id, *l)))
        .collect();
    let mut order: Vec<usize> = (0..pools.len()).collect();
    order.shuffle(&mut rng);
    let mut next_label = 0;
    let per_label = per_label.max(2);
    let mut batches = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut batch = Vec::with_capacity(labelled + random);
        let mut used = Vec::new();
        let mut room = labelled;
        while room >= 2 && used.len() < pools.len() {
            // The next label in the round-robin order that this batch does not hold yet
            // (a reshuffle in the middle of a batch could repeat one).
            let pick = loop {
                if next_label == order.len() {
                    order.shuffle(&mut rng);
                    next_label = 0;
                }
                let p = order[next_label];
                next_label += 1;
                if !used.contains(&p) {
                    break p;
                }
            };
            used.push(pick);
            let (label, ids, cursor) = &mut pools[pick];
            let take = per_label.min(ids.len()).min(room);
            // Too few left in this pass over the label: a fresh order, so that a group never
            // holds an image twice.
            if ids.len() - *cursor < take {
                ids.shuffle(&mut rng);
                *cursor = 0;
            }
            batch.extend(ids[*cursor..*cursor + take].iter().map(|id| (*id, *label)));
            *cursor += take;
            room -= take;
        }
        if !all.is_empty() {
            for _ in 0..random + room {
                batch.push(all[rng.random_range(0..all.len())]);
            }
        }
        batches.push(batch);
    }
    batches
}

/// Worker threads producing the batches of `plan` in order.
pub(crate) struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    stop: Arc<AtomicBool>,
    /// Images of the plan removed from the database since the job started: skipped.
    vanished: Arc<AtomicUsize>,
}

impl Loader {
    /// Starts `workers` threads over `plan` (batch `b` goes to worker `b % workers`).
    pub fn start(
        db: Db,
        spec: InputSpec,
        augment: Augment,
        plan: Vec<Vec<(ImageId, u32)>>,
        seed: u64,
        epoch: usize,
        workers: usize,
    ) -> Loader {
        let workers = workers.max(1);
        let plan = Arc::new(plan);
        let stop = Arc::new(AtomicBool::new(false));
        let vanished = Arc::new(AtomicUsize::new(0));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = bounded(2);
            receivers.push(rx);
            let (db, spec, plan, stop, gone) = (
                db.clone(),
                spec.clone(),
                plan.clone(),
                stop.clone(),
                vanished.clone(),
            );
            handles.push(std::thread::spawn(move || {
                for b in (w..plan.len()).step_by(workers) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let batch = load(db.store(), &spec, augment, &plan[b], seed, epoch, b, &gone);
                    if tx.send(batch).is_err() {
                        return; // the trainer went away
                    }
                }
            }));
        }
        Loader {
            receivers,
            handles,
            next: 0,
            stop,
            vanished,
        }
    }

    /// Images skipped so far because they were removed while the job ran.
    pub fn vanished(&self) -> usize {
        self.vanished.load(Ordering::Relaxed)
    }

    /// The next batch in plan order; `None` after the last.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        let w = self.next % self.receivers.len();
        self.next += 1;
        self.receivers[w].recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock workers waiting to send, then wait for them.
        for r in &self.receivers {
            while r.try_recv().is_ok() {}
        }
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Loads one batch; an image removed since the plan was made is left out and counted in
/// `vanished` (a removal during a job does not fail it).
#[allow(clippy::too_many_arguments)]
fn load(
    store: &Store,
    spec: &InputSpec,
    augment: Augment,
    items: &[(ImageId, u32)],
    seed: u64,
    epoch: usize,
    b: usize,
    vanished: &AtomicUsize,
) -> Result<Batch> {
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, epoch, b, 2));
    let per = (spec.channels * spec.width * spec.height) as usize;
    let mut pixels = Vec::with_capacity(per * items.len());
    let mut labels = Vec::with_capacity(items.len());
    for (id, label) in items {
        let Some(thumb) = store.thumb(*id, spec)? else {
            vanished.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let start = pixels.len();
        thumb.normalised_into(spec, &mut pixels);
        augment.apply(&mut pixels[start..], spec, &mut rng);
        labels.push(*label);
    }
    Ok(Batch { pixels, labels })
}

impl Augment {
    /// Augments one image's `C x H x W` normalised values in place.
    pub(crate) fn apply(&self, px: &mut [f32], spec: &InputSpec, rng: &mut StdRng) {
        let (c, h, w) = (
            spec.channels as usize,
            spec.height as usize,
            spec.width as usize,
        );
        let plane = h * w;
        // Back to [0, 1] values so that fills and colour changes mean the same everywhere.
        for ch in 0..c {
            let (m, s) = (spec.mean[ch], spec.std[ch]);
            px[ch * plane..(ch + 1) * plane]
                .iter_mut()
                .for_each(|v| *v = *v * s + m);
        }
        let flip = self.flip && rng.random_bool(0.5);
        let (dx, dy) = if self.shift > 0 {
            let s = self.shift as i32;
            (rng.random_range(-s..=s), rng.random_range(-s..=s))
        } else {
            (0, 0)
        };
        let zoom = if self.zoom > 0.0 {
            1.0 + rng.random_range(0.0..=self.zoom)
        } else {
            1.0
        };
        let angle = if self.rotate_degrees > 0.0 {
            rng.random_range(-self.rotate_degrees..=self.rotate_degrees)
                .to_radians()
        } else {
            0.0
        };
        if flip || dx != 0 || dy != 0 || angle != 0.0 || zoom != 1.0 {
            let (sin, cos) = angle.sin_cos();
            let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
            let src = px.to_vec();
            for ch in 0..c {
                let sp = &src[ch * plane..(ch + 1) * plane];
                let dp = &mut px[ch * plane..(ch + 1) * plane];
                for y in 0..h {
                    for x in 0..w {
                        // Output (x, y) samples the input at the inverse transform (the border repeats).
                        let xo = (if flip { w - 1 - x } else { x } as f32 - dx as f32 - cx) / zoom;
                        let yo = (y as f32 - dy as f32 - cy) / zoom;
                        let xs = cos * xo + sin * yo + cx;
                        let ys = -sin * xo + cos * yo + cy;
                        dp[y * w + x] = bilinear(sp, w, h, xs, ys);
                    }
                }
            }
        }
        if self.jitter > 0.0 {
            let b = rng.random_range(-self.jitter..=self.jitter);
            let k = 1.0 + rng.random_range(-self.jitter..=self.jitter);
            px.iter_mut()
                .for_each(|v| *v = ((*v - 0.5) * k + 0.5 + b).clamp(0.0, 1.0));
        }
        if self.colour > 0.0 {
            for ch in 0..c {
                let k = 1.0 + rng.random_range(-self.colour..=self.colour);
                px[ch * plane..(ch + 1) * plane]
                    .iter_mut()
                    .for_each(|v| *v = (*v * k).clamp(0.0, 1.0));
            }
        }
        if self.noise > 0.0 {
            for v in px.iter_mut() {
                // Box-Muller.
                let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = rng.random();
                let n = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                *v += self.noise * n;
            }
        }
        for ch in 0..c {
            let (m, s) = (spec.mean[ch], spec.std[ch]);
            px[ch * plane..(ch + 1) * plane]
                .iter_mut()
                .for_each(|v| *v = (*v - m) / s);
        }
    }
}

fn bilinear(p: &[f32], w: usize, h: usize, x: f32, y: f32) -> f32 {
    // Outside the image the nearest border pixel repeats: black around a Fashion-MNIST
    // garment, the composited background (white by default) around a transparent icon, the
    // same as the images queries bring.
    let (x, y) = (x.clamp(0.0, (w - 1) as f32), y.clamp(0.0, (h - 1) as f32));
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: f32, yi: f32| -> f32 {
        let (xi, yi) = ((xi as usize).min(w - 1), (yi as usize).min(h - 1));
        p[yi * w + xi]
    };
    at(x0, y0) * (1.0 - fx) * (1.0 - fy)
        + at(x0 + 1.0, y0) * fx * (1.0 - fy)
        + at(x0, y0 + 1.0) * (1.0 - fx) * fy
        + at(x0 + 1.0, y0 + 1.0) * fx * fy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_and_mix_labels() {
        let mut train = BTreeMap::new();
        for l in 0..5u32 {
            train.insert(l, (0..20).map(|i| ImageId(l as u64 * 100 + i)).collect());
        }
        let a = plan_epoch(&train, 42, 3, 10, 12, 3, 2);
        let b = plan_epoch(&train, 42, 3, 10, 12, 3, 2);
        let c = plan_epoch(&train, 42, 4, 10, 12, 3, 2);
        assert_eq!(a, b);
        assert_ne!(a, c);
        for batch in &a {
            assert_eq!(batch.len(), 14);
            let labels: std::collections::BTreeSet<u32> = batch[..12].iter().map(|x| x.1).collect();
            assert_eq!(labels.len(), 4);
        }
    }

    #[test]
    fn few_images_per_label_give_all_they_have_and_singletons_are_negatives_only() {
        // 30 labels of 3 images, 5 of 2, 10 of 1.
        let mut train = BTreeMap::new();
        for l in 0..45u32 {
            let n = match l {
                0..30 => 3,
                30..35 => 2,
                _ => 1,
            };
            train.insert(l, (0..n).map(|i| ImageId(u64::from(l) * 100 + i)).collect());
        }
        let plan = plan_epoch(&train, 7, 0, 20, 24, 8, 4);
        let mut seen = std::collections::BTreeSet::new();
        for batch in &plan {
            assert_eq!(batch.len(), 28, "labelled room and random picks filled");
            // The groups are the runs of one label at the start (a room of one left at the
            // end goes to random picks).
            let mut groups: Vec<(u32, usize)> = Vec::new();
            for (_, l) in &batch[..24] {
                match groups.last_mut() {
                    Some((last, n)) if last == l => *n += 1,
                    _ => groups.push((*l, 1)),
                }
            }
            if groups.last().is_some_and(|g| g.1 == 1) {
                groups.pop();
            }
            let in_groups: usize = groups.iter().map(|g| g.1).sum();
            assert!(in_groups >= 23, "{groups:?}");
            let ids: std::collections::BTreeSet<ImageId> =
                batch[..in_groups].iter().map(|x| x.0).collect();
            assert_eq!(ids.len(), in_groups, "no image twice among the groups");
            // Each label gives all it has (3 or 2; the last one maybe fewer) and never one.
            assert!(groups.len() >= 8, "more labels per batch: {groups:?}");
            assert!(
                groups.iter().all(|g| g.0 < 35),
                "a singleton is never a group"
            );
            assert!(groups.iter().all(|g| g.1 >= 2 && g.1 <= 3));
            seen.extend(groups.iter().map(|g| g.0));
        }
        // Every label with a pair is a group somewhere in the epoch.
        assert_eq!(seen.len(), 35);
    }

    #[test]
    fn shifts_and_rotations_repeat_the_border_instead_of_black() {
        // A white icon background with a dark centre (composited transparency is white).
        let spec = InputSpec::rgb(8, 8);
        let mut px = vec![1.0f32; 3 * 64];
        for ch in 0..3 {
            px[ch * 64 + 3 * 8 + 3] = 0.0;
        }
        let moved = Augment {
            shift: 3,
            rotate_degrees: 20.0,
            ..Augment::none()
        };
        for seed in 0..8 {
            let mut out = px.clone();
            moved.apply(&mut out, &spec, &mut StdRng::seed_from_u64(seed));
            // The corners are never in the dark centre's reach: white, not black fill.
            for ch in 0..3 {
                for i in [0, 7, 56, 63] {
                    assert!(
                        (out[ch * 64 + i] - 1.0).abs() < 1e-5,
                        "seed {seed}: {out:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn identity_augmentation_changes_nothing() {
        let spec = InputSpec::luma(4, 3).normalised(&[0.5], &[0.25]);
        let px: Vec<f32> = (0..12).map(|i| i as f32 / 10.0 - 0.5).collect();
        let mut out = px.clone();
        Augment::none().apply(&mut out, &spec, &mut StdRng::seed_from_u64(1));
        for (a, b) in out.iter().zip(&px) {
            assert!((a - b).abs() < 1e-5);
        }
        // A flip-only augmentation mirrors rows (when it fires).
        let flip = Augment {
            flip: true,
            ..Augment::none()
        };
        let mut seen_flip = false;
        for s in 0..8 {
            let mut out = px.clone();
            flip.apply(&mut out, &spec, &mut StdRng::seed_from_u64(s));
            if (out[0] - px[3]).abs() < 1e-5 {
                seen_flip = true;
            }
        }
        assert!(seen_flip);
    }
}
