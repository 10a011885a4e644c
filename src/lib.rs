//! # lookalike: an embeddable image-similarity database
//!
//! Open a directory, put images in, ask for the most similar ones. No server, no Python:
//! storage is [sled], search is [FAISS], features come from extractor plugins written with
//! [candle]. A fresh database already finds similar images with a training-free descriptor
//! (the `classic` extractor); trained extractors replace it as models.
//!
//! [sled]: https://docs.rs/sled
//! [FAISS]: https://github.com/facebookresearch/faiss
//! [candle]: https://docs.rs/candle-core
//!
//! ## Example
//!
//! ```
//! # fn main() -> lookalike::Result<()> {
//! # let dir = tempfile::tempdir().map_err(|e| lookalike::Error::InvalidArgument(e.to_string()))?;
//! use lookalike::{Db, Query};
//!
//! // Two tiny images made on the spot: a dark square and a bright one.
//! fn png(level: u8) -> Vec<u8> {
//!     let img = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([level ^ ((x * y) as u8 & 7)]));
//!     let mut out = std::io::Cursor::new(Vec::new());
//!     img.write_to(&mut out, image::ImageFormat::Png).unwrap();
//!     out.into_inner()
//! }
//!
//! let db = Db::open(dir.path().join("shop.db"))?;
//! let dark = db.insert_image(&png(10), Some("dark"))?;
//! db.insert_image(&png(240), Some("bright"))?;
//!
//! let hits = db.nearest(&png(12), 1)?;
//! assert_eq!(hits[0].id, dark);
//! assert_eq!(hits[0].label.as_deref(), Some("dark"));
//!
//! // Only images labelled "bright":
//! let hits = db.nearest_with(&png(12), &Query::k(1).labels(["bright"]))?;
//! assert_eq!(hits[0].label.as_deref(), Some("bright"));
//! # Ok(()) }
//! ```
//!
//! ## Sources, metadata, content hashes, duplicates
//!
//! Each image may carry a source (the path or URI it came from) and a JSON metadata object;
//! hits carry both, and queries filter on metadata as on labels. The content hash of the bytes
//! is stored: [`Db::find_by_hash`], and [`InsertMode::SkipExisting`] to answer a byte-identical
//! image with the stored id. [`Db::duplicates`] groups near-identical images.
//!
//! ```
//! # fn main() -> lookalike::Result<()> {
//! # let dir = tempfile::tempdir().map_err(|e| lookalike::Error::InvalidArgument(e.to_string()))?;
//! use lookalike::{ContentHash, Db, ImageMeta, InsertMode, Inserted, Query};
//! # fn png(level: u8) -> Vec<u8> {
//! #     let img = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([level ^ ((x * y) as u8 & 7)]));
//! #     let mut out = std::io::Cursor::new(Vec::new());
//! #     img.write_to(&mut out, image::ImageFormat::Png).unwrap();
//! #     out.into_inner()
//! # }
//! let db = Db::open(dir.path().join("shop.db"))?;
//! let meta = ImageMeta::label("dark")
//!     .source("photos/dark.png")
//!     .metadata(serde_json::json!({"sku": "D-1"}))?;
//! let (dark, bright) = (png(10), png(240));
//! let out = db.insert_images_with(
//!     [(&dark[..], &meta), (&bright[..], &ImageMeta::default()), (&dark[..], &meta)],
//!     InsertMode::SkipExisting,
//! )?;
//! let Ok(Inserted::New(id)) = out[0] else { panic!("stored") };
//! assert!(matches!(out[2], Ok(Inserted::Existing(i)) if i == id)); // same bytes: not stored twice
//!
//! let hits = db.nearest_with(&png(12), &Query::k(1).metadata("sku", "D-1"))?;
//! assert_eq!(hits[0].source.as_deref(), Some("photos/dark.png"));
//! assert_eq!(db.find_by_hash(&ContentHash::of(&dark))?, vec![id]);
//! assert!(db.duplicates(None)?.is_empty()); // no near-identical pair among the two
//! # Ok(()) }
//! ```
//!
//! ## Durability
//!
//! Under the default [`Durability::Immediate`], an insert, removal or label change is on disk
//! when the call returns and survives `kill -9`. An image goes into the store in one
//! transaction (bytes, entry, embedding); the FAISS index is derived from the store and, after
//! a crash, caught up from it on open, so the index never holds an id the store lacks.
//! [`Durability::Relaxed`] flushes in the background for bulk loads.
//!
//! Only one handle may have a database open at a time: a second `Db::open` of the same
//! directory, in this process or another, fails with [`Error::Locked`] (after [`LOCK_WAIT`]).
//! Share one handle instead: [`Db`] is `Clone + Send + Sync`.
//!
//! ## Photos and untrusted input
//!
//! Image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) are stored as given and decoded with size
//! limits ([`Options::max_image_bytes`], [`Options::max_image_pixels`], checked from the
//! header before decoding, against decompression bombs). What an extractor sees follows one
//! decode policy, the same for stored images, queries and training: the EXIF orientation is
//! applied, transparency is composited over the input's background (white by default), and a
//! JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps at least twice the
//! extractor's input size, so a 12 MP photo costs a fraction of a full decode; decoding runs
//! on every core and never keeps more than one full-size image per core
//! ([`decode_for`] shows the result). Every bad input is a typed [`Error`]; a stored record
//! that does not decode is [`Error::Corrupt`], never a panic or an abort.
//!
//! ## Crate features
//!
//! * `fused` (default): the `efficientnet-lite0` extractor (pretrained; weights from a file
//!   you give) and the `fused` ResNet50 + VGG19 extractor ([`fused`]).
//! * `simnet` (default): the multi-scale Siamese `simnet` extractor ([`simnet`]).
//! * `mlp-diff` (default): the |x1 - x2| pair scorer used by [`Query::rerank`] and
//!   [`Db::same`] ([`mlp_diff`]).
//! * `serve` (default): [`serve`], the HTTP API and page of `lookalike serve` (axum, tokio).
//! * `gpu`: candle's CUDA backend and FAISS's GPU build (needs CUDA; never needed by tests;
//!   not yet checked on a GPU machine).
//!
//! ## Training
//!
//! [`Db::train_extractor_with`] trains a trainable extractor (`simnet`, `fused`) from the
//! labelled images the database holds: every pair of each batch weighed by a supervised
//! contrastive loss (default) or pairs mined per batch (OPMS, naive, balanced, 1 + N), an
//! evaluation on a held-out split before and after, a checkpoint per epoch (resumable after a
//! crash), then a new model version, every image re-embedded, a new index and an atomic switch.
//! Old versions stay ([`Db::models`], [`Db::use_model`], [`Db::delete_model`]).
//! [`Db::train_scorer`] trains the pair scorer. See `docs/training.md`. Training allocates
//! and frees large tensors at a high rate: an application that trains should use mimalloc
//! (or another caching allocator) as its global allocator, as the `lookalike` tool does
//! (14 % more images/s than glibc's malloc in the Fashion-MNIST job).
//!
//! ```no_run
//! # fn main() -> lookalike::Result<()> {
//! use lookalike::{Db, TrainOptions};
//!
//! let db = Db::open("shop.db")?;
//! let report = db.train_extractor_with("simnet", TrainOptions::default().max_minutes(15.0))?;
//! println!(
//!     "model v{}: held-out accuracy@1 {:.3} -> {:.3}",
//!     report.version, report.before.accuracy_at_1, report.after.accuracy_at_1
//! );
//! # Ok(()) }
//! ```
//!
//! ## Plugins
//!
//! Extractors implement [`lookalike_plugin::Extractor`] and are built by an
//! [`lookalike_plugin::ExtractorPlugin`] registered with [`Options::register`]. See
//! `docs/plugins.md` and `examples/custom_extractor.rs`.

