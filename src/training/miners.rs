//! Pair mining: which pairs (or anchor/positive/negatives groups) of a batch the loss sees.
//!
//! A miner gets the batch's labels and the squared Euclidean distances between its current
//! embeddings (computed once, detached) and returns indices into the batch. Three strategies,
//! from the three papers:
//!
//! * [`Opms`]: the SimNet paper's online pair mining (Algorithm 1, Eq. 2) with its curriculum,
//!   and its "naive random" baseline (`Opms::naive`).
//! * [`Balanced`]: the MLP paper's 50/50 same/different pairs, balanced over labels (§4.2).
//! * [`OneVsMany`]: one positive and N random negatives per anchor (the fused paper, §3.2).
//!
//! And one that leaves the weighing to the loss: [`SupCon`] hands over the whole labelled
//! batch, for the supervised contrastive loss (Khosla et al. 2020), a softmax over every pair
//! of each row. It is the default: in 15 minutes on Fashion-MNIST it learns far more than the
//! pair miners with the contrastive loss (docs/benchmarks.md).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// What a miner selected, as indices into the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Mined {
    /// `(a, b, dissimilar)` pairs, in the order the loss should see them.
    Pairs(Vec<(usize, usize, bool)>),
    /// Per anchor: the anchor, one positive, and the same number of negatives for each.
    OneVsMany(Vec<(usize, usize, Vec<usize>)>),
    /// Every pair of the batch, weighed by the loss itself (the batch goes to the plugin with
    /// its labels); `pairs` is how many that is, 0 when no two rows share a label.
    Labelled {
        /// Pairs in the batch.
        pairs: usize,
    },
}

impl Mined {
    /// How many pairs this is (an anchor with N negatives counts N + 1).
    pub fn pairs(&self) -> usize {
        match self {
            Mined::Pairs(p) => p.len(),
            Mined::OneVsMany(g) => g.iter().map(|(_, _, n)| n.len() + 1).sum(),
            Mined::Labelled { pairs } => *pairs,
        }
    }
}

/// Squared distances between the rows of a batch's embeddings, `n x n`.
#[derive(Debug, Clone)]
pub struct Distances {
    n: usize,
    d2: Vec<f32>,
}

impl Distances {
    /// From `n` embeddings of `dim` values each, row-major.
    pub fn new(embeddings: &[f32], dim: usize) -> Self {
        let n = embeddings.len().checked_div(dim).unwrap_or(0);
        let mut d2 = vec![0f32; n * n];
        for i in 0..n {
            let a = &embeddings[i * dim..(i + 1) * dim];
            for j in i + 1..n {
                let b = &embeddings[j * dim..(j + 1) * dim];
                let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
                d2[i * n + j] = d;
                d2[j * n + i] = d;
            }
        }
        Distances { n, d2 }
    }

    /// Squared distance between rows `i` and `j`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.d2[i * self.n + j]
    }
}

/// A pair-mining strategy. One instance serves a whole job; the job calls
/// [`Miner::start_epoch`] before each epoch's batches.
pub trait Miner: Send + std::fmt::Debug {
    /// The name used in options, reports and checkpoints.
    fn name(&self) -> &'static str;

    /// Called before epoch `epoch` (0-based) of `epochs`.
    fn start_epoch(&mut self, _epoch: usize, _epochs: usize) {}

    /// The curriculum parameter, for miners that have one (OPMS's lambda).
    fn lambda(&self) -> Option<f32> {
        None
    }

    /// Selects from a batch with `labels` (one per row) and the rows' distances.
    fn mine(&mut self, labels: &[u32], distances: &Distances, rng: &mut StdRng) -> Mined;
}

/// Every same-label pair of the batch, `(i, j)` with `i < j`.
fn positive_pairs(labels: &[u32]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..labels.len() {
        for j in i + 1..labels.len() {
            if labels[i] == labels[j] {
                out.push((i, j));
            }
        }
    }
    out
}

/// `count` random different-label pairs (fewer if the batch has a single label).
fn random_negatives(labels: &[u32], count: usize, rng: &mut StdRng) -> Vec<(usize, usize)> {
    let n = labels.len();
    let mut out = Vec::with_capacity(count);
    if n < 2 || labels.iter().all(|l| *l == labels[0]) {
        return out;
    }
    let mut tries = 0;
    while out.len() < count && tries < count * 20 {
        tries += 1;
        let (i, j) = (rng.random_range(0..n), rng.random_range(0..n));
        if labels[i] != labels[j] {
            out.push((i.min(j), i.max(j)));
        }
    }
    out
}

