//! One conformance suite for every extractor, written once against `&dyn ExtractorPlugin`.
//! Each plugin crate calls [`check_extractor`] from its tests.

use candle_core::{DType, Device, Tensor};

use crate::{ExtractorPlugin, PluginError};

fn fail(msg: String) -> PluginError {
    PluginError::InvalidSpec(format!("conformance: {msg}"))
}

/// Checks an extractor built by `plugin` with `config`: a valid declaration; output shape
/// `N x dim` with finite values; determinism; batch-size independence (a batch of 3 and the
/// same images one by one agree within 1e-4); and a save/load round trip through
/// `save_weights` and `build(config, Some(weights))` giving bit-identical embeddings.
pub fn check_extractor(plugin: &dyn ExtractorPlugin, config: &str) -> Result<(), PluginError> {
    let e = plugin.build(config, None)?;
    let spec = e.spec();
    spec.input.validate()?;
    let (c, h, w) = (
        spec.input.channels as usize,
        spec.input.height as usize,
        spec.input.width as usize,
    );
    let batch = Tensor::rand(-1f32, 1f32, (3, c, h, w), &Device::Cpu)?;
    let out = e.embed(&batch)?;
    if out.dims() != [3, spec.dim] {
        return Err(fail(format!(
            "output shape {:?}, declared [3, {}]",
            out.dims(),
            spec.dim
        )));
    }
    let v = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(fail("output has NaN or infinite values".into()));
    }
    let again = e.embed(&batch)?.flatten_all()?.to_vec1::<f32>()?;
    if again != v {
        return Err(fail(
            "two calls on the same batch differ (not deterministic)".into(),
        ));
    }
    for i in 0..3 {
        let one = e
            .embed(&batch.narrow(0, i, 1)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let row = &v[i * spec.dim..(i + 1) * spec.dim];
        let diff = one
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if diff > 1e-4 {
            return Err(fail(format!(
                "image {i} alone differs from in a batch by {diff}"
            )));
        }
    }
    let weights = e.save_weights()?;
    let restored = plugin.build(config, Some(&weights))?;
    let back = restored.embed(&batch)?.flatten_all()?.to_vec1::<f32>()?;
    if back != v {
        return Err(fail(
            "weights saved and loaded give different embeddings".into(),
        ));
    }
    Ok(())
}
