//! SimNet: conformance, presets, torchvision VGG16 names, and a training smoke test (the loss
//! falls and gradients reach every branch).

use lookalike_plugin::candle_core::{DType, Device, Tensor};
use lookalike_plugin::nn::Optimiser;
use lookalike_plugin::{nn, ExtractorPlugin, Trainable, TrainingBatch};
use lookalike_simnet::{load_torchvision_vgg16, SimNetConfig, SimNetPlugin, SimNetTrainable};

#[test]
fn conformance_cpu_preset() {
    lookalike_plugin::conformance::check_extractor(&SimNetPlugin, "cpu").expect("conformance");
    let e = SimNetPlugin.build("", None).expect("default preset");
    assert_eq!(e.spec().dim, 128);
    assert_eq!(e.spec().input.width, 32);
}

#[test]
fn conformance_cpu_gray_preset() {
    lookalike_plugin::conformance::check_extractor(&SimNetPlugin, "cpu-gray").expect("conformance");
    let e = SimNetPlugin.build("cpu-gray", None).expect("cpu-gray");
    let input = e.spec().input;
    assert_eq!((input.channels, input.width, input.height), (1, 28, 28));
    assert_eq!(e.spec().dim, 128);
    // A colour-sized batch is refused with a typed error, not a shape panic.
    let rgb = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).expect("zeros");
    assert!(e.embed(&rgb).is_err());
    // Flip averaging: an image and its mirror image embed alike, and the code version says
    // that the same weights embed differently from the plain network's.
    assert_eq!(e.version(), 2);
    let x = nn::TrainRng::seeded(4)
        .randn(0f32, 1f32, (3, 1, 28, 28), &Device::Cpu)
        .expect("randn");
    let a = e.embed(&x).expect("embed");
    let b = e
        .embed(&nn::flip_horizontal(&x).expect("flip"))
        .expect("embed");
    let diff = (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max");
    assert!(diff.to_scalar::<f32>().expect("scalar") < 1e-5);
    assert_eq!(SimNetPlugin.build("cpu", None).expect("cpu").version(), 1);
}

#[test]
fn unknown_preset_is_a_typed_error() {
    let err = SimNetPlugin.build("huge", None).expect_err("unknown");
    assert!(err.to_string().contains("cpu, cpu-gray, paper"), "{err}");
}

/// torchvision's VGG16 parameter names and shapes (`torchvision.models.vgg16().state_dict()`).
fn torchvision_vgg16() -> Vec<(String, Vec<usize>)> {
    let convs = [
        (0, 3, 64),
        (2, 64, 64),
        (5, 64, 128),
        (7, 128, 128),
        (10, 128, 256),
        (12, 256, 256),
        (14, 256, 256),
        (17, 256, 512),
        (19, 512, 512),
        (21, 512, 512),
        (24, 512, 512),
        (26, 512, 512),
        (28, 512, 512),
    ];
    let mut v = Vec::new();
    for (i, cin, cout) in convs {
        v.push((format!("features.{i}.weight"), vec![cout, cin, 3, 3]));
        v.push((format!("features.{i}.bias"), vec![cout]));
    }
    v.push(("classifier.0.weight".into(), vec![4096, 25088]));
    v.push(("classifier.0.bias".into(), vec![4096]));
    v.push(("classifier.3.weight".into(), vec![4096, 4096]));
    v.push(("classifier.3.bias".into(), vec![4096]));
    v
}

#[test]
fn paper_preset_deep_branch_has_torchvision_vgg16_names() {
    let t = SimNetTrainable::new(&SimNetConfig::paper(), None).expect("paper");
    let data = t.varmap().data().lock().expect("lock");
    let mut deep: Vec<(String, Vec<usize>)> = data
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("deep.")
                .map(|n| (n.to_string(), v.dims().to_vec()))
        })
        .collect();
    deep.sort();
    drop(data);
    let mut want = torchvision_vgg16();
    want.sort();
    assert_eq!(deep, want);
}

#[test]
fn torchvision_loader_checks_names_and_shapes() {
    // A checkpoint in torchvision's naming for the cpu preset's (smaller) deep branch.
    let donor = SimNetTrainable::new(&SimNetConfig::cpu(), None).expect("donor");
    let tensors: Vec<(String, Tensor)> = donor
        .varmap()
        .data()
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("deep.")
                .map(|n| (n.to_string(), v.as_tensor().clone()))
        })
        .collect();
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None).expect("ser");
    let target = SimNetTrainable::new(&SimNetConfig::cpu(), None).expect("target");
    load_torchvision_vgg16(target.varmap(), &bytes).expect("load");
    let x = Tensor::rand(-1f32, 1f32, (2, 3, 32, 32), &Device::Cpu).expect("x");
    // Same deep weights, different shallow/joint weights: the deep branch alone must agree.
    let name = "deep.features.0.weight";
    let a = donor.varmap().data().lock().expect("l")[name]
        .as_tensor()
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let b = target.varmap().data().lock().expect("l")[name]
        .as_tensor()
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    assert_eq!(a, b);
    drop(x);
    // Missing and misshaped tensors name what was expected.
    let short: Vec<&(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k != "features.0.weight")
        .collect();
    let bytes =
        safetensors::serialize(short.iter().map(|(k, t)| (k.as_str(), t)), None).expect("ser");
    // Through the plugin: a file without `joint.*` is a torchvision backbone file.
    let err = SimNetPlugin
        .build("cpu", Some(&bytes))
        .expect_err("missing through build");
    assert!(err.to_string().contains("features.0.weight"), "{err}");
    let err = load_torchvision_vgg16(target.varmap(), &bytes).expect_err("missing");
    assert!(
        err.to_string().contains("features.0.weight") && err.to_string().contains("[32, 3, 3, 3]"),
        "{err}"
    );
}

