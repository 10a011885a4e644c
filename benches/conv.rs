//! Training-speed benchmark: the small CNN of the fast-CPU-training issue, trained and run
//! with candle's built-in ops (`conv2d`, `candle_nn::BatchNorm`, `max_pool2d`) and with
//! lookalike's kernels (`lookalike_plugin::ops`), in the same run; then each trainable
//! plugin's CPU preset, one training step at a time, under `LOOKALIKE_OPS=candle` and the
//! default (a child process per path, since the switch is read once per process). Prints
//! images/s for training (forward, backward, SGD step; batch 128) and inference (batch 256),
//! the ratios, and the GFLOP/s reached against the machine's fp32 matrix-multiply peak
//! (candle's multi-threaded matmul of two 2048 x 2048 matrices, measured in the same run).
//!
//! ```text
//! cargo bench --bench conv [-- --steps 6 --python PYTHON]
//! ```
//!
//! With `PYTHON` (default `python3`) able to import torch, the PyTorch twin of the small CNN
//! (`../shared/peers/cnn28_peer.py`) runs in the same process tree right after, and the ratios
//! against it are printed.
//!
//! The net: input 1x28x28; conv3x3(32)+BN+ReLU, conv3x3(32)+BN+ReLU, maxpool 2;
//! conv3x3(64)+BN+ReLU twice, maxpool 2; conv3x3(128)+BN+ReLU; global average pool;
//! linear 128; L2 normalise. About 44 MFLOP per image forward.

use std::time::Instant;

use lookalike::lookalike_plugin::candle_core::{DType, Device, Module, ModuleT, Tensor, D};
use lookalike::lookalike_plugin::candle_nn::{self, Linear, Optimizer, VarBuilder, VarMap, SGD};
use lookalike::lookalike_plugin::nn::{self as lnn, l2_normalize, Activation, Optimiser};
use lookalike::lookalike_plugin::ops;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Net {
    convs: Vec<(Tensor, Tensor, candle_nn::BatchNorm, lnn::BatchNorm)>,
    fc: Linear,
    fast: bool,
}

impl Net {
    fn new(vb: VarBuilder, fast: bool) -> Res<Self> {
        let plan = [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128)];
        let mut convs = Vec::new();
        for (i, (cin, cout)) in plan.into_iter().enumerate() {
            let vb = vb.pp(format!("conv{i}"));
            let w = vb.get_with_hints(
                (cout, cin, 3, 3),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?;
            let b = vb.get_with_hints(cout, "bias", candle_nn::Init::Const(0.0))?;
            let bn = candle_nn::batch_norm(cout, 1e-5, vb.pp("bn"))?;
            let fast_bn = lnn::batch_norm(cout, 1e-5, vb.pp("bn"))?;
            convs.push((w, b, bn, fast_bn));
        }
        let fc = candle_nn::linear(128, 128, vb.pp("fc"))?;
        Ok(Net { convs, fc, fast })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Res<Tensor> {
        let mut h = x.clone();
        for (i, (w, b, bn, fast_bn)) in self.convs.iter().enumerate() {
            if self.fast {
                let y = ops::conv2d(&h, w, Some(b), 1, 1)?;
                h = fast_bn.forward_act(&y, train, Activation::Relu)?;
                if i == 1 || i == 3 {
                    h = ops::max_pool2d(&h, 2, 2, 0)?;
                }
            } else {
                let y = h.conv2d(w, 1, 1, 1, 1)?;
                let y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
                h = bn.forward_t(&y, train)?.relu()?;
                if i == 1 || i == 3 {
                    h = h.max_pool2d(2)?;
                }
            }
        }
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        Ok(l2_normalize(&self.fc.forward(&pooled)?)?)
    }
}

/// Returns (train images/s, forward ms/step, backward+step ms/step, inference images/s).
fn run(fast: bool, steps: usize) -> Res<(f64, f64, f64, f64)> {
    let varmap = VarMap::new();
    let net = Net::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        fast,
    )?;
    let mut opt = SGD::new(varmap.all_vars(), 0.01)?;
    let x = Tensor::randn(0f32, 1f32, (128, 1, 28, 28), &Device::Cpu)?;
    let target = l2_normalize(&Tensor::randn(0f32, 1f32, (128, 128), &Device::Cpu)?)?;
    let (mut fwd, mut bwd) = (0.0, 0.0);
    let t = Instant::now();
    for _ in 0..steps {
        let s = Instant::now();
        let e = net.forward(&x, true)?;
        let loss = (e - &target)?.sqr()?.sum(1)?.mean_all()?;
        fwd += s.elapsed().as_secs_f64();
        let s = Instant::now();
        opt.backward_step(&loss)?;
        bwd += s.elapsed().as_secs_f64();
    }
    let train = (steps * 128) as f64 / t.elapsed().as_secs_f64();
    let xi = Tensor::randn(0f32, 1f32, (256, 1, 28, 28), &Device::Cpu)?;
    net.forward(&xi, false)?; // warm-up
    let t = Instant::now();
    let reps = 2;
    for _ in 0..reps {
        net.forward(&xi, false)?;
    }
    let infer = (reps * 256) as f64 / t.elapsed().as_secs_f64();
    Ok((
        train,
        fwd * 1e3 / steps as f64,
        bwd * 1e3 / steps as f64,
        infer,
    ))
}

