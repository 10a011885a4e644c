//! The image endpoints: query, add, fetch, remove, labels, browse, stats, duplicates.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::{blocking, ApiError};
use super::Shared;
use crate::{ContentHash, Error, Hit, ImageId, ImageMeta, InsertMode, Inserted, Query};

/// Most hits a query may ask for.
const MAX_K: usize = 1000;
/// Items per page of `/api/browse` unless `limit` says (at most `MAX_PAGE`).
const PAGE: usize = 48;
const MAX_PAGE: usize = 500;

/// A path segment as an image id.
pub(super) fn parse_id(s: &str) -> Result<ImageId, ApiError> {
    s.parse::<u64>()
        .map(ImageId)
        .map_err(|_| ApiError::bad_request(format!("{s:?} is not an image id (a whole number)")))
}

/// A hit (or any stored image) as the API shows it.
pub(super) fn hit_json(h: &Hit) -> Value {
    let mut v = json!({
        "id": h.id.0,
        "distance": h.distance,
        "label": h.label,
        "source": h.source,
        "metadata": h.metadata,
        "thumb": format!("/api/thumbs/{}", h.id.0),
    });
    if let Some(s) = h.score {
        v["score"] = json!(s);
    }
    v
}

/// A stored image's description (no distance).
fn item_json(id: ImageId, meta: &ImageMeta) -> Value {
    json!({
        "id": id.0,
        "label": meta.label,
        "source": meta.source,
        "metadata": meta.metadata,
        "thumb": format!("/api/thumbs/{}", id.0),
    })
}

/// The JSON form of a query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QueryRequest {
    /// Query by a stored image (left out of its own results).
    id: Option<u64>,
    /// Query by an image uploaded earlier (its content hash, as `/api/query` answered).
    upload: Option<String>,
    k: Option<usize>,
    labels: Option<Vec<String>>,
    metadata: Option<serde_json::Map<String, Value>>,
    /// Re-rank this many nearest candidates with the server's pair scorer.
    rerank: Option<usize>,
}

/// What a query searches with: a stored image, or image bytes and their content hash.
enum Probe {
    Stored(ImageId),
    Bytes(Arc<Vec<u8>>, String),
}

/// `POST /api/query`: multipart with an `image` file (and optional `k`, `labels` as a JSON
/// array or comma-separated text, `metadata` as a JSON object, `rerank`), or JSON with `id`
/// or `upload` and the same fields.
pub(super) async fn query(State(s): State<Shared>, req: Request) -> Result<Response, ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let (probe, fields) = if multipart {
        let mut form = Multipart::from_request(req, &s).await?;
        let mut image = None;
        let mut fields = QueryRequest::default();
        while let Some(field) = form.next_field().await? {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "image" => image = Some(field.bytes().await?),
                "k" => fields.k = Some(number(&name, &field.text().await?)?),
                "rerank" => fields.rerank = Some(number(&name, &field.text().await?)?),
                "labels" => fields.labels = Some(labels_field(&field.text().await?)?),
                "metadata" => fields.metadata = Some(object_field(&field.text().await?)?),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown field {other:?}; a query takes image, k, labels, metadata, rerank"
                    )))
                }
            }
        }
        let image = image.ok_or_else(|| {
            ApiError::bad_request("the form has no `image` file; send one, or JSON with an id")
        })?;
        let bytes = Arc::new(image.to_vec());
        let hash = ContentHash::of(&bytes).to_string();
        if let Ok(mut uploads) = s.uploads.lock() {
            uploads.put(hash.clone(), Arc::clone(&bytes));
        }
        (Probe::Bytes(bytes, hash), fields)
    } else {
        let Json(q): Json<QueryRequest> =
            Json::from_request(req, &s)
                .await
                .map_err(|e: JsonRejection| match e {
                    JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
                        "send multipart/form-data with an `image` file, or application/json",
                    ),
                    other => other.into(),
                })?;
        let probe = match (q.id, &q.upload) {
            (Some(id), None) => Probe::Stored(ImageId(id)),
            (None, Some(hash)) => Probe::Bytes(uploaded(&s, hash)?, hash.clone()),
            _ => {
                return Err(ApiError::bad_request(
                    "a JSON query names exactly one of `id` (a stored image) or `upload`",
                ))
            }
        };
        (probe, q)
    };
    let query = to_query(&s, &fields)?;
    let upload = match &probe {
        Probe::Bytes(_, hash) => Some(hash.clone()),
        Probe::Stored(_) => None,
    };
    let db = s.db.clone();
    let result = tokio::task::spawn_blocking(move || match probe {
        Probe::Stored(id) => db.nearest_to_with(id, &query),
        Probe::Bytes(b, _) => db.nearest_with(&b, &query),
    })
    .await?;
    let hits = match result {
        Ok(hits) => hits,
        // Nothing (left) to find: an empty answer with the reason, not an error.
        Err(e @ Error::Empty { .. }) => {
            return Ok(
                Json(json!({"hits": [], "upload": upload, "note": e.message()})).into_response(),
            )
        }
        Err(e) => return Err(e.into()),
    };
    let hits: Vec<Value> = hits.iter().map(hit_json).collect();
    Ok(Json(json!({"hits": hits, "upload": upload})).into_response())
}

