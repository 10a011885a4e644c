//! A third-party extractor plugin, defined here, depending on `lookalike-plugin` only.
//!
//! ```text
//! cargo run --release --example custom_extractor
//! ```
//!
//! The extractor is a "colour layout" descriptor: the image shrunk to 4 x 4 RGB cells, 48 numbers,
//! compared with Euclidean distance. The database does the decoding and resizing from the
//! extractor's declaration (`spec`); the plugin only turns a batch tensor into embeddings.

use std::sync::Arc;

use lookalike::{Db, Options};
use lookalike_plugin::candle_core::Tensor;
use lookalike_plugin::{
    check_batch, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
};

/// The extractor: stateless, so `save_weights` has nothing to save.
#[derive(Debug)]
struct ColourLayout;

impl Extractor for ColourLayout {
    fn name(&self) -> &str {
        "colour-layout"
    }

    fn spec(&self) -> ExtractorSpec {
        // The database hands us N x 3 x 4 x 4 tensors with values in [0, 1].
        ExtractorSpec {
            input: InputSpec::rgb(4, 4),
            dim: 48,
            metric: Metric::L2,
        }
    }

    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        let n = check_batch(batch, &self.spec().input)?;
        Ok(batch.reshape((n, 48))?)
    }

    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }
}

/// The factory the database's registry holds.
#[derive(Debug)]
struct ColourLayoutPlugin;

impl ExtractorPlugin for ColourLayoutPlugin {
    fn name(&self) -> &str {
        "colour-layout"
    }

    fn build(
        &self,
        config: &str,
        _weights: Option<&[u8]>,
    ) -> Result<Box<dyn Extractor>, PluginError> {
        if !config.is_empty() {
            return Err(PluginError::UnknownConfig {
                config: config.into(),
                known: "(empty)".into(),
            });
        }
        Ok(Box::new(ColourLayout))
    }
}

fn png(r: u8, g: u8, b: u8) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let img = image::RgbImage::from_fn(64, 64, |x, _| {
        // Left half coloured, right half grey: a layout the descriptor sees.
        if x < 32 {
            image::Rgb([r, g, b])
        } else {
            image::Rgb([128, 128, 128])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("lookalike-custom-extractor.db");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    // Register the plugin and make it the extractor of the new database. Reopening later needs
    // the same registration: the database stores the plugin's name, not its code.
    let options = || {
        Options::default()
            .register(Arc::new(ColourLayoutPlugin))
            .extractor("colour-layout", "")
    };
    let db = Db::open_with(&dir, options())?;
    println!("extractors known to this handle: {:?}", db.extractors());
    println!("active model: {:?}", db.active_model());

    for (name, rgb) in [
        ("red", (220, 20, 20)),
        ("green", (20, 200, 40)),
        ("blue", (30, 40, 210)),
        ("orange", (240, 140, 20)),
    ] {
        db.insert_image(&png(rgb.0, rgb.1, rgb.2)?, Some(name))?;
    }
    let hits = db.nearest(&png(250, 60, 30)?, 2)?;
    println!("nearest to a red-orange image:");
    for h in &hits {
        println!(
            "  {:<7} distance {:.4}",
            h.label.as_deref().unwrap_or("-"),
            h.distance
        );
    }
    drop(db);

    // Without the registration the database cannot embed queries: a typed error says so.
    match Db::open(&dir) {
        Err(e) => println!("opening without the plugin: {e}"),
        Ok(_) => println!("unexpected: opened without the plugin"),
    }
    Ok(())
}
