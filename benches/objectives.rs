//! Objective probe: which training objective teaches SimNet `cpu` most in a few minutes on
//! Fashion-MNIST. Trains the plugin directly (no database: the same network, P x K batches of
//! 10 labels x 12 images + 8 random, random horizontal flips, Adam) for a fixed wall-clock
//! budget per objective, one objective after another in one process, and prints nearest-
//! neighbour accuracy@1 of the first 2,000 test images against the first 20,000 train images at
//! half time and at the end. Used to choose the training jobs' default (docs/benchmarks.md,
//! "Objectives").
//!
//! ```text
//! cargo bench --bench objectives -- --minutes 3 --objectives contrastive,supcon,binomial
//! options: --minutes M (per objective) --lr LR --cosine --seed S --data DIR
//!          objectives: contrastive (Eq. 1 on all positives and as many random negatives),
//!          supcon (nn::supcon_loss, temperature 0.1), binomial (binomial deviance on all
//!          pairs, alpha 10, beta 0.5, positives and negatives weighted equally)
//! ```
//!
//! Prints figures only; nothing here asserts a quality.

use std::path::PathBuf;
use std::time::Instant;

use lookalike::datasets::{fashion_mnist, LabelledImages, Split};
use lookalike::lookalike_plugin::candle_core::{Device, Tensor, D};
use lookalike::lookalike_plugin::nn::{self, Optimiser};
use lookalike::lookalike_plugin::{Trainable, TrainingBatch};
use lookalike::simnet::{SimNetConfig, SimNetTrainable, TEMPERATURE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    data: PathBuf,
    minutes: f64,
    lr: f64,
    cosine: bool,
    seed: u64,
    objectives: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        data: PathBuf::from("../shared/data/fashion-mnist"),
        minutes: 3.0,
        lr: 1e-3,
        cosine: false,
        seed: 7,
        objectives: vec!["contrastive".into(), "supcon".into(), "binomial".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--data" => a.data = PathBuf::from(val()),
            "--minutes" => a.minutes = val().parse().unwrap_or(a.minutes),
            "--lr" => a.lr = val().parse().unwrap_or(a.lr),
            "--cosine" => a.cosine = true,
            "--seed" => a.seed = val().parse().unwrap_or(a.seed),
            "--objectives" => a.objectives = val().split(',').map(String::from).collect(),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// Images `idx` as a batch of 3 x 32 x 32 in [-1, 1] (28 px centred on a -1 border, the
/// preset's normalisation), mirrored where `flip` says.
fn batch(set: &LabelledImages, idx: &[usize], flip: &[bool]) -> Res<Tensor> {
    let mut v = Vec::with_capacity(idx.len() * 3 * 32 * 32);
    for (k, &i) in idx.iter().enumerate() {
        let px = &set.pixels[i];
        let mirror = flip.get(k).copied().unwrap_or(false);
        let mut plane = vec![-1f32; 32 * 32];
        for y in 0..28 {
            for x in 0..28 {
                let sx = if mirror { 27 - x } else { x };
                plane[(y + 2) * 32 + x + 2] = f32::from(px[y * 28 + sx]) / 127.5 - 1.0;
            }
        }
        for _ in 0..3 {
            v.extend_from_slice(&plane);
        }
    }
    Ok(Tensor::from_vec(v, (idx.len(), 3, 32, 32), &Device::Cpu)?)
}

/// Nearest-neighbour accuracy@1: 2,000 test images against 20,000 train images.
fn accuracy(t: &SimNetTrainable, train: &LabelledImages, test: &LabelledImages) -> Res<f64> {
    let e = t.freeze()?;
    let embed = |set: &LabelledImages, n: usize| -> Res<Tensor> {
        let idx: Vec<usize> = (0..n.min(set.len())).collect();
        let mut parts = Vec::new();
        for c in idx.chunks(250) {
            parts.push(e.embed(&batch(set, c, &[])?)?);
        }
        Ok(nn::l2_normalize(&Tensor::cat(&parts, 0)?)?)
    };
    let (gallery, queries) = (embed(train, 20_000)?, embed(test, 2_000)?);
    let best = queries
        .matmul(&gallery.t()?)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?;
    let hits = best
        .iter()
        .enumerate()
        .filter(|(q, g)| train.labels[**g as usize] == test.labels[*q])
        .count();
    Ok(hits as f64 / best.len().max(1) as f64)
}

/// Binomial deviance (Yi et al. 2014) on the cosine similarities of every pair of the batch.
fn binomial(e: &Tensor, labels: &[u8]) -> Res<Tensor> {
    let (alpha, beta) = (10.0, 0.5);
    let n = labels.len();
    let s = e.matmul(&e.t()?)?;
    let (mut pos, mut neg) = (vec![0f32; n * n], vec![0f32; n * n]);
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let m = if labels[i] == labels[j] {
                    &mut pos
                } else {
                    &mut neg
                };
                m[i * n + j] = 1.0;
            }
        }
    }
    let (np, nn_): (f32, f32) = (pos.iter().sum(), neg.iter().sum());
    let pos = (Tensor::from_vec(pos, (n, n), &Device::Cpu)? / f64::from(np.max(1.0)))?;
    let neg = (Tensor::from_vec(neg, (n, n), &Device::Cpu)? / f64::from(nn_.max(1.0)))?;
    let z = ((s - beta)? * alpha)?;
    let softplus = |x: &Tensor| -> Res<Tensor> { Ok(x.exp()?.affine(1.0, 1.0)?.log()?) };
    let lp = (softplus(&z.neg()?)? * &pos)?.sum_all()?;
    let ln = (softplus(&z)? * &neg)?.sum_all()?;
    Ok((lp + ln)?)
}