/// The PyTorch twin of the small CNN (`../shared/peers/cnn28_peer.py`), in the same run, when
/// `python` has torch: its line, and lookalike's training and inference rates against it.
fn pytorch_peer(python: &str, steps: usize, fast: (f64, f64, f64, f64)) {
    let peer =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/cnn28_peer.py");
    let out = std::process::Command::new(python)
        .arg(&peer)
        .args(["--steps", &steps.to_string(), "--threads", "2"])
        .output();
    let line = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            println!(
                "PyTorch peer SKIPPED: {python} {} did not run (needs torch; --python PATH)",
                peer.display()
            );
            return;
        }
    };
    println!("{line}");
    // "... train 123.4 img/s, ... inference 567.8 img/s"
    let figure = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    if let (Some(train), Some(infer)) = (figure("train "), figure("inference ")) {
        println!(
            "lookalike ops against PyTorch, same run: training {:.2}x, inference {:.2}x",
            fast.0 / train,
            fast.3 / infer
        );
    }
}

fn main() -> Res<()> {
    let mut steps = 3;
    let mut profile = false;
    let mut python = "python3".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--steps" {
            steps = it.next().and_then(|s| s.parse().ok()).unwrap_or(steps);
        }
        if a == "--python" {
            python = it.next().unwrap_or(python);
        }
        // Only the fast path's training, for a profiler.
        profile |= a == "--profile";
    }
    if profile {
        let r = run(true, steps)?;
        println!("fast path: {:.1} train images/s", r.0);
        return Ok(());
    }
    if std::env::args().any(|a| a == "--presets-child") {
        return presets(steps);
    }
    let peak = matmul_peak()?;
    println!("fp32 matmul peak (candle matmul 2048 x 2048, all cores): {peak:.1} GFLOP/s");
    println!("small CNN, batch 128 training / 256 inference, {steps} steps, 2 threads");
    let candle = run(false, steps)?;
    let fast = run(true, steps)?;
    println!("| conv path | train images/s | forward ms/step | backward+step ms/step | inference images/s |");
    println!("|---|---|---|---|---|");
    for (name, r) in [
        ("candle built-in conv2d", candle),
        ("lookalike ops (im2col + GEMM, fused BN)", fast),
    ] {
        println!(
            "| {name} | {:.1} | {:.0} | {:.0} | {:.1} |",
            r.0, r.1, r.2, r.3
        );
    }
    println!(
        "ratio fast/candle: training {:.1}x, inference {:.1}x",
        fast.0 / candle.0,
        fast.3 / candle.3
    );
    // 44 MFLOP forward per image; backward about twice that.
    let gflops = fast.0 * 3.0 * 44e6 / 1e9;
    println!(
        "fast path: about {gflops:.1} GFLOP/s in training (3 x 44 MFLOP per image), {:.0} % of the matmul peak",
        100.0 * gflops / peak
    );
    pytorch_peer(&python, steps, fast);
    println!("\nplugin CPU presets, one training step per batch (forward, loss, backward, SGD):");
    println!("| plugin preset | batch | candle ops: train images/s | lookalike ops: train images/s | ratio |");
    println!("|---|---|---|---|---|");
    let exe = std::env::current_exe()?;
    let mut rows: Vec<Vec<(String, usize, f64)>> = Vec::new();
    for path in ["candle", "fast"] {
        let out = std::process::Command::new(&exe)
            .args(["--presets-child", "--steps", &steps.to_string()])
            .env("LOOKALIKE_OPS", path)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "preset run ({path}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        rows.push(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let mut f = l.split('\t');
                    Some((
                        f.next()?.to_string(),
                        f.next()?.parse().ok()?,
                        f.next()?.parse().ok()?,
                    ))
                })
                .collect(),
        );
    }
    for ((name, batch, candle), (_, _, fast)) in rows[0].iter().zip(&rows[1]) {
        println!(
            "| {name} | {batch} | {candle:.1} | {fast:.1} | {:.1}x |",
            fast / candle
        );
    }
    Ok(())
}

