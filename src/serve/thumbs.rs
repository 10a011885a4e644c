//! `GET /api/thumbs/{id}?size=N`: a JPEG no larger than N pixels on its longer side, made on
//! demand under the same decode policy as the extractors' input (EXIF orientation applied,
//! transparency over white, JPEG decoded at a reduced DCT scale) and kept in memory.

use std::sync::{Arc, Mutex};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use lookalike_plugin::InputSpec;
use serde::Deserialize;

use super::api::parse_id;
use super::errors::{blocking, ApiError};
use super::Shared;
use crate::preprocess::{self, ImageLimits};
use crate::{Db, Error, ImageId, Result};

/// The default and largest thumbnail sides.
const DEFAULT_SIZE: u32 = 256;
const MIN_SIZE: u32 = 16;
const MAX_SIZE: u32 = 1024;
const QUALITY: u8 = 85;

/// A thumbnail's key: image id and size asked for.
type Key = (u64, u32);

/// Thumbnails by (id, size), most recently used kept.
pub(crate) struct Cache(Mutex<lru::LruCache<Key, Arc<Vec<u8>>>>);

impl Cache {
    pub(crate) fn new(capacity: std::num::NonZeroUsize) -> Self {
        Cache(Mutex::new(lru::LruCache::new(capacity)))
    }

    fn get(&self, key: Key) -> Option<Arc<Vec<u8>>> {
        self.0.lock().ok().and_then(|mut c| c.get(&key).cloned())
    }

    fn put(&self, key: Key, jpeg: Arc<Vec<u8>>) {
        if let Ok(mut c) = self.0.lock() {
            c.put(key, jpeg);
        }
    }

    /// Drops every size of a removed image.
    pub(crate) fn forget(&self, id: ImageId) {
        if let Ok(mut c) = self.0.lock() {
            let keys: Vec<Key> = c.iter().map(|(k, _)| *k).filter(|k| k.0 == id.0).collect();
            for k in keys {
                c.pop(&k);
            }
        }
    }
}

/// Query parameters of the thumbnail endpoint.
#[derive(Debug, Deserialize)]
pub(crate) struct ThumbParams {
    size: Option<u32>,
}

pub(crate) async fn thumb(
    State(s): State<Shared>,
    Path(id): Path<String>,
    params: Result<axum::extract::Query<ThumbParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let size = params?.0.size.unwrap_or(DEFAULT_SIZE);
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(ApiError::bad_request(format!(
            "size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}"
        )));
    }
    let jpeg = match s.thumbs.get((id.0, size)) {
        Some(j) => j,
        None => {
            let db = s.db.clone();
            let j = Arc::new(blocking(move || make(&db, id, size)).await?);
            s.thumbs.put((id.0, size), Arc::clone(&j));
            j
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    // Ids are never reused: a thumbnail never changes (a removed image's is gone, 404).
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok((headers, jpeg.to_vec()).into_response())
}

/// The thumbnail of a stored image as JPEG.
pub(crate) fn make(db: &Db, id: ImageId, size: u32) -> Result<Vec<u8>> {
    let info = db.info(id)?;
    let bytes = db.image(id)?;
    // The upright size, fitted into size x size without enlarging.
    let (w, h) = (info.width.max(1), info.height.max(1));
    let scale = (f64::from(size) / f64::from(w.max(h))).min(1.0);
    let tw = ((f64::from(w) * scale).round() as u32).max(1);
    let th = ((f64::from(h) * scale).round() as u32).max(1);
    let spec = InputSpec::rgb(tw, th);
    let pixels = preprocess::prepare(&bytes, ImageLimits::STORED, &spec)?.into_pixels();
    let img = image::RgbImage::from_raw(tw, th, pixels).ok_or_else(|| Error::Undecodable {
        reason: "the thumbnail has the wrong size".into(),
    })?;
    let mut out = Vec::with_capacity((tw * th / 4) as usize);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(&img)
        .map_err(|e| Error::Undecodable {
            reason: format!("could not encode the thumbnail: {e}"),
        })?;
    Ok(out)
}