/// The SimNet paper's online pair mining strategy (Algorithm 1).
///
/// Per batch: all positive pairs; `negatives_per_positive` times as many random negative
/// pairs; negatives that already satisfy the pair constraint of Eq. 2 for their anchor
/// (`max_p D(q, p)^2 + m < D(q, n)^2`: the hinge of the contrastive loss is zero for them, so
/// they teach nothing) are pruned; the rest are weight-sampled by lambda (uniform at 0, in
/// proportion to hardness at 1) down to as many as there are positives; all pairs are then
/// sorted easy to hard (positives by growing distance, negatives by shrinking distance; the
/// hardest last). Lambda starts at 0 and grows by 1/epochs each epoch, as in the paper.
///
/// The naive baseline (the paper's Table 2, row F) takes the same positives and as many random
/// negatives, without pruning, weighting or sorting.
#[derive(Debug, Clone)]
pub struct Opms {
    /// Margin `m` of Eq. 2 (the contrastive loss's margin, 1 in the paper).
    pub margin: f32,
    /// Random negative candidates drawn per positive pair before pruning.
    pub negatives_per_positive: usize,
    lambda: f32,
    naive: bool,
}

impl Opms {
    /// OPMS with margin 1 and 4 negative candidates per positive.
    pub fn new() -> Self {
        Opms {
            margin: 1.0,
            negatives_per_positive: 4,
            lambda: 0.0,
            naive: false,
        }
    }

    /// The paper's naive random-pairs baseline.
    pub fn naive() -> Self {
        Opms {
            naive: true,
            ..Opms::new()
        }
    }
}

impl Default for Opms {
    fn default() -> Self {
        Opms::new()
    }
}

impl Miner for Opms {
    fn name(&self) -> &'static str {
        if self.naive {
            "naive"
        } else {
            "opms"
        }
    }

    fn start_epoch(&mut self, epoch: usize, epochs: usize) {
        // Algorithm 1: lambda = 0, then lambda += 1/numEpochs at the top of every epoch.
        self.lambda = ((epoch + 1) as f32 / epochs.max(1) as f32).min(1.0);
    }

    fn lambda(&self) -> Option<f32> {
        (!self.naive).then_some(self.lambda)
    }

    fn mine(&mut self, labels: &[u32], dist: &Distances, rng: &mut StdRng) -> Mined {
        let positives = positive_pairs(labels);
        if self.naive {
            // As many random negatives as positives: the same number of pairs OPMS yields
            // when enough negatives survive its pruning, so equal steps mean equal pairs.
            let negatives = random_negatives(labels, positives.len(), rng);
            let mut pairs: Vec<(usize, usize, bool)> = positives
                .into_iter()
                .map(|(a, b)| (a, b, false))
                .chain(negatives.into_iter().map(|(a, b)| (a, b, true)))
                .collect();
            pairs.shuffle(rng);
            return Mined::Pairs(pairs);
        }
        // The hardest positive of each anchor: max_p D(q, p)^2.
        let mut hardest_pos = vec![0f32; labels.len()];
        for &(a, b) in &positives {
            let d = dist.get(a, b);
            hardest_pos[a] = hardest_pos[a].max(d);
            hardest_pos[b] = hardest_pos[b].max(d);
        }
        let candidates = random_negatives(
            labels,
            positives.len().max(1) * self.negatives_per_positive,
            rng,
        );
        // Eq. 2 pruning: keep a negative unless both ends already satisfy the constraint.
        let mut kept: Vec<(usize, usize, f32)> = candidates
            .into_iter()
            .map(|(a, b)| (a, b, dist.get(a, b)))
            .filter(|&(a, b, d)| {
                d <= hardest_pos[a] + self.margin || d <= hardest_pos[b] + self.margin
            })
            .collect();
        // Weighted sampling without replacement: weight (1 - lambda) + lambda * hardness, with
        // hardness 1 for the closest negative and 0 for the farthest.
        kept.sort_by(|x, y| x.2.total_cmp(&y.2));
        let want = positives.len().max(1).min(kept.len());
        let n = kept.len();
        let mut keyed: Vec<(f32, usize)> = (0..n)
            .map(|r| {
                let hardness = if n > 1 {
                    1.0 - r as f32 / (n - 1) as f32
                } else {
                    1.0
                };
                let w = ((1.0 - self.lambda) + self.lambda * hardness).max(1e-6);
                // Efraimidis-Spirakis: the `want` largest u^(1/w) are a weighted sample.
                let u: f32 = rng.random_range(f32::EPSILON..1.0);
                (u.powf(1.0 / w), r)
            })
            .collect();
        keyed.sort_by(|x, y| y.0.total_cmp(&x.0));
        let mut negatives: Vec<(usize, usize, f32)> =
            keyed.iter().take(want).map(|&(_, r)| kept[r]).collect();
        // Curriculum order: easy first. Positives get harder as they grow apart, negatives as
        // they come closer; one scale for both: the pair's loss-like "difficulty".
        let mut pairs: Vec<(f32, (usize, usize, bool))> = positives
            .into_iter()
            .map(|(a, b)| (dist.get(a, b), (a, b, false)))
            .collect();
        pairs.extend(
            negatives
                .drain(..)
                .map(|(a, b, d)| ((self.margin - d.sqrt()).max(0.0).powi(2), (a, b, true))),
        );
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
        Mined::Pairs(pairs.into_iter().map(|(_, p)| p).collect())
    }
}