/// GFLOP/s of candle's matmul (the `gemm` crate on all cores) on 2048 x 2048 f32 matrices.
fn matmul_peak() -> Res<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu)?;
    a.matmul(&b)?; // warm-up
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    Ok(reps as f64 * 2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9)
}

/// Child process: trains each trainable plugin's CPU preset for `steps` steps under the path
/// `LOOKALIKE_OPS` selects; prints `name<TAB>batch<TAB>images/s` lines.
fn presets(steps: usize) -> Res<()> {
    use lookalike::lookalike_plugin::{ExtractorPlugin, TrainingBatch};
    let plugins: Vec<(&str, &str, Box<dyn ExtractorPlugin>)> = vec![
        (
            "simnet cpu",
            "cpu",
            Box::new(lookalike::simnet::SimNetPlugin),
        ),
        (
            "simnet cpu-gray",
            "cpu-gray",
            Box::new(lookalike::simnet::SimNetPlugin),
        ),
        ("fused cpu", "cpu", Box::new(lookalike::fused::FusedPlugin)),
    ];
    for (name, config, plugin) in plugins {
        let spec = plugin.build(config, None)?.spec();
        let t = plugin
            .trainable(config, None)
            .ok_or("plugin is not trainable")??;
        let mut opt = lnn::SgdNesterov::new(t.vars(), 0.01, 0.9, 0.0);
        let batch = 64;
        let (c, h, w) = (
            spec.input.channels as usize,
            spec.input.height as usize,
            spec.input.width as usize,
        );
        let x = Tensor::rand(0f32, 1f32, (batch, c, h, w), &Device::Cpu)?;
        let dissimilar = Tensor::from_vec(
            (0..batch / 2).map(|i| (i % 2) as f32).collect::<Vec<_>>(),
            batch / 2,
            &Device::Cpu,
        )?;
        let step = |opt: &mut lnn::SgdNesterov| -> Res<()> {
            let e = t.forward_train(&x)?;
            let (a, b) = (
                e.narrow(0, 0, batch / 2)?,
                e.narrow(0, batch / 2, batch / 2)?,
            );
            let loss = t.loss(TrainingBatch::Pairs {
                a: &a,
                b: &b,
                dissimilar: &dissimilar,
            })?;
            opt.backward_step(&loss)?;
            Ok(())
        };
        step(&mut opt)?; // warm-up
        let start = Instant::now();
        for _ in 0..steps {
            step(&mut opt)?;
        }
        let rate = (steps * batch) as f64 / start.elapsed().as_secs_f64();
        println!("{name}\t{batch}\t{rate:.2}");
    }
    head_rates(steps)
}

/// `efficientnet-lite0 head` (random backbone weights: the speed is the same): the frozen
/// features of a batch (what the feature bank computes once per image and view), then head
/// steps on rows of features (what every epoch runs). Printed as two preset lines.
fn head_rates(steps: usize) -> Res<()> {
    use lookalike::lookalike_plugin::{ExtractorPlugin, TrainingBatch};
    let (varmap, vb) = lnn::new_varmap();
    lookalike::fused::efficientnet::EfficientNetLite0::new(vb)?;
    let weights = lnn::save_varmap(&varmap)?;
    let t = lookalike::fused::EfficientNetPlugin
        .trainable("head", Some(&weights))
        .ok_or("the head is not trainable")??;
    let x = Tensor::rand(0f32, 1f32, (16, 3, 224, 224), &Device::Cpu)?;
    let start = Instant::now();
    let features = t.frozen_features(&x).ok_or("no frozen features")??;
    let bank_rate = 16.0 / start.elapsed().as_secs_f64();
    println!("efficientnet-lite0 head: frozen features (the bank)\t16\t{bank_rate:.2}");
    let batch = 128;
    let rows = features.repeat((batch / 16, 1))?;
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 16).collect::<Vec<_>>(),
        batch,
        &Device::Cpu,
    )?;
    let mut opt = lnn::Adam::new(t.vars(), 1e-3);
    let start = Instant::now();
    for _ in 0..steps.max(10) {
        let e = t.forward_features(&rows, true)?;
        let loss = t.loss(TrainingBatch::Labelled {
            embeddings: &e,
            labels: &labels,
        })?;
        opt.backward_step(&loss)?;
    }
    let rate = (steps.max(10) * batch) as f64 / start.elapsed().as_secs_f64();
    println!("efficientnet-lite0 head: head steps on bank rows\t{batch}\t{rate:.2}");
    Ok(())
}
