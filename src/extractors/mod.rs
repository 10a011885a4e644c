//! The built-in extractor plugins.

use std::sync::Arc;

use lookalike_plugin::ExtractorPlugin;

pub mod classic;

/// Registry name of the extractor a new database embeds with.
pub(crate) const DEFAULT: &str = "classic";

/// Every built-in plugin of this build (cargo features decide which).
pub(crate) fn builtin() -> Vec<Arc<dyn ExtractorPlugin>> {
    #[allow(unused_mut)]
    let mut v: Vec<Arc<dyn ExtractorPlugin>> = vec![Arc::new(classic::ClassicPlugin)];
    #[cfg(feature = "fused")]
    v.push(Arc::new(lookalike_fused::EfficientNetPlugin));
    #[cfg(feature = "fused")]
    v.push(Arc::new(lookalike_fused::FusedPlugin));
    #[cfg(feature = "simnet")]
    v.push(Arc::new(lookalike_simnet::SimNetPlugin));
    v
}

/// The built-in pair-scorer plugins (for `Db::train_scorer` by name).
pub(crate) fn builtin_scorers() -> Vec<Arc<dyn lookalike_plugin::ScorerPlugin>> {
    vec![
        #[cfg(feature = "mlp-diff")]
        Arc::new(lookalike_mlp_diff::MlpDiffPlugin),
    ]
}
