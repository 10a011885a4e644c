//! Objective probe: which training objective teaches SimNet `cpu` (or another preset) most in
//! a few minutes on Fashion-MNIST. Trains the plugin directly (no database: the same network,
//! P x K batches of 10 labels x 12 images + 8 random, random horizontal flips, Adam or SGD) for a fixed
//! wall-clock budget per objective, one objective after another in one process, and prints
//! nearest-neighbour accuracy@1 of the 10,000 test images against the first 20,000 train
//! images at half time and at the end (plain, and with flip-averaged embeddings), and the same
//! for 2,000 further train images (trained on, not in the gallery), which says how far the
//! network fits what it has seen. Used to choose
//! the training jobs' default (docs/benchmarks.md, "Objectives").
//!
//! ```text
//! cargo bench --bench objectives -- --minutes 3 --objectives contrastive,supcon,binomial
//! cargo bench --bench objectives -- --minutes 3 --objectives supcon,supcon+proxy --net cpu-gray
//! options: --minutes M (per objective) --lr LR --cosine --seed S --data DIR
//!          --net PRESET (SimNet preset: cpu, cpu-gray) --deep 32,32,0,64,64,0,128,0 (the deep
//!          branch's VGG configuration instead of the preset's; 0 = max pool) --fc 256 (its
//!          fully connected widths instead of the preset's) --shift N (random shifts of up to
//!          N pixels; the jobs use 2) --sgd (SGD, Nesterov momentum 0.9, weight decay 5e-4,
//!          instead of Adam) --warmup F (linear warm-up over this share of the budget)
//!          objectives: contrastive (Eq. 1 on all positives and as many random negatives),
//!          supcon (nn::supcon_loss, temperature 0.1), binomial (binomial deviance on all
//!          pairs, alpha 10, beta 0.5, positives and negatives weighted equally), proxy
//!          (nn::proxy_loss: normalised softmax over one learned proxy per class, temperature
//!          0.05), supcon+proxy (their sum, the training jobs' default)
//! ```
//!
//! Prints figures only; nothing here asserts a quality.

use std::path::PathBuf;
use std::time::Instant;

use lookalike::datasets::{fashion_mnist, LabelledImages, Split};
use lookalike::lookalike_plugin::candle_core::{Device, Tensor, Var, D};
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
    net: String,
    /// Replaces the preset's deep-branch VGG configuration (0 = max pool).
    deep: Option<Vec<usize>>,
    /// Replaces the preset's deep-branch fully connected widths.
    fc: Option<Vec<usize>>,
    /// Random shifts of up to this many pixels (the jobs' default augmentation uses 2).
    shift: i32,
    /// SGD with Nesterov momentum 0.9 and weight decay 5e-4 instead of Adam.
    sgd: bool,
    /// Share of the budget over which the rate warms up linearly from 0.
    warmup: f64,
}

