//! Extractor benchmark: embedding throughput (images/s) of every built-in extractor and preset
//! on the CPU at batch 1 and batch 64, and its parameter count. Inputs are random tensors of the
//! declared shape (decoding and resizing are not counted).
//!
//! ```text
//! cargo bench --bench extractors [-- --data ../shared/data]
//! ```
//!
//! Extractors that need pretrained weights are skipped with a message when the weights are
//! absent. Prints figures only.

use std::path::PathBuf;
use std::time::Instant;

use lookalike::lookalike_plugin::candle_core::{safetensors, Device, Tensor};
use lookalike::lookalike_plugin::{Extractor, ExtractorPlugin, Trainable};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn parameters(e: &dyn Extractor) -> Res<usize> {
    let w = e.save_weights()?;
    if w.is_empty() {
        return Ok(0);
    }
    Ok(safetensors::load_buffer(&w, &Device::Cpu)?
        .values()
        .map(|t| t.elem_count())
        .sum())
}

/// Images per second embedding random batches of `batch`: after one warm-up call, repeats
/// until at least `min_seconds` have passed (and at least once).
fn throughput(e: &dyn Extractor, batch: usize, min_seconds: f64) -> Res<f64> {
    let s = e.spec().input;
    let x = Tensor::rand(
        0f32,
        1f32,
        (
            batch,
            s.channels as usize,
            s.height as usize,
            s.width as usize,
        ),
        &Device::Cpu,
    )?;
    e.embed(&x)?; // warm-up
    let t = Instant::now();
    let mut done = 0;
    while done == 0 || t.elapsed().as_secs_f64() < min_seconds {
        e.embed(&x)?;
        done += batch;
    }
    Ok(done as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Res<()> {
    let mut data = PathBuf::from("../shared/data");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--data" {
            if let Some(d) = it.next() {
                data = PathBuf::from(d);
            }
        }
    }
    let mut cases: Vec<(String, Box<dyn Extractor>)> = vec![(
        "classic".into(),
        lookalike::extractors::classic::ClassicPlugin.build("", None)?,
    )];
    let effnet = data.join("efficientnet-lite0/efficientnet-lite0.safetensors");
    match std::fs::read(&effnet) {
        Ok(w) => cases.push((
            "efficientnet-lite0".into(),
            lookalike_fused::EfficientNetPlugin.build("", Some(&w))?,
        )),
        Err(_) => println!("SKIP efficientnet-lite0: {} not found", effnet.display()),
    }
    for preset in ["cpu", "paper"] {
        cases.push((
            format!("simnet {preset}"),
            lookalike::simnet::SimNetPlugin.build(preset, None)?,
        ));
    }
    for preset in ["cpu", "cpu,avg", "paper", "paper,avg"] {
        // Random backbones: the speed is the same as with pretrained weights.
        let mut cfg = lookalike::fused::fused::FusedConfig::preset(preset)?;
        cfg.pretrained = [false, false];
        cases.push((
            format!("fused {preset}"),
            lookalike::fused::fused::FusedTrainable::new(&cfg, None)?.freeze()?,
        ));
    }
    println!(
        "| extractor | input | dim | parameters | batch 1 images/s | batch 64 images/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, e) in &cases {
        let s = e.spec();
        let b1 = throughput(e.as_ref(), 1, 3.0)?;
        let b64 = throughput(e.as_ref(), 64, 3.0)?;
        println!(
            "| {name} | {}x{}x{} | {} | {} | {b1:.1} | {b64:.1} | {:.2} |",
            s.input.channels,
            s.input.height,
            s.input.width,
            s.dim,
            parameters(e.as_ref())?,
            b64 / b1
        );
    }
    Ok(())
}
