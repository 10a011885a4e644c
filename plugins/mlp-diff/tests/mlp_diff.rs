//! MLP |x1 - x2|: shapes and typed errors, a save/load round trip, and a training smoke test
//! (cross-entropy falls with the paper's Nesterov 0.8 optimiser). Data, initial weights and
//! dropout masks are seeded: from unseeded starts the smoke test failed now and then.

use lookalike_mlp_diff::{MlpDiffPlugin, MlpDiffTrainable};
use lookalike_plugin::candle_core::{DType, Device, Tensor};
use lookalike_plugin::nn::{self, Optimiser, TrainRng};
use lookalike_plugin::{PairScorer, PluginError, ScorerPlugin};

/// The seed of every random draw here; `MLP_SMOKE_SEED` picks another.
fn seed() -> u64 {
    std::env::var("MLP_SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// 64 pairs of 16-d embeddings around 4 class centres; half of the pairs share a class.
fn pairs() -> (Tensor, Tensor, Tensor) {
    let rng = TrainRng::seeded(seed());
    let centres = rng.randn(0f32, 1f32, (4, 16), &Device::Cpu).expect("c");
    let (mut ia, mut ib, mut same) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..64u32 {
        let ca = i % 4;
        let cb = if i % 2 == 0 {
            ca
        } else {
            (ca + 1 + i / 2 % 3) % 4
        };
        ia.push(ca);
        ib.push(cb);
        same.push(u32::from(ca == cb));
    }
    let noise = |n| rng.randn(0f32, 0.3f32, (n, 16), &Device::Cpu).expect("n");
    let a = (centres
        .index_select(&Tensor::new(ia.as_slice(), &Device::Cpu).expect("i"), 0)
        .expect("s")
        + noise(64))
    .expect("a");
    let b = (centres
        .index_select(&Tensor::new(ib.as_slice(), &Device::Cpu).expect("i"), 0)
        .expect("s")
        + noise(64))
    .expect("b");
    (a, b, Tensor::new(same.as_slice(), &Device::Cpu).expect("y"))
}

#[test]
fn training_smoke_loss_falls() {
    let (a, b, same) = pairs();
    let t = nn::with_init_seed(seed(), || MlpDiffTrainable::new(16, "", None)).expect("new");
    let mut opt = t.optimizer(0.05);
    let mut losses = Vec::new();
    for step in 0..200 {
        t.reseed(seed() ^ step);
        let loss = t.loss(&a, &b, &same).expect("loss");
        losses.push(loss.to_scalar::<f32>().expect("s"));
        opt.backward_step(&loss).expect("step");
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(
        last < 0.5 * first,
        "cross-entropy fell from {first} to {last}"
    );
    let s = t.freeze().expect("freeze");
    let p = s.score(&a, &b).expect("score").to_vec1::<f32>().expect("v");
    let y = same
        .to_dtype(DType::F32)
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let correct = p
        .iter()
        .zip(&y)
        .filter(|(p, y)| (**p > 0.5) == (**y > 0.5))
        .count();
    assert!(correct >= 56, "{correct}/64 pairs right after training");
    // Restored from its weights it scores bit-identically.
    let again = MlpDiffPlugin
        .build(16, "", Some(&s.save_weights().expect("w")))
        .expect("build");
    assert_eq!(
        again.score(&a, &b).expect("s").to_vec1::<f32>().expect("v"),
        p
    );
}

#[test]
fn scores_are_probabilities_and_bad_input_is_typed() {
    let s = MlpDiffPlugin.build(16, "hidden=3", None).expect("build");
    let (a, b, _) = pairs();
    let p = s.score(&a, &b).expect("score").to_vec1::<f32>().expect("v");
    assert_eq!(p.len(), 64);
    assert!(p.iter().all(|x| (0.0..=1.0).contains(x)));
    let wrong = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).expect("z");
    assert!(matches!(
        s.score(&wrong, &wrong),
        Err(PluginError::BadInput { .. })
    ));
    assert!(matches!(
        MlpDiffPlugin.build(16, "wide", None),
        Err(PluginError::UnknownConfig { .. })
    ));
    let other = MlpDiffPlugin.build(32, "", None).expect("32");
    assert!(matches!(
        MlpDiffPlugin.build(16, "", Some(&other.save_weights().expect("w"))),
        Err(PluginError::Weights(_))
    ));
}