fn args() -> Args {
    let mut a = Args {
        data: PathBuf::from("../shared/data/fashion-mnist"),
        minutes: 3.0,
        lr: 1e-3,
        cosine: false,
        seed: 7,
        objectives: vec!["contrastive".into(), "supcon".into(), "binomial".into()],
        net: "cpu".into(),
        deep: None,
        fc: None,
        shift: 0,
        sgd: false,
        warmup: 0.0,
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
            "--net" => a.net = val(),
            "--deep" => a.deep = Some(val().split(',').filter_map(|x| x.parse().ok()).collect()),
            "--shift" => a.shift = val().parse().unwrap_or(a.shift),
            "--sgd" => a.sgd = true,
            "--warmup" => a.warmup = val().parse().unwrap_or(a.warmup),
            "--fc" => a.fc = Some(val().split(',').filter_map(|x| x.parse().ok()).collect()),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// Images `idx` as a batch for `cfg`'s input (`channels` x `side` x `side` in [-1, 1]: 28 px
/// centred on a -1 border when `side` is larger), mirrored where `flip` says and moved by
/// `shift` (x, y) pixels where it has an entry (uncovered pixels are background, -1).
fn batch(
    cfg: &SimNetConfig,
    set: &LabelledImages,
    idx: &[usize],
    flip: &[bool],
    shift: &[(i32, i32)],
) -> Res<Tensor> {
    let (c, side) = (cfg.channels(), cfg.side);
    let border = side.saturating_sub(28) / 2;
    let mut v = Vec::with_capacity(idx.len() * c * side * side);
    for (k, &i) in idx.iter().enumerate() {
        let px = &set.pixels[i];
        let mirror = flip.get(k).copied().unwrap_or(false);
        let (dx, dy) = shift.get(k).copied().unwrap_or((0, 0));
        let mut plane = vec![-1f32; side * side];
        for y in 0..28.min(side) {
            for x in 0..28.min(side) {
                let (sx, sy) = (x as i32 - dx, y as i32 - dy);
                if !(0..28).contains(&sx) || !(0..28).contains(&sy) {
                    continue;
                }
                let sx = if mirror { 27 - sx } else { sx } as usize;
                plane[(y + border) * side + x + border] =
                    f32::from(px[sy as usize * 28 + sx]) / 127.5 - 1.0;
            }
        }
        for _ in 0..c {
            v.extend_from_slice(&plane);
        }
    }
    Ok(Tensor::from_vec(
        v,
        (idx.len(), c, side, side),
        &Device::Cpu,
    )?)
}

/// Nearest-neighbour accuracy@1 against the first 20,000 train images: of the 10,000 test
/// images, and of 2,000 other train images (trained on, not in the gallery: how well the
/// network fits what it has seen, against the test figure: under- or over-fitting).
fn accuracy(
    cfg: &SimNetConfig,
    t: &SimNetTrainable,
    train: &LabelledImages,
    test: &LabelledImages,
) -> Res<Accuracy> {
    let e = t.freeze()?;
    // With `mirrored`, each embedding is the normalised sum of the image's and its mirror
    // image's (test-time flip averaging, for queries and gallery alike).
    let embed = |set: &LabelledImages, from: usize, n: usize, mirrored: bool| -> Res<Tensor> {
        let idx: Vec<usize> = (from..(from + n).min(set.len())).collect();
        let mut parts = Vec::new();
        for c in idx.chunks(250) {
            let images = batch(cfg, set, c, &[], &[])?;
            let mut x = nn::l2_normalize(&e.embed(&images)?)?;
            if mirrored {
                let m = e.embed(&nn::flip_horizontal(&images)?)?;
                x = (x + nn::l2_normalize(&m)?)?;
            }
            parts.push(x);
        }
        Ok(nn::l2_normalize(&Tensor::cat(&parts, 0)?)?)
    };
    let (mut out, mut mirrored) = ([0.0; 3], false);
    for slot in [0, 2] {
        let gallery = embed(train, 0, 20_000, mirrored)?;
        let score = |queries: &Tensor, set: &LabelledImages, from: usize| -> Res<f64> {
            let best = queries
                .matmul(&gallery.t()?)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            let hits = best
                .iter()
                .enumerate()
                .filter(|(q, g)| train.labels[**g as usize] == set.labels[from + *q])
                .count();
            Ok(hits as f64 / best.len().max(1) as f64)
        };
        out[slot] = score(&embed(test, 0, 10_000, mirrored)?, test, 0)?;
        if !mirrored {
            out[1] = score(&embed(train, 20_000, 2_000, false)?, train, 20_000)?;
        }
        mirrored = true;
    }
    Ok(Accuracy {
        test: out[0],
        fit: out[1],
        mirrored: out[2],
    })
}

/// What [`accuracy`] measures.
struct Accuracy {
    /// Accuracy@1 of the test queries.
    test: f64,
    /// Accuracy@1 of trained-on train images.
    fit: f64,
    /// Accuracy@1 of the test queries with flip-averaged embeddings (queries and gallery).
    mirrored: f64,
}

impl std::fmt::Display for Accuracy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accuracy@1 {:.2} % (flip-averaged {:.2} %; train images {:.2} %)",
            100.0 * self.test,
            100.0 * self.mirrored,
            100.0 * self.fit
        )
    }
}