/// Balanced random pairs (the MLP paper, §4.2): as many same-label as different-label pairs,
/// each label drawn equally often, pairs drawn at random within the batch.
#[derive(Debug, Clone)]
pub struct Balanced {
    /// Pairs per batch (half similar, half dissimilar).
    pub pairs_per_batch: usize,
}

impl Default for Balanced {
    fn default() -> Self {
        Balanced {
            pairs_per_batch: 256,
        }
    }
}

impl Miner for Balanced {
    fn name(&self) -> &'static str {
        "balanced"
    }

    fn mine(&mut self, labels: &[u32], _dist: &Distances, rng: &mut StdRng) -> Mined {
        let mut by_label: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, l) in labels.iter().enumerate() {
            by_label.entry(*l).or_default().push(i);
        }
        let groups: Vec<&Vec<usize>> = by_label.values().collect();
        let with_pairs: Vec<&Vec<usize>> = groups.iter().copied().filter(|g| g.len() > 1).collect();
        let half = self.pairs_per_batch / 2;
        let mut pairs = Vec::with_capacity(self.pairs_per_batch);
        if !with_pairs.is_empty() {
            for k in 0..half {
                let g = with_pairs[k % with_pairs.len()];
                let i = rng.random_range(0..g.len());
                let mut j = rng.random_range(0..g.len() - 1);
                if j >= i {
                    j += 1;
                }
                pairs.push((g[i], g[j], false));
            }
        }
        if groups.len() > 1 {
            for k in 0..half {
                let a = k % groups.len();
                let mut b = rng.random_range(0..groups.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (ga, gb) = (groups[a], groups[b]);
                pairs.push((
                    ga[rng.random_range(0..ga.len())],
                    gb[rng.random_range(0..gb.len())],
                    true,
                ));
            }
        }
        pairs.shuffle(rng);
        Mined::Pairs(pairs)
    }
}

/// One positive and `negatives` random negatives per anchor (the fused paper's 1 + N batch,
/// N = 20 there).
#[derive(Debug, Clone)]
pub struct OneVsMany {
    /// Negatives per anchor.
    pub negatives: usize,
}

impl Default for OneVsMany {
    fn default() -> Self {
        OneVsMany { negatives: 20 }
    }
}

impl Miner for OneVsMany {
    fn name(&self) -> &'static str {
        "one-vs-many"
    }

    fn mine(&mut self, labels: &[u32], _dist: &Distances, rng: &mut StdRng) -> Mined {
        let n = labels.len();
        let mut groups = Vec::new();
        for a in 0..n {
            let pos: Vec<usize> = (0..n)
                .filter(|&j| j != a && labels[j] == labels[a])
                .collect();
            let neg: Vec<usize> = (0..n).filter(|&j| labels[j] != labels[a]).collect();
            if pos.is_empty() || neg.is_empty() {
                continue;
            }
            let p = pos[rng.random_range(0..pos.len())];
            let negs: Vec<usize> = (0..self.negatives)
                .map(|_| neg[rng.random_range(0..neg.len())])
                .collect();
            groups.push((a, p, negs));
        }
        Mined::OneVsMany(groups)
    }
}

/// Every pair of the batch at once: the plugin's loss for a labelled batch (for SimNet and
/// fused, the supervised contrastive loss) weighs them.
#[derive(Debug, Clone, Default)]
pub struct SupCon;

impl Miner for SupCon {
    fn name(&self) -> &'static str {
        "supcon"
    }

    fn mine(&mut self, labels: &[u32], _dist: &Distances, _rng: &mut StdRng) -> Mined {
        let n = labels.len();
        let mut sorted = labels.to_vec();
        sorted.sort_unstable();
        let any_positive = sorted.windows(2).any(|w| w[0] == w[1]);
        Mined::Labelled {
            pairs: if any_positive { n * (n - 1) / 2 } else { 0 },
        }
    }
}

