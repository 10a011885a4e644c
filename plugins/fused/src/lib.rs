//! # lookalike-fused: extractors on pretrained CNN backbones
//!
//! * [`efficientnet`]: EfficientNet-Lite0 with ImageNet weights (`"efficientnet-lite0"`), the
//!   pretrained extractor that works offline today.
//! * [`head`]: EfficientNet-Lite0 fine-tuned by a head trained on its frozen features
//!   (`"efficientnet-lite0"`, configuration `head`).
//! * [`fused`]: ResNet50 and VGG19 (or EfficientNet-Lite0) features fused by concatenation or
//!   averaging, then fully connected layers (`"fused"`).
//! * [`backbones`]: the backbones, with torchvision's parameter names.
//!
//! Depends on `lookalike-plugin` only; the `lookalike` crate registers these plugins behind its
//! default `fused` feature.

#![deny(missing_docs)]

pub mod backbones;
pub mod efficientnet;
pub mod fused;
pub mod head;

pub use efficientnet::EfficientNetPlugin;
pub use fused::FusedPlugin;
