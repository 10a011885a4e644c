//! Held-out evaluation: a seeded stratified split, and retrieval metrics (accuracy@1 as in
//! the SimNet paper, mAP@10) of validation queries against a gallery of training images.

use std::collections::BTreeMap;

use lookalike_plugin::candle_core::{Device, Tensor};
use lookalike_plugin::Metric;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::ImageId;

/// Retrieval quality of a model on the held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    /// Share of validation queries whose nearest gallery image has their label.
    pub accuracy_at_1: f64,
    /// Mean over queries of (sum of precision at each relevant rank among the first 10) / 10.
    pub map_at_10: f64,
    /// Queries evaluated.
    pub queries: usize,
}

/// How the held-out split was made (see `split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holdout {
    /// Some images of every label: queries of labels the model trained on.
    Images,
    /// Whole labels: each held-out label's first image queries its other images, which the
    /// model never saw (the case of new labels).
    Labels,
}

impl Holdout {
    /// `"images"` or `"labels"`, as JSON output spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Holdout::Images => "images",
            Holdout::Labels => "labels",
        }
    }
}

/// A job's training images and its held-out queries.
#[derive(Debug, Clone)]
pub(crate) struct Split {
    /// Training images by label (labels with one image serve as negatives only).
    pub train: BTreeMap<u32, Vec<ImageId>>,
    /// Validation queries.
    pub queries: Vec<(ImageId, u32)>,
    /// Held-out images the gallery must hold: the answers of whole-label queries.
    pub answers: Vec<(ImageId, u32)>,
    /// How it was made.
    pub holdout: Holdout,
}

/// The held-out split. When most labels hold fewer than `per_label` images (the median
/// label), whole labels are held out: `share` of the labels with two or more images (at least
/// one, at most `most`, and never so many that fewer than two such labels are left to train
/// on), each giving one query and its other images as answers. Otherwise the split is
/// stratified: per label, `share` of its images (at least one when it has two or more) go to
/// validation, but the share shrinks so that about `most` images in all are held out when
/// `share` would hold out more (rounded per label). Seeded.
pub(crate) fn split(
    labelled: &[(ImageId, u32)],
    share: f64,
    most: usize,
    per_label: usize,
    seed: u64,
) -> Split {
    let mut by_label: BTreeMap<u32, Vec<ImageId>> = BTreeMap::new();
    for (id, l) in labelled {
        by_label.entry(*l).or_default().push(*id);
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5911);
    let mut counts: Vec<usize> = by_label.values().map(Vec::len).collect();
    counts.sort_unstable();
    let median = counts.get(counts.len() / 2).copied().unwrap_or(0);
    let pairs = counts.iter().filter(|n| **n >= 2).count();
    if median < per_label && pairs >= 3 {
        let mut candidates: Vec<u32> = by_label
            .iter()
            .filter(|(_, ids)| ids.len() >= 2)
            .map(|(l, _)| *l)
            .collect();
        candidates.shuffle(&mut rng);
        let held = ((pairs as f64 * share).round() as usize)
            .max(1)
            .min(most.max(1))
            .min(pairs - 2);
        let mut queries = Vec::with_capacity(held);
        let mut answers = Vec::new();
        for l in &candidates[..held] {
            if let Some(mut ids) = by_label.remove(l) {
                ids.shuffle(&mut rng);
                queries.push((ids[0], *l));
                answers.extend(ids[1..].iter().map(|id| (*id, *l)));
            }
        }
        queries.sort();
        answers.sort();
        return Split {
            train: by_label,
            queries,
            answers,
            holdout: Holdout::Labels,
        };
    }
    let share = share.min(most as f64 / labelled.len().max(1) as f64);
    let mut train = BTreeMap::new();
    let mut val = Vec::new();
    for (l, mut ids) in by_label {
        ids.shuffle(&mut rng);
        let n_val = if ids.len() >= 2 {
            ((ids.len() as f64 * share).round() as usize).clamp(1, ids.len() - 1)
        } else {
            0
        };
        val.extend(ids[..n_val].iter().map(|id| (*id, l)));
        train.insert(l, ids[n_val..].to_vec());
    }
    val.sort();
    Split {
        train,
        queries: val,
        answers: Vec::new(),
        holdout: Holdout::Images,
    }
}

