//! Name -> plugin: the built-in plugins plus those registered at open time.

use std::collections::BTreeMap;
use std::sync::Arc;

use lookalike_plugin::{Extractor, ExtractorPlugin};

use crate::error::{Error, Result};

/// The extractor plugins a database knows, by name.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    extractors: BTreeMap<String, Arc<dyn ExtractorPlugin>>,
}

impl Registry {
    /// The built-in plugins, then `extra` (which replace built-ins of the same name).
    pub fn new(extra: &[Arc<dyn ExtractorPlugin>]) -> Self {
        let mut extractors = BTreeMap::new();
        for p in crate::extractors::builtin()
            .into_iter()
            .chain(extra.iter().cloned())
        {
            extractors.insert(p.name().to_string(), p);
        }
        Registry { extractors }
    }

    pub fn names(&self) -> Vec<String> {
        self.extractors.keys().cloned().collect()
    }

    pub fn plugin(&self, name: &str) -> Result<&Arc<dyn ExtractorPlugin>> {
        self.extractors
            .get(name)
            .ok_or_else(|| Error::UnknownExtractor {
                name: name.to_string(),
                known: self.names(),
            })
    }

    /// Builds an extractor and checks its declaration.
    pub fn build(
        &self,
        name: &str,
        config: &str,
        weights: Option<&[u8]>,
    ) -> Result<Arc<dyn Extractor>> {
        let plugin = self.plugin(name)?;
        let e = plugin
            .build(config, weights)
            .map_err(|e| Error::plugin(name, e))?;
        let spec = e.spec();
        spec.input.validate().map_err(|e| Error::plugin(name, e))?;
        if spec.dim == 0 {
            return Err(Error::plugin(
                name,
                lookalike_plugin::PluginError::InvalidSpec("dimension 0".into()),
            ));
        }
        Ok(Arc::from(e))
    }
}