/// The training jobs' proxy loss: normalised softmax over one learned proxy per class.
fn proxy(e: &Tensor, labels: &Tensor, proxies: &Var) -> Res<Tensor> {
    Ok(nn::proxy_loss(
        e,
        labels,
        proxies.as_tensor(),
        nn::PROXY_TEMPERATURE,
    )?)
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
    let mut cfg = SimNetConfig::preset(&a.net)?;
    if let Some(deep) = &a.deep {
        cfg.deep_cfg = deep.clone();
    }
    if let Some(fc) = &a.fc {
        cfg.deep_fc = fc.clone();
    }
    let t = nn::with_init_seed(a.seed, || SimNetTrainable::new(&cfg, None))?;
    let proxies = nn::with_init_seed(a.seed + 1, || {
        Var::randn(0f32, 1f32, (10, cfg.embed_dim), &Device::Cpu)
    })?;
    let mut vars = t.vars();
    if objective.contains("proxy") {
        vars.push(proxies.clone());
    }
    let mut opt: Box<dyn Optimiser> = if a.sgd {
        Box::new(nn::SgdNesterov::new(vars, a.lr, 0.9, 5e-4))
    } else {
        Box::new(nn::Adam::new(vars, a.lr))
    };
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); 10];
    for (i, l) in train.labels.iter().enumerate() {
        by_label[usize::from(*l) % 10].push(i);
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let budget = a.minutes * 60.0;
    let (mut seconds, mut steps, mut half_reported) = (0f64, 0usize, false);
    while seconds < budget {
        let started = Instant::now();
        let warm = a.warmup * budget;
        let lr = if seconds < warm {
            a.lr * seconds / warm
        } else if a.cosine {
            let t = (seconds - warm) / (budget - warm).max(1e-9);
            a.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
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
        let s = a.shift;
        let shift: Vec<(i32, i32)> = idx
            .iter()
            .map(|_| (rng.random_range(-s..=s), rng.random_range(-s..=s)))
            .collect();
        let labels: Vec<u8> = idx.iter().map(|i| train.labels[*i]).collect();
        let e = t.forward_train(&batch(&cfg, train, &idx, &flip, &shift)?)?;
        let l: Vec<u32> = labels.iter().map(|l| u32::from(*l)).collect();
        let l = Tensor::new(l.as_slice(), &Device::Cpu)?;
        let loss = match objective {
            "supcon" => nn::supcon_loss(&e, &l, TEMPERATURE)?,
            "proxy" => proxy(&e, &l, &proxies)?,
            "supcon+proxy" => (nn::supcon_loss(&e, &l, TEMPERATURE)? + proxy(&e, &l, &proxies)?)?,
            "binomial" => binomial(&e, &labels)?,
            "contrastive" => contrastive(&t, &e, &labels, &mut rng)?,
            other => return Err(format!("unknown objective {other:?}").into()),
        };
        opt.backward_step(&loss)?;
        steps += 1;
        seconds += started.elapsed().as_secs_f64();
        if !half_reported && seconds >= budget / 2.0 {
            half_reported = true;
            let acc = accuracy(&cfg, &t, train, test)?;
            println!(
                "  {objective}: {:.2} min, {steps} steps: {acc}",
                seconds / 60.0
            );
        }
    }
    let acc = accuracy(&cfg, &t, train, test)?;
    println!(
        "{objective}: {:.2} min, {steps} steps ({:.0} images/s): {acc}",
        seconds / 60.0,
        steps as f64 * 128.0 / seconds.max(1e-9),
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
        "SimNet {}, {} min per objective, {} {}{}, shift {}, warm-up {}, seed {}; 10,000 test \
         queries against 20,000 train images",
        a.net,
        a.minutes,
        if a.sgd { "SGD" } else { "Adam" },
        a.lr,
        if a.cosine {
            " with cosine annealing"
        } else {
            ""
        },
        a.shift,
        a.warmup,
        a.seed
    );
    for objective in &a.objectives {
        run(&a, objective, &train, &test)?;
    }
    Ok(())
}
