//! EfficientNet-Lite0 fine-tuned by a trained head (`efficientnet-lite0`, configuration
//! `head`): the pretrained network stays frozen, and a residual linear map on its
//! L2-normalised pooled features is trained,
//!
//! ```text
//! f = normalise(efficientnet(x))        1280 values
//! e = f + W f                           W: 1280 x 1280, zero before training
//! ```
//!
//! so an untrained head ranks exactly as the ImageNet features do (the database's model before
//! the job), and training moves away from them only as far as the labelled images ask. The
//! backbone is what costs (about 30 images/s on 2 cores); because it is frozen, the training
//! jobs compute its features once per image and augmented view
//! ([`Trainable::frozen_features`]) and train the head on them at thousands of images/s.
//!
//! Weights: the backbone's tensors under the checkpoint's names plus `tuned.proj.weight`. A
//! plain ImageNet file (no `tuned.` tensor) builds the untrained head.

use lookalike_plugin::candle_core::{Module, Tensor};
use lookalike_plugin::candle_nn::{Init, Linear, VarBuilder, VarMap};
use lookalike_plugin::{
    nn, Extractor, ExtractorSpec, FeaturesId, PluginError, Trainable, TrainingBatch,
};

use crate::efficientnet::{extractor_spec, pooled_in_chunks, EfficientNetLite0, FEATURES};

/// The configuration name of the trained head.
pub const HEAD: &str = "head";
/// Where the head's parameters live in the weights.
const PREFIX: &str = "tuned.";
/// The contrastive loss's margin for pair batches (unit-norm rows: distances up to 2).
const MARGIN: f64 = 1.0;

/// The backbone (frozen) and the head (trainable), with every parameter in one map.
struct Parts {
    varmap: VarMap,
    net: EfficientNetLite0,
    proj: Linear,
}

/// Builds the parts from backbone weights and, when present, head weights in the same file.
fn parts(weights: &[u8]) -> Result<Parts, PluginError> {
    let tensors = nn::read_safetensors(weights)?;
    let (varmap, vb) = nn::new_varmap();
    EfficientNetLite0::new(vb.clone())?; // declares the backbone: names and shapes to check
    nn::load_prefixed(&varmap, &tensors, "", "EfficientNet-Lite0")?;
    let net = EfficientNetLite0::new(nn::frozen_builder(&varmap)?)?;
    let proj = head(vb.pp("tuned").pp("proj"))?;
    if tensors.keys().any(|k| k.starts_with(PREFIX)) {
        nn::load_prefixed(&varmap, &tensors, PREFIX, "the head's")?;
    }
    Ok(Parts { varmap, net, proj })
}

fn head(vb: VarBuilder) -> Result<Linear, PluginError> {
    let w = vb.get_with_hints((FEATURES, FEATURES), "weight", Init::Const(0.0))?;
    Ok(Linear::new(w, None))
}

/// `f + W f` on normalised features `f` (N x 1280).
fn apply_head(proj: &Linear, features: &Tensor) -> Result<Tensor, PluginError> {
    let f = nn::l2_normalize(features)?;
    Ok((&f + proj.forward(&f)?)?)
}

/// The fine-tuned extractor.
pub struct HeadExtractor {
    parts: Parts,
    proj: Linear,
}

impl std::fmt::Debug for HeadExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadExtractor").finish_non_exhaustive()
    }
}

impl HeadExtractor {
    /// Builds it from ImageNet weights (an untrained head) or from a saved fine-tuned model.
    pub fn from_weights(weights: &[u8]) -> Result<Self, PluginError> {
        let parts = parts(weights)?;
        // Detached: inference records no graph.
        let proj = Linear::new(parts.proj.weight().detach(), None);
        Ok(HeadExtractor { parts, proj })
    }
}

impl Extractor for HeadExtractor {
    fn name(&self) -> &str {
        "efficientnet-lite0"
    }

    fn spec(&self) -> ExtractorSpec {
        extractor_spec()
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        apply_head(&self.proj, &pooled_in_chunks(&self.parts.net, batch)?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.parts.varmap)
    }

    /// The plain network's features with the same backbone weights: a database that ran
    /// that network applies the head to its stored embeddings instead of running the
    /// backbone again.
    fn derived_from(&self) -> Option<FeaturesId> {
        nn::fingerprint(&self.parts.varmap, Some(PREFIX)).ok()
    }

    fn embed_features(&self, features: &Tensor) -> Result<Tensor, PluginError> {
        apply_head(&self.proj, features)
    }
}

/// The head in training.
pub struct HeadTrainable {
    parts: Parts,
}

impl std::fmt::Debug for HeadTrainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadTrainable").finish_non_exhaustive()
    }
}

impl HeadTrainable {
    /// Builds it from ImageNet weights (a fresh head) or from a saved fine-tuned model.
    pub fn from_weights(weights: &[u8]) -> Result<Self, PluginError> {
        Ok(HeadTrainable {
            parts: parts(weights)?,
        })
    }
}

impl Trainable for HeadTrainable {
    fn forward_train(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        apply_head(&self.parts.proj, &pooled_in_chunks(&self.parts.net, batch)?)
    }

    fn frozen_features(&self, images: &Tensor) -> Option<Result<Tensor, PluginError>> {
        Some(pooled_in_chunks(&self.parts.net, images))
    }

    /// The plain network's features with the same backbone weights; `apply_head`
    /// normalises its input first, so a row and its normalised copy give the same.
    fn frozen_features_id(&self) -> Option<FeaturesId> {
        nn::fingerprint(&self.parts.varmap, Some(PREFIX)).ok()
    }

    fn forward_features(&self, features: &Tensor, train: bool) -> Result<Tensor, PluginError> {
        if train {
            apply_head(&self.parts.proj, features)
        } else {
            apply_head(
                &Linear::new(self.parts.proj.weight().detach(), None),
                features,
            )
        }
    }

    fn loss(&self, batch: TrainingBatch<'_>) -> Result<Tensor, PluginError> {
        match batch {
            TrainingBatch::Labelled { embeddings, labels } => {
                Ok(nn::supcon_loss(embeddings, labels, nn::SUPCON_TEMPERATURE)?)
            }
            TrainingBatch::Pairs { a, b, dissimilar } => Ok(nn::contrastive_loss(
                &nn::l2_normalize(a)?,
                &nn::l2_normalize(b)?,
                dissimilar,
                MARGIN,
            )?),
            other => Err(PluginError::UnsupportedBatch {
                got: other.kind(),
                takes: "labelled, pairs".into(),
            }),
        }
    }

    fn vars(&self) -> Vec<lookalike_plugin::candle_core::Var> {
        let data = match self.parts.varmap.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let mut named: Vec<_> = data.iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        nn::save_varmap(&self.parts.varmap)
    }

    fn freeze(&self) -> Result<Box<dyn Extractor>, PluginError> {
        Ok(Box::new(HeadExtractor::from_weights(
            &self.save_weights()?,
        )?))
    }
}
