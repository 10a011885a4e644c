//! Helpers for plugins whose weights live in a candle-nn [`VarMap`] (feature `nn`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::PluginError;

/// A fresh `VarMap` and a builder over it (f32, CPU): build the model with the builder, and the
/// map holds every parameter under its `vb.pp(..)` name.
pub fn new_varmap() -> (VarMap, VarBuilder<'static>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (varmap, vb)
}

/// Every parameter of `varmap` as safetensors bytes, names sorted.
pub fn save_varmap(varmap: &VarMap) -> Result<Vec<u8>, PluginError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let mut tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| PluginError::Weights(format!("cannot write safetensors: {e}")))
}

/// Reads safetensors bytes into tensors on the CPU.
pub fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, PluginError> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| PluginError::Weights(format!("not a safetensors file: {e}")))
}

/// Overwrites every parameter of `varmap` with the tensor of the same name in `bytes`
/// (safetensors). Extra tensors are ignored; a missing tensor or one of another shape is an
/// error naming it and the expected shape. F16/BF16/F64 tensors are converted to f32.
pub fn load_varmap(varmap: &VarMap, bytes: &[u8]) -> Result<(), PluginError> {
    let tensors = read_safetensors(bytes)?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let want = var.dims();
        let t = tensors.get(name.as_str()).ok_or_else(|| {
            PluginError::Weights(format!("missing tensor {name} (expected shape {want:?})"))
        })?;
        if t.dims() != want {
            return Err(PluginError::Weights(format!(
                "tensor {name} has shape {:?}, expected {want:?}",
                t.dims()
            )));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// A builder over detached copies of `varmap`'s parameters: a network built from it computes
/// without recording a gradient graph (inference), and later changes to the map do not reach it.
pub fn frozen_builder(varmap: &VarMap) -> Result<VarBuilder<'static>, PluginError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| PluginError::Weights("the parameter map is poisoned".into()))?;
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}