/// A seeded sample of at most `n` items.
pub(crate) fn sample<T: Clone>(items: &[T], n: usize, seed: u64) -> Vec<T> {
    if items.len() <= n {
        return items.to_vec();
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    idx.truncate(n);
    idx.sort_unstable();
    idx.into_iter().map(|i| items[i].clone()).collect()
}

/// Metrics of `queries` against `gallery` (embeddings with labels), exact search under
/// `metric` ([`nearest`]).
pub(crate) fn retrieval(
    queries: &[(Vec<f32>, u32)],
    gallery: &[(Vec<f32>, u32)],
    metric: Metric,
) -> Result<Metrics> {
    if queries.is_empty() || gallery.is_empty() {
        return Err(Error::NotEnoughData(
            "no validation queries or no gallery images to evaluate with".into(),
        ));
    }
    let q: Vec<&[f32]> = queries.iter().map(|(v, _)| v.as_slice()).collect();
    let g: Vec<&[f32]> = gallery.iter().map(|(v, _)| v.as_slice()).collect();
    let found = nearest(&q, &g, 10, metric, |_, _| false)?;
    let (mut top1, mut ap_sum) = (0usize, 0f64);
    for ((_, label), near) in queries.iter().zip(found) {
        if near.first().is_some_and(|i| gallery[*i].1 == *label) {
            top1 += 1;
        }
        let (mut rel, mut ap) = (0usize, 0f64);
        for (rank, i) in near.iter().enumerate() {
            if gallery[*i].1 == *label {
                rel += 1;
                ap += rel as f64 / (rank + 1) as f64;
            }
        }
        ap_sum += ap / 10.0;
    }
    let n = queries.len() as f64;
    Ok(Metrics {
        accuracy_at_1: top1 as f64 / n,
        map_at_10: ap_sum / n,
        queries: queries.len(),
    })
}

/// The `k` nearest `gallery` rows of each query under `metric`, by exact search: indices into
/// `gallery`, nearest first, ties broken by index, leaving out the pairs for which
/// `skip(query, gallery_row)` holds. Blocks of 256 queries against blocks of 8,192 gallery
/// rows, one matrix product each, so memory beyond the inputs stays at one gallery block.
pub(crate) fn nearest(
    queries: &[&[f32]],
    gallery: &[&[f32]],
    k: usize,
    metric: Metric,
    skip: impl Fn(usize, usize) -> bool,
) -> Result<Vec<Vec<usize>>> {
    nearest_blocked(queries, gallery, k, metric, skip, 8192)
}

fn nearest_blocked(
    queries: &[&[f32]],
    gallery: &[&[f32]],
    k: usize,
    metric: Metric,
    skip: impl Fn(usize, usize) -> bool,
    gallery_block: usize,
) -> Result<Vec<Vec<usize>>> {
    if k == 0 || gallery.is_empty() {
        return Ok(vec![Vec::new(); queries.len()]);
    }
    let to_err = |e: lookalike_plugin::candle_core::Error| Error::plugin("exact search", e.into());
    let dim = gallery[0].len();
    let matrix = |rows: &[&[f32]]| -> Result<Tensor> {
        let flat: Vec<f32> = rows.iter().flat_map(|v| v.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), dim), &Device::Cpu).map_err(to_err)
    };
    let order = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::new(); queries.len()];
    for (gb, rows) in gallery.chunks(gallery_block.max(1)).enumerate() {
        let first = gb * gallery_block.max(1);
        let norms: Vec<f32> = rows.iter().map(|v| v.iter().map(|x| x * x).sum()).collect();
        let gt = matrix(rows)?.t().map_err(to_err)?;
        for (qb, chunk) in queries.chunks(256).enumerate() {
            let dots = matrix(chunk)?
                .matmul(&gt)
                .and_then(|d| d.to_vec2::<f32>())
                .map_err(to_err)?;
            for (i, row) in dots.into_iter().enumerate() {
                let q = qb * 256 + i;
                let candidates = &mut best[q];
                // Smaller is nearer: -q.g for unit vectors (cosine), |g|^2 - 2 q.g for L2
                // (|q|^2 is the same for every gallery row).
                candidates.extend(
                    row.iter()
                        .zip(&norms)
                        .enumerate()
                        .map(|(j, (d, n))| (first + j, d, n))
                        .filter(|(g, _, _)| !skip(q, *g))
                        .map(|(g, d, n)| match metric {
                            Metric::Cosine => (-d, g),
                            Metric::L2 => (n - 2.0 * d, g),
                        }),
                );
                if candidates.len() > k {
                    candidates.select_nth_unstable_by(k - 1, order);
                    candidates.truncate(k);
                }
            }
        }
    }
    Ok(best
        .into_iter()
        .map(|mut c| {
            c.sort_by(order);
            c.into_iter().map(|x| x.1).collect()
        })
        .collect())
}