/// An upload kept from an earlier query.
fn uploaded(s: &Shared, hash: &str) -> Result<Arc<Vec<u8>>, ApiError> {
    s.uploads
        .lock()
        .ok()
        .and_then(|mut u| u.get(hash).cloned())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_upload",
                "that uploaded image is no longer kept by the server (it keeps the last few \
                 while it runs); upload it again",
            )
        })
}

/// The library query for the request's fields.
fn to_query(s: &Shared, q: &QueryRequest) -> Result<Query, ApiError> {
    let k = q.k.unwrap_or(10);
    if k == 0 || k > MAX_K {
        return Err(ApiError::bad_request(format!(
            "k must be between 1 and {MAX_K}, not {k}"
        )));
    }
    let mut query = Query::k(k);
    if let Some(labels) = &q.labels {
        if !labels.is_empty() {
            query = query.labels(labels.clone());
        }
    }
    for (key, value) in q.metadata.iter().flatten() {
        if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            return Err(ApiError::bad_request(format!(
                "metadata filter {key:?}: values are strings, numbers or booleans"
            )));
        }
        query = query.metadata(key.clone(), value.clone());
    }
    if let Some(candidates) = q.rerank {
        let scorer = s.options.scorer.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_scorer",
                "this server has no pair scorer to re-rank with (start it with \
                 `lookalike serve --train-scorer`, or give ServeOptions::scorer)",
            )
        })?;
        query = query.rerank(scorer, candidates.clamp(k, MAX_K));
    }
    Ok(query)
}

fn number(name: &str, text: &str) -> Result<usize, ApiError> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{name} must be a whole number, not {text:?}")))
}

/// Labels as a JSON array or comma-separated text.
fn labels_field(text: &str) -> Result<Vec<String>, ApiError> {
    let t = text.trim();
    if t.starts_with('[') {
        return serde_json::from_str(t).map_err(|e| {
            ApiError::bad_request(format!("labels: not a JSON array of strings: {e}"))
        });
    }
    Ok(t.split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn object_field(text: &str) -> Result<serde_json::Map<String, Value>, ApiError> {
    if text.trim().is_empty() {
        return Ok(serde_json::Map::new());
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("metadata: not a JSON object: {e}")))
}

/// `POST /api/images`: multipart with one or more `image` files (their file names become
/// sources), an optional `label`, `metadata` (a JSON object) and `allow_duplicates`
/// (`true` stores byte-identical copies again). Answers each file's id, in order.
pub(super) async fn add(
    State(s): State<Shared>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut form = form?;
    let mut files: Vec<(Option<String>, Bytes)> = Vec::new();
    let mut label = None;
    let mut metadata = None;
    let mut mode = InsertMode::SkipExisting;
    while let Some(field) = form.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" => {
                let file = field.file_name().map(String::from);
                files.push((file, field.bytes().await?));
            }
            "label" => {
                let l = field.text().await?;
                label = (!l.trim().is_empty()).then(|| l.trim().to_string());
            }
            "metadata" => {
                let text = field.text().await?;
                metadata = Some(object_field(&text)?);
            }
            "allow_duplicates" => {
                if field.text().await?.trim() == "true" {
                    mode = InsertMode::Always;
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field {other:?}; an upload takes image (one or more), label, \
                     metadata, allow_duplicates"
                )))
            }
        }
    }
    if files.is_empty() {
        return Err(ApiError::bad_request("the form has no `image` file"));
    }
    let metas: Vec<ImageMeta> = files
        .iter()
        .map(|(file, _)| ImageMeta {
            label: label.clone(),
            source: file.clone(),
            metadata: metadata.clone().filter(|m| !m.is_empty()),
        })
        .collect();
    for m in &metas {
        m.check()?;
    }
    let db = s.db.clone();
    let results = blocking(move || {
        let items = files.iter().map(|(_, b)| &b[..]).zip(metas.iter());
        db.insert_images_with(items, mode)
    })
    .await?;
    let mut any_failed = None;
    let images: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Ok(Inserted::New(id)) => json!({"id": id.0, "existing": false}),
            Ok(Inserted::Existing(id)) => json!({"id": id.0, "existing": true}),
            Err(e) => {
                let v = json!({"error": e.message(), "kind": e.kind()});
                any_failed.get_or_insert(e);
                v
            }
        })
        .collect();
    // All stored, or some refused (a bad image among good ones): the answer lists each; the
    // status is the first refusal's when nothing was stored.
    let stored = images.iter().filter(|v| v.get("id").is_some()).count();
    let status = match (&any_failed, stored) {
        (Some(e), 0) => super::errors::status_of(e),
        _ => StatusCode::OK,
    };
    Ok((status, Json(json!({"images": images}))).into_response())
}

/// `GET /api/images/{id}`: the stored bytes, with their content type.
pub(super) async fn image(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let db = s.db.clone();
    let bytes = blocking(move || db.image(id)).await?;
    Ok(image_response(bytes))
}