/// Builds the miner named `name` (`supcon`, `opms`, `naive`, `balanced`, `one-vs-many`).
pub fn by_name(name: &str) -> Option<Box<dyn Miner>> {
    Some(match name {
        "supcon" => Box::new(SupCon),
        "opms" => Box::new(Opms::new()),
        "naive" => Box::new(Opms::naive()),
        "balanced" => Box::new(Balanced::default()),
        "one-vs-many" => Box::new(OneVsMany::default()),
        _ => return None,
    })
}

/// The names [`by_name`] accepts.
pub const MINERS: &[&str] = &["supcon", "opms", "naive", "balanced", "one-vs-many"];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn batch() -> (Vec<u32>, Distances) {
        // Two labels of 4; embeddings on a line: label 0 near 0, label 1 near 1.
        let labels = vec![0, 0, 0, 0, 1, 1, 1, 1];
        let xs = [0.0f32, 0.1, 0.2, 0.9, 0.5, 1.0, 1.1, 1.2];
        (labels, Distances::new(&xs, 1))
    }

    #[test]
    fn supcon_hands_over_every_pair_when_the_batch_has_positives() {
        let (labels, d) = batch();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            SupCon.mine(&labels, &d, &mut rng),
            Mined::Labelled { pairs: 28 }
        );
        // All labels distinct: nothing for the loss to pull together.
        let distinct = vec![0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(SupCon.mine(&distinct, &d, &mut rng).pairs(), 0);
        assert_eq!(by_name("supcon").map(|m| m.name()), Some("supcon"));
    }

    #[test]
    fn opms_keeps_all_positives_and_orders_hardest_last() {
        let (labels, d) = batch();
        let mut m = Opms::new();
        m.start_epoch(0, 4);
        assert_eq!(m.lambda(), Some(0.25));
        let Mined::Pairs(p) = m.mine(&labels, &d, &mut StdRng::seed_from_u64(1)) else {
            panic!("pairs");
        };
        let positives = p.iter().filter(|x| !x.2).count();
        assert_eq!(positives, 12, "all 2 x C(4,2) positive pairs");
        let negatives = p.iter().filter(|x| x.2).count();
        assert!(negatives > 0 && negatives <= 12);
        // Every pair's loss-like difficulty is non-decreasing along the list.
        let diff = |&(a, b, neg): &(usize, usize, bool)| {
            if neg {
                (1.0 - d.get(a, b).sqrt()).max(0.0).powi(2)
            } else {
                d.get(a, b)
            }
        };
        assert!(p.windows(2).all(|w| diff(&w[0]) <= diff(&w[1]) + 1e-6));
    }

    #[test]
    fn lambda_one_prefers_hard_negatives() {
        let (labels, d) = batch();
        let mut rng = StdRng::seed_from_u64(7);
        let mean_neg = |m: &mut Opms, rng: &mut StdRng| {
            let mut s = 0.0;
            let mut c = 0;
            for _ in 0..200 {
                if let Mined::Pairs(p) = m.mine(&labels, &d, rng) {
                    for (a, b, neg) in p {
                        if neg {
                            s += d.get(a, b);
                            c += 1;
                        }
                    }
                }
            }
            s / c as f32
        };
        let mut easy = Opms::new();
        easy.start_epoch(0, 100); // lambda 0.01
        let mut hard = Opms::new();
        hard.start_epoch(9, 10); // lambda 1
        let (e, h) = (mean_neg(&mut easy, &mut rng), mean_neg(&mut hard, &mut rng));
        assert!(
            h < e,
            "lambda 1 mean negative distance {h} vs lambda ~0 {e}"
        );
    }

    #[test]
    fn balanced_is_half_and_half() {
        let (labels, d) = batch();
        let Mined::Pairs(p) = Balanced {
            pairs_per_batch: 40,
        }
        .mine(&labels, &d, &mut StdRng::seed_from_u64(3)) else {
            panic!("pairs");
        };
        assert_eq!(p.len(), 40);
        assert_eq!(p.iter().filter(|x| x.2).count(), 20);
        assert!(p
            .iter()
            .all(|&(a, b, neg)| (labels[a] != labels[b]) == neg && a != b));
    }

    #[test]
    fn one_vs_many_groups() {
        let (labels, d) = batch();
        let Mined::OneVsMany(g) =
            OneVsMany { negatives: 5 }.mine(&labels, &d, &mut StdRng::seed_from_u64(3))
        else {
            panic!("groups");
        };
        assert_eq!(g.len(), 8);
        for (a, p, n) in g {
            assert_eq!(labels[a], labels[p]);
            assert_ne!(a, p);
            assert_eq!(n.len(), 5);
            assert!(n.iter().all(|&x| labels[x] != labels[a]));
        }
    }
}
