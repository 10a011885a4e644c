//! Convolution benchmark: the small CNN of the fast-CPU-training issue, trained and run with
//! candle's built-in `conv2d` and with the im2col + GEMM path (`lookalike_plugin::conv`), in
//! the same run. Prints images/s for training (forward, backward, SGD step; batch 128) and
//! inference (batch 256), and the ratio.
//!
//! ```text
//! cargo bench --bench conv [-- --steps 3]
//! ```
//!
//! The net: input 1x28x28; conv3x3(32)+BN+ReLU, conv3x3(32)+BN+ReLU, maxpool 2;
//! conv3x3(64)+BN+ReLU twice, maxpool 2; conv3x3(128)+BN+ReLU; global average pool;
//! linear 128; L2 normalise. About 44 MFLOP per image forward.

use std::time::Instant;

use lookalike::lookalike_plugin::candle_core::{DType, Device, Module, ModuleT, Tensor, D};
use lookalike::lookalike_plugin::candle_nn::{
    self, BatchNorm, Linear, Optimizer, VarBuilder, VarMap, SGD,
};
use lookalike::lookalike_plugin::conv::conv2d_im2col;
use lookalike::lookalike_plugin::nn::l2_normalize;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Net {
    convs: Vec<(Tensor, Tensor, BatchNorm)>,
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
            convs.push((w, b, bn));
        }
        let fc = candle_nn::linear(128, 128, vb.pp("fc"))?;
        Ok(Net { convs, fc, fast })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Res<Tensor> {
        let mut h = x.clone();
        for (i, (w, b, bn)) in self.convs.iter().enumerate() {
            let y = if self.fast {
                conv2d_im2col(&h, w, 1, 1)?
            } else {
                h.conv2d(w, 1, 1, 1, 1)?
            };
            let y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
            h = bn.forward_t(&y, train)?.relu()?;
            if i == 1 || i == 3 {
                h = h.max_pool2d(2)?;
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

fn main() -> Res<()> {
    let mut steps = 3;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--steps" {
            steps = it.next().and_then(|s| s.parse().ok()).unwrap_or(steps);
        }
    }
    println!("small CNN, batch 128 training / 256 inference, {steps} steps, 2 threads");
    let candle = run(false, steps)?;
    let fast = run(true, steps)?;
    println!("| conv path | train images/s | forward ms/step | backward+step ms/step | inference images/s |");
    println!("|---|---|---|---|---|");
    for (name, r) in [
        ("candle built-in conv2d", candle),
        ("im2col + GEMM (lookalike)", fast),
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
    println!(
        "fast path: about {:.1} GFLOP/s in training (3 x 44 MFLOP per image)",
        fast.0 * 3.0 * 44e6 / 1e9
    );
    Ok(())
}