/// Bytes as an image response that may be cached for ever (ids are never reused).
fn image_response(bytes: Vec<u8>) -> Response {
    let mut headers = HeaderMap::new();
    let mime = image::guess_format(&bytes)
        .map(|f| f.to_mime_type())
        .unwrap_or("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(mime));
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    (headers, bytes).into_response()
}

/// `GET /api/uploads/{hash}`: an uploaded query image the server still keeps.
pub(super) async fn upload(
    State(s): State<Shared>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = uploaded(&s, &hash)?;
    Ok(image_response(bytes.to_vec()))
}

/// `GET /api/images/{id}/info`: label, source, metadata, content hash and size.
pub(super) async fn info(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let db = s.db.clone();
    let info = blocking(move || db.info(id)).await?;
    let mut v = item_json(id, &info.meta);
    v["hash"] = json!(info.hash.to_string());
    v["width"] = json!(info.width);
    v["height"] = json!(info.height);
    Ok(Json(v))
}

/// `DELETE /api/images/{id}`.
pub(super) async fn remove(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let db = s.db.clone();
    blocking(move || db.remove(id)).await?;
    s.thumbs.forget(id);
    Ok(Json(json!({"removed": id.0})))
}

/// `GET /api/labels`: every label with its count, and the number of images.
pub(super) async fn labels(State(s): State<Shared>) -> Json<Value> {
    let labels: Vec<Value> =
        s.db.labels()
            .into_iter()
            .map(|(label, count)| json!({"label": label, "count": count}))
            .collect();
    Json(json!({"images": s.db.len(), "labels": labels}))
}

/// Query parameters of `/api/browse`.
#[derive(Debug, Deserialize)]
pub(super) struct BrowseParams {
    label: Option<String>,
    cursor: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/browse?label=&cursor=&limit=`: stored images in id order, a page at a time;
/// `next` is the cursor of the following page (`null` at the end).
pub(super) async fn browse(
    State(s): State<Shared>,
    params: Result<axum::extract::Query<BrowseParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = params?.0;
    let limit = p.limit.unwrap_or(PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let label = p.label.filter(|l| !l.is_empty());
    let db = s.db.clone();
    let page = blocking(move || {
        // One more than asked tells whether a next page exists.
        let ids = db.browse(label.as_deref(), p.cursor.map(ImageId), limit + 1);
        let more = ids.len() > limit;
        let mut items = Vec::with_capacity(limit);
        for id in ids.into_iter().take(limit) {
            match db.meta(id) {
                Ok(meta) => items.push((id, meta)),
                // Removed since the page was listed.
                Err(Error::UnknownImage(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((items, more))
    })
    .await?;
    let (items, more) = page;
    let next = if more {
        items.last().map(|(id, _)| id.0)
    } else {
        None
    };
    let items: Vec<Value> = items.iter().map(|(id, m)| item_json(*id, m)).collect();
    Ok(Json(json!({"items": items, "next": next})))
}

/// An f32 setting as the decimal it was written as (0.05, not 0.05000000074505806).
fn rounded(x: f32) -> f64 {
    (f64::from(x) * 1e6).round() / 1e6
}

/// `GET /api/stats`: the same figures as `lookalike stats --json`.
pub(super) async fn stats(State(s): State<Shared>) -> Json<Value> {
    let db = &s.db;
    let model = db.active_model();
    let index = db.index_info();
    Json(json!({
        "images": db.len(),
        "labels": db.labels(),
        "model": {"version": model.version, "extractor": model.extractor,
                  "config": model.config, "dim": model.dim,
                  "extractor_dim": model.extractor_dim, "compacted_from": model.compacted_from,
                  "metric": model.metric.as_str(),
                  "duplicate_distance": rounded(db.default_duplicate_distance())},
        "index": {"kind": index.kind, "vectors": index.len, "dim": index.dim},
        "extractors": db.extractors(),
        "max_image_bytes": db.options().image_byte_limit(),
    }))
}

/// Query parameters of `/api/duplicates`.
#[derive(Debug, Deserialize)]
pub(super) struct DuplicateParams {
    max_distance: Option<f32>,
}

/// `GET /api/duplicates?max_distance=`: groups of near-identical images with their members.
pub(super) async fn duplicates(
    State(s): State<Shared>,
    params: Result<axum::extract::Query<DuplicateParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let max = params?.0.max_distance;
    let db = s.db.clone();
    let (groups, used) = blocking(move || {
        let used = max.unwrap_or_else(|| db.default_duplicate_distance());
        let groups = db.duplicates(max)?;
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let mut members = Vec::with_capacity(g.ids.len());
            for (id, d) in g.ids.iter().zip(&g.distances) {
                if let Ok(meta) = db.meta(*id) {
                    let mut v = item_json(*id, &meta);
                    v["distance"] = json!(d);
                    members.push(v);
                }
            }
            out.push(
                json!({"ids": g.ids.iter().map(|i| i.0).collect::<Vec<_>>(), "members": members}),
            );
        }
        Ok((out, used))
    })
    .await?;
    Ok(Json(
        json!({"max_distance": rounded(used), "groups": groups}),
    ))
}

/// Any other path under `/api/`.
pub(super) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/serve.md for the API",
    )
}
