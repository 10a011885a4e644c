//! # lookalike-fused: extractors on pretrained CNN backbones
//!
//! * [`efficientnet`]: EfficientNet-Lite0 with ImageNet weights (`"efficientnet-lite0"`), the
//!   pretrained extractor that works offline today.
//!
//! Depends on `lookalike-plugin` only; the `lookalike` crate registers these plugins behind its
//! default `fused` feature.

#![deny(missing_docs)]

pub mod efficientnet;

pub use efficientnet::EfficientNetPlugin;