/// Eq. 1 on all positive pairs of the batch and as many random negative pairs.
fn contrastive(t: &SimNetTrainable, e: &Tensor, labels: &[u8], rng: &mut StdRng) -> Res<Tensor> {
    let n = labels.len();
    let (mut ia, mut ib, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let mut negatives = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            if labels[i] == labels[j] {
                ia.push(i as u32);
                ib.push(j as u32);
                y.push(0f32);
            } else {
                negatives.push((i as u32, j as u32));
            }
        }
    }
    for _ in 0..ia.len() {
        let (i, j) = negatives[rng.random_range(0..negatives.len())];
        ia.push(i);
        ib.push(j);
        y.push(1f32);
    }
    let m = ia.len();
    let a = e.index_select(&Tensor::from_vec(ia, m, &Device::Cpu)?, 0)?;
    let b = e.index_select(&Tensor::from_vec(ib, m, &Device::Cpu)?, 0)?;
    let y = Tensor::from_vec(y, m, &Device::Cpu)?;
    Ok(t.loss(TrainingBatch::Pairs {
        a: &a,
        b: &b,
        dissimilar: &y,
    })?)
}

fn run(a: &Args, objective: &str, train: &LabelledImages, test: &LabelledImages) -> Res<()> {
    let t = nn::with_init_seed(a.seed, || SimNetTrainable::new(&SimNetConfig::cpu(), None))?;
    let mut opt = nn::Adam::new(t.vars(), a.lr);
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); 10];
    for (i, l) in train.labels.iter().enumerate() {
        by_label[usize::from(*l) % 10].push(i);
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let budget = a.minutes * 60.0;
    let (mut seconds, mut steps, mut half_reported) = (0f64, 0usize, false);
    while seconds < budget {
        let started = Instant::now();
        let lr = if a.cosine {
            a.lr * 0.5 * (1.0 + (std::f64::consts::PI * seconds / budget).cos())
        } else {
            a.lr
        };
        opt.set_learning_rate(lr);
        let mut idx = Vec::with_capacity(128);
        for images in &by_label {
            for _ in 0..12 {
                idx.push(images[rng.random_range(0..images.len())]);
            }
        }
        for _ in 0..8 {
            idx.push(rng.random_range(0..train.len()));
        }
        let flip: Vec<bool> = idx.iter().map(|_| rng.random_bool(0.5)).collect();
        let labels: Vec<u8> = idx.iter().map(|i| train.labels[*i]).collect();
        let e = t.forward_train(&batch(train, &idx, &flip)?)?;
        let loss = match objective {
            "supcon" => {
                let l: Vec<u32> = labels.iter().map(|l| u32::from(*l)).collect();
                let l = Tensor::new(l.as_slice(), &Device::Cpu)?;
                nn::supcon_loss(&e, &l, TEMPERATURE)?
            }
            "binomial" => binomial(&e, &labels)?,
            "contrastive" => contrastive(&t, &e, &labels, &mut rng)?,
            other => return Err(format!("unknown objective {other:?}").into()),
        };
        opt.backward_step(&loss)?;
        steps += 1;
        seconds += started.elapsed().as_secs_f64();
        if !half_reported && seconds >= budget / 2.0 {
            half_reported = true;
            println!(
                "  {objective}: {:.2} min, {steps} steps: accuracy@1 {:.2} %",
                seconds / 60.0,
                100.0 * accuracy(&t, train, test)?
            );
        }
    }
    println!(
        "{objective}: {:.2} min, {steps} steps ({:.0} images/s): accuracy@1 {:.2} %",
        seconds / 60.0,
        steps as f64 * 128.0 / seconds.max(1e-9),
        100.0 * accuracy(&t, train, test)?
    );
    Ok(())
}

fn main() -> Res<()> {
    let a = args();
    if !a.data.join("train-images-idx3-ubyte.gz").exists() {
        println!("SKIP: Fashion-MNIST not found in {}", a.data.display());
        return Ok(());
    }
    let train = fashion_mnist(&a.data, Split::Train)?;
    let test = fashion_mnist(&a.data, Split::Test)?;
    println!(
        "SimNet cpu, {} min per objective, Adam {}{}, seed {}; 2,000 test queries against \
         20,000 train images",
        a.minutes,
        a.lr,
        if a.cosine {
            " with cosine annealing"
        } else {
            ""
        },
        a.seed
    );
    for objective in &a.objectives {
        run(&a, objective, &train, &test)?;
    }
    Ok(())
}