#![deny(missing_docs)]

mod codec;
pub mod datasets;
mod db;
mod error;
pub mod extractors;
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod options;
mod preprocess;
mod registry;
#[cfg(feature = "serve")]
pub mod serve;
mod store;
pub mod training;

pub use db::{
    ContentHash, Db, DuplicateGroup, Hit, ImageInfo, ImageMeta, IndexInfo, IndexSource, InsertMode,
    Inserted, Metadata, ModelInfo, Prepared, Query, Rerank, LOCK_WAIT,
};
pub use error::{Error, Result};
pub use lookalike_plugin;
pub use options::{Durability, IndexKind, Options};
pub use training::{
    Activate, Augment, CancelToken, CaseAccuracy, Holdout, Metrics, OptimiserKind, Phase, Progress,
    ScorerReport, ScorerTrainOptions, TrainOptions, TrainReport,
};

/// The EfficientNet-Lite0 (and fused-backbone) plugin crate.
#[cfg(feature = "fused")]
pub use lookalike_fused as fused;
/// The MLP |x1 - x2| pair-scorer plugin crate.
#[cfg(feature = "mlp-diff")]
pub use lookalike_mlp_diff as mlp_diff;
/// The SimNet plugin crate.
#[cfg(feature = "simnet")]
pub use lookalike_simnet as simnet;

/// What an extractor declaring `input` is fed for the encoded image `bytes`: the `C x H x W`
/// values the database computes under its decode policy (EXIF orientation applied,
/// transparency composited over `input.background`, JPEG decoded at a reduced DCT scale,
/// resized with a bilinear filter, normalised by `input.mean` and `input.std`), with the
/// default size limits of [`Options`]. For plugin authors who want to see their input, and for
/// benchmarks of decoding alone.
///
/// ```
/// # fn main() -> lookalike::Result<()> {
/// use lookalike::lookalike_plugin::InputSpec;
/// let img = image::RgbaImage::from_pixel(40, 30, image::Rgba([0, 255, 0, 0])); // transparent
/// let mut png = std::io::Cursor::new(Vec::new());
/// img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| lookalike::Error::InvalidArgument(e.to_string()))?;
/// let values = lookalike::decode_for(png.get_ref(), &InputSpec::rgb(4, 4))?;
/// assert_eq!(values.len(), 3 * 4 * 4);
/// assert!(values.iter().all(|v| *v == 1.0)); // white where it is transparent
/// # Ok(()) }
/// ```
pub fn decode_for(bytes: &[u8], input: &lookalike_plugin::InputSpec) -> Result<Vec<f32>> {
    input
        .validate()
        .map_err(|e| Error::plugin("decode_for", e))?;
    let thumb = preprocess::prepare(bytes, Options::default().limits(), input)?;
    let mut out = Vec::with_capacity((input.channels * input.width * input.height) as usize);
    thumb.normalised_into(input, &mut out);
    Ok(out)
}

/// The id of a stored image: assigned on insert, never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ImageId(pub u64);

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for ImageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        s.trim().parse().map(ImageId).map_err(|_| {
            Error::InvalidArgument(format!("{s:?} is not an image id (a whole number)"))
        })
    }
}
