//! The trained head on frozen EfficientNet-Lite0 features (`efficientnet-lite0`, config
//! `head`), with randomly initialised backbone weights of the right architecture (no data
//! needed): an untrained head ranks as the plain network does, the trainable trains only the
//! head, and what it saves loads back bit-identical.

use lookalike_fused::efficientnet::{EfficientNetLite0, FEATURES};
use lookalike_fused::EfficientNetPlugin;
use lookalike_plugin::candle_core::{DType, Device, Tensor};
use lookalike_plugin::nn::{self, Adam, Optimiser};
use lookalike_plugin::{ExtractorPlugin, PluginError, TrainingBatch};

/// Backbone weights of the right shapes, random.
fn random_backbone() -> Vec<u8> {
    let (varmap, vb) = nn::new_varmap();
    nn::with_init_seed(3, || EfficientNetLite0::new(vb)).expect("network");
    nn::save_varmap(&varmap).expect("save")
}

fn images(n: usize, seed: u64) -> Tensor {
    nn::TrainRng::seeded(seed)
        .randn(0f32, 1f32, (n, 3, 224, 224), &Device::Cpu)
        .expect("images")
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().expect("rows")
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[test]
fn an_untrained_head_gives_the_plain_networks_directions() {
    let w = random_backbone();
    let plain = EfficientNetPlugin.build("", Some(&w)).expect("plain");
    let head = EfficientNetPlugin.build("head", Some(&w)).expect("head");
    assert_eq!(head.spec(), plain.spec(), "same input, dim and metric");
    let x = images(3, 1);
    for (a, b) in rows(&plain.embed(&x).expect("plain"))
        .iter()
        .zip(rows(&head.embed(&x).expect("head")))
    {
        for (p, q) in unit(a).iter().zip(unit(&b)) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
    // The plain network does not train; the head does.
    assert!(EfficientNetPlugin.trainable("", Some(&w)).is_none());
    assert!(EfficientNetPlugin.trainable("head", Some(&w)).is_some());
}

#[test]
fn the_head_is_derived_from_the_plain_networks_features() {
    let w = random_backbone();
    let plain = EfficientNetPlugin.build("", Some(&w)).expect("plain");
    let head = EfficientNetPlugin.build("head", Some(&w)).expect("head");
    let id = plain
        .features()
        .expect("the plain network names its features");
    assert_eq!(head.derived_from(), Some(id));
    // A head's own embeddings are not the bare features; another backbone's are others.
    assert_eq!(head.features(), None);
    let (other_map, vb) = nn::new_varmap();
    nn::with_init_seed(4, || EfficientNetLite0::new(vb)).expect("network");
    let other = EfficientNetPlugin
        .build("", Some(&nn::save_varmap(&other_map).expect("save")))
        .expect("other");
    assert_ne!(other.features(), Some(id));
    // A trained head (W not zero; trained on random rows, as below) on stored features
    // (L2-normalised, as a database keeps them) gives what it computes from the pixels.
    let t = EfficientNetPlugin
        .trainable("head", Some(&w))
        .expect("trainable")
        .expect("built");
    let rows_in = nn::TrainRng::seeded(5)
        .randn(0f32, 1f32, (4, FEATURES), &Device::Cpu)
        .expect("rows");
    let labels = Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu).expect("labels");
    let mut opt = Adam::new(t.vars(), 1e-2);
    for _ in 0..3 {
        let e = t.forward_features(&rows_in, true).expect("forward");
        let loss = t
            .loss(TrainingBatch::Labelled {
                embeddings: &e,
                labels: &labels,
            })
            .expect("loss");
        opt.backward_step(&loss).expect("step");
    }
    let trained = t.freeze().expect("freeze");
    assert_eq!(
        trained.derived_from(),
        Some(id),
        "training moves the head only"
    );
    let x = images(3, 2);
    let plain_rows = rows(&plain.embed(&x).expect("plain"));
    let stored: Vec<Vec<f32>> = plain_rows.iter().map(|r| unit(r)).collect();
    let stored = Tensor::new(stored, &Device::Cpu).expect("stored");
    let derived = rows(&trained.embed_features(&stored).expect("derived"));
    let direct = rows(&trained.embed(&x).expect("direct"));
    assert!(
        unit(&direct[0])
            .iter()
            .zip(unit(&plain_rows[0]))
            .any(|(a, b)| (a - b).abs() > 1e-4),
        "the trained head moved the embeddings"
    );
    for (a, b) in derived.iter().zip(&direct) {
        for (p, q) in unit(a).iter().zip(unit(b)) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

#[test]
fn the_head_trains_on_frozen_features_and_round_trips() {
    let w = random_backbone();
    let t = EfficientNetPlugin
        .trainable("head", Some(&w))
        .expect("trainable")
        .expect("built");
    let vars = t.vars();
    assert_eq!(vars.len(), 1, "only the head trains");
    assert_eq!(vars[0].dims(), &[FEATURES, FEATURES]);
    let x = images(6, 2);
    let features = t
        .frozen_features(&x)
        .expect("frozen layers")
        .expect("features");
    assert_eq!(features.dims(), &[6, FEATURES]);
    // Random backbone weights give nearly the same features for every image: the loss is
    // trained on random rows instead (the head sees rows either way).
    let rows_in = nn::TrainRng::seeded(4)
        .randn(0f32, 1f32, (6, FEATURES), &Device::Cpu)
        .expect("rows");
    let labels = Tensor::new(&[0u32, 0, 1, 1, 2, 2], &Device::Cpu).expect("labels");
    let mut opt = Adam::new(vars, 1e-2);
    let loss = |t: &dyn lookalike_plugin::Trainable| {
        let e = t.forward_features(&rows_in, true).expect("forward");
        t.loss(TrainingBatch::Labelled {
            embeddings: &e,
            labels: &labels,
        })
        .expect("loss")
    };
    let first = loss(t.as_ref()).to_scalar::<f32>().expect("scalar");
    for _ in 0..20 {
        opt.backward_step(&loss(t.as_ref())).expect("step");
    }
    let last = loss(t.as_ref()).to_scalar::<f32>().expect("scalar");
    assert!(last < first * 0.5, "the loss falls: {first} -> {last}");
    // The frozen extractor embeds as forward_features does without training, and the saved
    // weights load back to the same embeddings, bit for bit.
    let frozen = t.freeze().expect("freeze");
    let via_features = rows(&t.forward_features(&features, false).expect("eval"));
    let via_images = rows(&frozen.embed(&x).expect("embed"));
    for (a, b) in via_features.iter().zip(&via_images) {
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() < 1e-5);
        }
    }
    let saved = t.save_weights().expect("save");
    let loaded = EfficientNetPlugin
        .build("head", Some(&saved))
        .expect("load")
        .embed(&x)
        .expect("embed");
    assert_eq!(rows(&loaded), via_images);
    // The trained head no longer equals the plain network.
    let plain = EfficientNetPlugin.build("", Some(&saved)).expect("plain");
    let p = rows(&plain.embed(&x).expect("plain"));
    assert!(p.iter().zip(&via_images).any(|(a, b)| unit(a)
        .iter()
        .zip(unit(b))
        .any(|(x, y)| (x - y).abs() > 1e-3)));
}

#[test]
fn bad_configurations_and_weights_are_typed_errors() {
    let w = random_backbone();
    assert!(matches!(
        EfficientNetPlugin.build("heads", Some(&w)),
        Err(PluginError::UnknownConfig { .. })
    ));
    assert!(matches!(
        EfficientNetPlugin.trainable("heads", Some(&w)),
        Some(Err(PluginError::UnknownConfig { .. }))
    ));
    assert!(matches!(
        EfficientNetPlugin.trainable("head", None),
        Some(Err(PluginError::Weights(_)))
    ));
    // A head tensor of the wrong shape.
    let mut tensors = nn::read_safetensors(&w).expect("read");
    tensors.insert(
        "tuned.proj.weight".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).expect("t"),
    );
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .expect("serialize");
    assert!(matches!(
        EfficientNetPlugin.build("head", Some(&bytes)),
        Err(PluginError::Weights(_))
    ));
}