/// The seed of the smoke test's noise, initial weights and dropout (unseeded runs can fail
/// now and then); `SIMNET_SMOKE_SEED` picks another.
fn smoke_seed() -> u64 {
    std::env::var("SIMNET_SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Two visually distinct classes: horizontal versus vertical gradients, with noise.
fn tiny_batch() -> (Tensor, Vec<u32>) {
    let mut data = Vec::new();
    let mut labels = Vec::new();
    let noise = nn::TrainRng::seeded(smoke_seed())
        .rand(-0.3f32, 0.3f32, (16, 3, 32, 32), &Device::Cpu)
        .expect("noise")
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    for i in 0..16usize {
        let class = (i % 2) as u32;
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let g = if class == 0 {
                        x as f32 / 16.0 - 1.0
                    } else {
                        y as f32 / 16.0 - 1.0
                    };
                    data.push(g + noise[((i * 3 + c) * 32 + y) * 32 + x]);
                }
            }
        }
        labels.push(class);
    }
    (
        Tensor::from_vec(data, (16, 3, 32, 32), &Device::Cpu).expect("t"),
        labels,
    )
}

#[test]
fn training_smoke_loss_falls_and_every_branch_learns() {
    let (x, labels) = tiny_batch();
    let t = nn::with_init_seed(smoke_seed(), || SimNetPlugin.trainable("cpu", None))
        .expect("trainable")
        .expect("built");
    let (mut ia, mut ib, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..16u32 {
        for j in i + 1..16 {
            ia.push(i);
            ib.push(j);
            y.push(if labels[i as usize] == labels[j as usize] {
                0f32
            } else {
                1f32
            });
        }
    }
    let n = ia.len();
    let ia = Tensor::from_vec(ia, n, &Device::Cpu).expect("ia");
    let ib = Tensor::from_vec(ib, n, &Device::Cpu).expect("ib");
    let y = Tensor::from_vec(y, n, &Device::Cpu).expect("y");
    let loss_of = |t: &dyn Trainable| {
        let e = t.forward_train(&x).expect("forward");
        let a = e.index_select(&ia, 0).expect("a");
        let b = e.index_select(&ib, 0).expect("b");
        t.loss(TrainingBatch::Pairs {
            a: &a,
            b: &b,
            dissimilar: &y,
        })
        .expect("loss")
    };
    // Gradients reach the first layer of each branch and the joint layer.
    let loss = loss_of(t.as_ref());
    let grads = loss.backward().expect("backward");
    let vars = t.vars();
    let by_name = |suffix: &str| {
        let shape = match suffix {
            "deep" => vec![32, 3, 3, 3],
            "shallow" => vec![32, 3, 3, 3],
            _ => vec![128, 256 + 64 + 64],
        };
        vars.iter()
            .filter(|v| v.dims() == shape)
            .filter_map(|v| grads.get(v.as_tensor()))
            .map(|g| {
                g.abs()
                    .expect("a")
                    .sum_all()
                    .expect("s")
                    .to_scalar::<f32>()
                    .expect("f")
            })
            .collect::<Vec<_>>()
    };
    let first_convs = by_name("deep"); // deep.features.0, shallow1.conv, shallow2.conv
    assert_eq!(first_convs.len(), 3, "three 3->32 3x3 convolutions");
    assert!(
        first_convs.iter().all(|g| *g > 0.0),
        "gradient reaches every branch: {first_convs:?}"
    );
    assert!(by_name("joint").iter().all(|g| *g > 0.0));

    let mut opt = nn::SgdNesterov::new(t.vars(), 0.05, 0.9, 0.0);
    let mut losses = Vec::new();
    for step in 0..20 {
        t.reseed(smoke_seed() ^ step);
        let loss = loss_of(t.as_ref());
        losses.push(
            loss.to_dtype(DType::F32)
                .expect("f")
                .to_scalar::<f32>()
                .expect("s"),
        );
        opt.backward_step(&loss).expect("step");
    }
    let first = losses[..3].iter().sum::<f32>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    println!("contrastive loss: {losses:?}");
    assert!(last < 0.5 * first, "loss fell from {first} to {last}");
    // The trained weights freeze into an extractor that round-trips.
    let e = t.freeze().expect("freeze");
    let again = SimNetPlugin
        .build("cpu", Some(&t.save_weights().expect("save")))
        .expect("build");
    let xa = e
        .embed(&x)
        .expect("e")
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let xb = again
        .embed(&x)
        .expect("e")
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    assert_eq!(xa, xb);
}