/// Area under the ROC curve of scores for positives (`label` true) against negatives, and the
/// curve itself as (false positive rate, true positive rate) points from (0,0) to (1,1).
pub(crate) fn roc(scores: &[(f32, bool)]) -> (f64, Vec<(f64, f64)>) {
    let pos = scores.iter().filter(|s| s.1).count() as f64;
    let neg = scores.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return (f64::NAN, Vec::new());
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0f64, 0f64);
    let mut curve = vec![(0.0, 0.0)];
    let mut auc = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        // Ties move together.
        let t = sorted[i].0;
        let (tp0, fp0) = (tp, fp);
        while i < sorted.len() && sorted[i].0 == t {
            if sorted[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        auc += (fp - fp0) / neg * (tp + tp0) / 2.0 / pos;
        curve.push((fp / neg, tp / pos));
    }
    (auc, curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_and_seeded() {
        let labelled: Vec<(ImageId, u32)> =
            (0..100).map(|i| (ImageId(i), (i % 4) as u32)).collect();
        let s = split(&labelled, 0.2, 1000, 8, 9);
        assert_eq!(s.holdout, Holdout::Images);
        assert!(s.answers.is_empty());
        let (train, val) = (s.train, s.queries);
        assert_eq!(val.len(), 20);
        for l in 0..4 {
            assert_eq!(val.iter().filter(|v| v.1 == l).count(), 5);
            assert_eq!(train[&l].len(), 20);
        }
        assert_eq!(split(&labelled, 0.2, 1000, 8, 9).queries, val);
        assert_ne!(split(&labelled, 0.2, 1000, 8, 10).queries, val);
        // At most 8 held out (for 8 queries): 2 per label, the other 92 train.
        let s = split(&labelled, 0.2, 8, 8, 9);
        assert_eq!(s.queries.len(), 8);
        for l in 0..4 {
            assert_eq!(s.queries.iter().filter(|v| v.1 == l).count(), 2);
            assert_eq!(s.train[&l].len(), 23);
        }
        // Never fewer than one per label.
        assert_eq!(split(&labelled, 0.2, 0, 8, 9).queries.len(), 4);
    }

    #[test]
    fn few_images_per_label_hold_out_whole_labels() {
        // 50 labels of 3 images, 10 of 1 image.
        let mut labelled: Vec<(ImageId, u32)> =
            (0..150).map(|i| (ImageId(i), (i / 3) as u32)).collect();
        labelled.extend((0..10).map(|i| (ImageId(1000 + i), 100 + i as u32)));
        let s = split(&labelled, 0.1, 1000, 8, 3);
        assert_eq!(s.holdout, Holdout::Labels);
        assert_eq!(s.queries.len(), 5, "10 % of the 50 labels with pairs");
        assert_eq!(s.answers.len(), 10, "each query's two other images");
        for (q, l) in &s.queries {
            assert!(
                !s.train.contains_key(l),
                "a held-out label is not trained on"
            );
            assert_eq!(s.answers.iter().filter(|a| a.1 == *l).count(), 2);
            assert!(!s.answers.iter().any(|a| a.0 == *q));
        }
        assert_eq!(
            s.train.len(),
            55,
            "45 labels with pairs and the 10 singletons"
        );
        assert_eq!(split(&labelled, 0.1, 1000, 8, 3).queries, s.queries);
        // At most `most` queries; at least two labels with pairs left to train on.
        assert_eq!(split(&labelled, 0.1, 2, 8, 3).queries.len(), 2);
        let three: Vec<(ImageId, u32)> = (0..9).map(|i| (ImageId(i), (i / 3) as u32)).collect();
        let s = split(&three, 0.9, 1000, 8, 3);
        assert_eq!(
            (s.holdout, s.queries.len(), s.train.len()),
            (Holdout::Labels, 1, 2)
        );
        // Too few labels with pairs to hold any out whole: stratified.
        let two: Vec<(ImageId, u32)> = (0..6).map(|i| (ImageId(i), (i / 3) as u32)).collect();
        assert_eq!(split(&two, 0.5, 1000, 8, 3).holdout, Holdout::Images);
    }

    #[test]
    fn retrieval_on_separated_clusters_is_perfect() {
        let g: Vec<(Vec<f32>, u32)> = (0..20)
            .map(|i| (vec![(i % 2) as f32 * 10.0, i as f32 * 0.01], (i % 2) as u32))
            .collect();
        let q = vec![(vec![0.0, 0.05], 0), (vec![10.0, 0.05], 1)];
        let m = retrieval(&q, &g, Metric::L2).unwrap();
        assert_eq!(m.accuracy_at_1, 1.0);
        assert!((m.map_at_10 - 1.0).abs() < 1e-9);
        // Swapped labels: nothing right.
        let q = vec![(vec![0.0, 0.05], 1)];
        assert_eq!(retrieval(&q, &g, Metric::L2).unwrap().accuracy_at_1, 0.0);
    }

    #[test]
    fn nearest_orders_by_the_metric_skips_and_merges_blocks() {
        // Points on a line (L2) and unit vectors at growing angles (cosine).
        let line: Vec<Vec<f32>> = [0.0f32, 1.0, 3.0, 3.5, 10.0]
            .iter()
            .map(|x| vec![*x, 0.0])
            .collect();
        let rows: Vec<&[f32]> = line.iter().map(Vec::as_slice).collect();
        let queries = [rows[2], rows[0], rows[4]];
        let own = [2, 0, 4];
        let skip_self = |q: usize, g: usize| own[q] == g;
        let whole = nearest(&queries, &rows, 3, Metric::L2, skip_self).unwrap();
        assert_eq!(whole, vec![vec![3, 1, 0], vec![1, 2, 3], vec![3, 2, 1]]);
        // Gallery blocks of two rows merge to the same answer as one block.
        let blocked = nearest_blocked(&queries, &rows, 3, Metric::L2, skip_self, 2).unwrap();
        assert_eq!(blocked, whole);
        let unit: Vec<Vec<f32>> = [0.0f32, 0.3, 1.0, 2.0]
            .iter()
            .map(|a| vec![a.cos(), a.sin()])
            .collect();
        let rows: Vec<&[f32]> = unit.iter().map(Vec::as_slice).collect();
        let near = nearest(&rows[..1], &rows, 10, Metric::Cosine, |_, g| g == 0).unwrap();
        assert_eq!(near, vec![vec![1, 2, 3]]);
    }

    #[test]
    fn roc_auc_of_perfect_and_random_scores() {
        let perfect: Vec<(f32, bool)> = (0..10).map(|i| (i as f32, i >= 5)).collect();
        assert!((roc(&perfect).0 - 1.0).abs() < 1e-9);
        let tied: Vec<(f32, bool)> = (0..10).map(|i| (0.5, i % 2 == 0)).collect();
        assert!((roc(&tied).0 - 0.5).abs() < 1e-9);
    }
}
