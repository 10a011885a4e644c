//! The HTTP API of `lookalike serve` through its router, without a socket: every endpoint,
//! every error status, a 9 MB upload, concurrent queries, a training job's event stream.

use axum::body::{Body, Bytes};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use lookalike::serve::{router, ApiError, ServeOptions};
use lookalike::{Db, Error, ImageId, Options};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::{class_png, noise_png, open, relaxed, tempdir};

/// A database of 4 labels x 6 images, and its router.
fn app(dir: &std::path::Path, opts: Options) -> (Db, Router) {
    let db = open(dir, opts);
    let items: Vec<(Vec<u8>, String)> = (0..24)
        .map(|i| (class_png(i % 4, u64::from(i)), format!("c{}", i % 4)))
        .collect();
    db.insert_images(items.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap();
    let app = router(db.clone(), ServeOptions::default());
    (db, app)
}

struct Answer {
    status: StatusCode,
    content_type: String,
    cache: String,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// An error answer's kind, checking the status and the shape.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(
            self.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["kind"].as_str().unwrap().to_string()
    }
}

async fn call(app: &Router, req: Request<Body>) -> Answer {
    let r = app.clone().oneshot(req).await.unwrap();
    let headers = r.headers().clone();
    let header = |h| -> String {
        headers
            .get(h)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (status, content_type, cache) = (
        r.status(),
        header(header::CONTENT_TYPE),
        header(header::CACHE_CONTROL),
    );
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        content_type,
        cache,
        body,
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, v: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// A multipart form: (name, file name, bytes) parts.
fn multipart(uri: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let boundary = "lookalike-test-boundary-7c1e";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(uri)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap()
}

fn hit_ids(v: &Value) -> Vec<u64> {
    v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_by_upload_by_id_and_by_earlier_upload() {
    let dir = tempdir();
    let (db, app) = app(dir.path(), relaxed());
    let probe = class_png(2, 99);
    let a = call(
        &app,
        multipart(
            "/api/query",
            &[
                ("image", Some("q.png"), &probe),
                ("k", None, b"5"),
                ("labels", None, b"c2,c3"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 5);
    let direct = db
        .nearest_with(&probe, &lookalike::Query::k(5).labels(["c2", "c3"]))
        .unwrap();
    assert_eq!(
        hit_ids(&v),
        direct.iter().map(|h| h.id.0).collect::<Vec<_>>()
    );
    for (h, d) in hits.iter().zip(&direct) {
        assert!(["c2", "c3"].contains(&h["label"].as_str().unwrap()));
        assert_eq!(h["thumb"], format!("/api/thumbs/{}", d.id.0));
        assert!((h["distance"].as_f64().unwrap() - f64::from(d.distance)).abs() < 1e-6);
    }
    // The upload is kept: the page's address can ask again, and show it.
    let upload = v["upload"].as_str().unwrap().to_string();
    assert_eq!(upload, lookalike::ContentHash::of(&probe).to_string());
    let again = call(
        &app,
        post_json(
            "/api/query",
            &json!({"upload": upload, "k": 5, "labels": ["c2", "c3"]}),
        ),
    )
    .await;
    assert_eq!(hit_ids(&again.json()), hit_ids(&v));
    let shown = call(&app, get(&format!("/api/uploads/{upload}"))).await;
    assert_eq!(
        (shown.status, &shown.body[..]),
        (StatusCode::OK, &probe[..])
    );
    assert_eq!(shown.content_type, "image/png");

    // By a stored image: it is left out of its own results.
    let by_id = call(&app, post_json("/api/query", &json!({"id": 3, "k": 4}))).await;
    let ids = hit_ids(&by_id.json());
    assert_eq!(ids.len(), 4);
    assert!(!ids.contains(&3));
    // Metadata filters, and a filter nothing matches: an empty answer with the reason.
    let none = call(
        &app,
        post_json("/api/query", &json!({"id": 3, "metadata": {"sku": "nope"}})),
    )
    .await;
    assert_eq!(none.status, StatusCode::OK);
    let none = none.json();
    assert_eq!(none["hits"], json!([]));
    assert!(none["note"].as_str().unwrap().contains("sku"), "{none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9_mb_photo_goes_through_and_larger_than_the_limit_is_413() {
    let dir = tempdir();
    let (_db, app) = app(dir.path(), relaxed());
    // Random pixels do not compress: 1,750 x 1,750 x 3 bytes is about 9.2 MB of PNG.
    let big = noise_png(7, 1750);
    assert!(big.len() > 9_000_000, "{}", big.len());
    let a = call(
        &app,
        multipart("/api/query", &[("image", Some("big.png"), &big)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json());
    assert_eq!(a.json()["hits"].as_array().unwrap().len(), 10);

    // A database with a 1 MB limit: over it (but within the body limit) is the library's
    // refusal; far over it, the body limit's; both 413 too_large.
    let dir = tempdir();
    let (_db, app) = self::app(dir.path(), relaxed().max_image_bytes(1 << 20));
    let over = noise_png(8, 700);
    assert!(over.len() > 1 << 20 && over.len() < 2 << 20);
    let a = call(
        &app,
        multipart("/api/query", &[("image", Some("o.png"), &over)]),
    )
    .await;
    assert_eq!(a.error(StatusCode::PAYLOAD_TOO_LARGE), "too_large");
    let a = call(
        &app,
        multipart("/api/query", &[("image", Some("b.png"), &big)]),
    )
    .await;
    assert_eq!(a.error(StatusCode::PAYLOAD_TOO_LARGE), "too_large");
    let a = call(
        &app,
        multipart("/api/images", &[("image", Some("b.png"), &big)]),
    )
    .await;
    assert_eq!(a.error(StatusCode::PAYLOAD_TOO_LARGE), "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_with_fitting_statuses() {
    let dir = tempdir();
    let (_db, app) = app(dir.path(), relaxed());
    let q = |v: Value| post_json("/api/query", &v);
    let bad_image = multipart("/api/query", &[("image", Some("x.png"), b"not an image")]);
    assert_eq!(
        call(&app, bad_image).await.error(StatusCode::BAD_REQUEST),
        "bad_image"
    );
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            q(json!({"id": 999})),
            StatusCode::NOT_FOUND,
            "unknown_image",
        ),
        (
            q(json!({"id": 1, "k": 0})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            q(json!({"id": 1, "upload": "ab"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (q(json!({"k": 3})), StatusCode::BAD_REQUEST, "bad_request"),
        (
            q(json!({"id": 1, "colour": 1})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            q(json!({"upload": "00"})),
            StatusCode::NOT_FOUND,
            "unknown_upload",
        ),
        (
            q(json!({"id": 1, "rerank": 20})),
            StatusCode::BAD_REQUEST,
            "no_scorer",
        ),
        (
            q(json!({"id": 1, "metadata": {"a": [1]}})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::post("/api/query").body(Body::from("{")).unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            multipart("/api/query", &[("k", None, b"3")]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            multipart("/api/images", &[("label", None, b"x")]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            multipart(
                "/api/images",
                &[
                    ("image", Some("a.png"), &class_png(0, 1)),
                    ("metadata", None, b"[1]"),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/images/999"),
            StatusCode::NOT_FOUND,
            "unknown_image",
        ),
        (
            get("/api/images/abc"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/images/999/info"),
            StatusCode::NOT_FOUND,
            "unknown_image",
        ),
        (
            get("/api/thumbs/999"),
            StatusCode::NOT_FOUND,
            "unknown_image",
        ),
        (
            get("/api/thumbs/1?size=5"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/thumbs/1?size=big"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/browse?limit=0"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/browse?cursor=x"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/duplicates?max_distance=x"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::delete("/api/images/999")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "unknown_image",
        ),
        (
            Request::post("/api/models/7/use")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "unknown_model",
        ),
        (
            post_json("/api/train", &json!({"extractor": "nope"})),
            StatusCode::BAD_REQUEST,
            "unknown_extractor",
        ),
        (
            post_json(
                "/api/train",
                &json!({"extractor": "simnet", "activate": "maybe"}),
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/api/train/5/events"),
            StatusCode::NOT_FOUND,
            "unknown_job",
        ),
        (get("/api/nothing-here"), StatusCode::NOT_FOUND, "not_found"),
    ];
    for (req, status, kind) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        assert_eq!(call(&app, req).await.error(status), kind, "{what}");
    }
    // What only the job finds out (here: an extractor without a trainable form) ends its
    // event stream with a `failed` event.
    let job = call(
        &app,
        post_json("/api/train", &json!({"extractor": "classic"})),
    )
    .await;
    assert_eq!(job.status, StatusCode::ACCEPTED);
    let ev = events(&app, job.json()["job"].as_u64().unwrap()).await;
    let (name, data) = ev.last().unwrap();
    assert_eq!(
        (name.as_str(), data["kind"].as_str()),
        ("failed", Some("not_trainable"))
    );
    // The statuses of errors a test cannot easily cause here.
    let status = |e: Error| ApiError::from(e).status;
    let full = Error::DiskFull {
        path: "x".into(),
        available: 1,
        needed: 2,
    };
    assert_eq!(status(full), StatusCode::INSUFFICIENT_STORAGE);
    let locked = Error::Locked { path: "x".into() };
    assert_eq!(status(locked), StatusCode::CONFLICT);
    assert_eq!(status(Error::JobRunning), StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fetch_remove_and_thumbnails() {
    let dir = tempdir();
    let (db, app) = app(dir.path(), relaxed());
    let (a, b) = (class_png(1, 500), crate::common::noise_png(3, 40));
    let r = call(
        &app,
        multipart(
            "/api/images",
            &[
                ("image", Some("shop/a.png"), &a),
                ("image", Some("shop/b.png"), &b),
                ("label", None, b"new"),
                ("metadata", None, br#"{"sku": "A-1"}"#),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let images = r.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    let id = images[0]["id"].as_u64().unwrap();
    assert_eq!(images[0]["existing"], false);
    let meta = db.meta(ImageId(id)).unwrap();
    assert_eq!(meta.label.as_deref(), Some("new"));
    assert_eq!(meta.source.as_deref(), Some("shop/a.png"));
    assert_eq!(meta.metadata.unwrap()["sku"], "A-1");
    // The same bytes again are the stored image, unless duplicates are allowed.
    let again = call(
        &app,
        multipart("/api/images", &[("image", Some("a2.png"), &a)]),
    )
    .await;
    assert_eq!(
        again.json()["images"][0],
        json!({"id": id, "existing": true})
    );
    let dup = call(
        &app,
        multipart(
            "/api/images",
            &[
                ("image", Some("a3.png"), &a),
                ("allow_duplicates", None, b"true"),
            ],
        ),
    )
    .await;
    assert_ne!(dup.json()["images"][0]["id"], json!(id));
    // A bad file among good ones: each answered; the good one stored.
    let mixed = call(
        &app,
        multipart(
            "/api/images",
            &[
                ("image", Some("ok.png"), &class_png(3, 77)),
                ("image", Some("bad.png"), b"xx"),
            ],
        ),
    )
    .await;
    assert_eq!(mixed.status, StatusCode::OK);
    let m = mixed.json();
    assert!(m["images"][0]["id"].is_u64());
    assert_eq!(m["images"][1]["kind"], "bad_image");

    // The original bytes with their type; info; a thumbnail that fits the size asked.
    let got = call(&app, get(&format!("/api/images/{id}"))).await;
    assert_eq!((got.status, &got.body[..]), (StatusCode::OK, &a[..]));
    assert_eq!(got.content_type, "image/png");
    assert!(got.cache.contains("immutable"));
    let info = call(&app, get(&format!("/api/images/{id}/info")))
        .await
        .json();
    assert_eq!(info["hash"], lookalike::ContentHash::of(&a).to_string());
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(32), Some(32))
    );
    let big = crate::common::encode(
        &image::RgbImage::from_fn(400, 200, |x, _| image::Rgb([(x % 256) as u8, 0, 0])),
        image::ImageFormat::Png,
    );
    let big_id = db.insert_image(&big, None).unwrap();
    for (size, want) in [
        (None, (256, 128)),
        (Some(64), (64, 32)),
        (Some(1024), (400, 200)),
    ] {
        let uri = match size {
            Some(s) => format!("/api/thumbs/{}?size={s}", big_id.0),
            None => format!("/api/thumbs/{}", big_id.0),
        };
        let t = call(&app, get(&uri)).await;
        assert_eq!(t.status, StatusCode::OK);
        assert_eq!(t.content_type, "image/jpeg");
        assert!(t.cache.contains("immutable"));
        let img = image::load_from_memory(&t.body).unwrap();
        assert_eq!((img.width(), img.height()), want, "{uri}");
    }

    // Removed: gone from the store, the thumbnails (cached or not) and the queries.
    let t = call(&app, get(&format!("/api/thumbs/{id}"))).await;
    assert_eq!(t.status, StatusCode::OK);
    let del = Request::delete(format!("/api/images/{id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, del).await.json(), json!({"removed": id}));
    for uri in [format!("/api/images/{id}"), format!("/api/thumbs/{id}")] {
        assert_eq!(
            call(&app, get(&uri)).await.error(StatusCode::NOT_FOUND),
            "unknown_image"
        );
    }
    let q = call(&app, post_json("/api/query", &json!({"id": 1, "k": 100}))).await;
    assert!(!hit_ids(&q.json()).contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_browse_stats_and_duplicates() {
    let dir = tempdir();
    let (db, app) = app(dir.path(), relaxed());
    let copy = db.image(ImageId(5)).unwrap();
    let twin = db
        .insert_images_with(
            [(&copy[..], &lookalike::ImageMeta::label("c1"))],
            lookalike::InsertMode::Always,
        )
        .unwrap()[0]
        .as_ref()
        .unwrap()
        .id();

    let labels = call(&app, get("/api/labels")).await.json();
    assert_eq!(labels["images"], 25);
    assert_eq!(labels["labels"][1], json!({"label": "c1", "count": 7}));

    // Pages of 3 through label c1, then through everything.
    for (label, want) in [("c1", 7), ("", 25)] {
        let mut seen = Vec::new();
        let mut cursor: Option<u64> = None;
        loop {
            let mut uri = format!("/api/browse?limit=3&label={label}");
            if let Some(c) = cursor {
                uri += &format!("&cursor={c}");
            }
            let page = call(&app, get(&uri)).await.json();
            for item in page["items"].as_array().unwrap() {
                if !label.is_empty() {
                    assert_eq!(item["label"], label);
                }
                seen.push(item["id"].as_u64().unwrap());
            }
            match page["next"].as_u64() {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), want, "label {label:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    let stats = call(&app, get("/api/stats")).await.json();
    assert_eq!(stats["images"], 25);
    assert_eq!(stats["model"]["extractor"], "classic");
    assert_eq!(stats["index"]["vectors"], 25);

    // The synthetic classes are near-identical among themselves under `classic`; the copy is
    // at distance 0.
    let dups = call(&app, get("/api/duplicates")).await.json();
    assert_eq!(dups["max_distance"], 0.05);
    let groups = dups["groups"].as_array().unwrap();
    assert!(groups
        .iter()
        .any(|g| g["ids"].as_array().unwrap().contains(&json!(twin.0))));
    let exact = call(&app, get("/api/duplicates?max_distance=0.00001"))
        .await
        .json();
    let groups = exact["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{exact}");
    assert_eq!(groups[0]["ids"], json!([5, twin.0]));
    assert_eq!(groups[0]["members"][1]["label"], "c1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_queries_all_answer_like_the_library() {
    let dir = tempdir();
    let (db, app) = app(dir.path(), relaxed());
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let probe = class_png((i % 4) as u32, 1000 + i);
            let a = call(
                &app,
                multipart(
                    "/api/query",
                    &[("image", Some("q.png"), &probe), ("k", None, b"3")],
                ),
            )
            .await;
            (probe, a)
        }));
    }
    for t in tasks {
        let (probe, a) = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        let want: Vec<u64> = db
            .nearest(&probe, 3)
            .unwrap()
            .iter()
            .map(|h| h.id.0)
            .collect();
        assert_eq!(hit_ids(&a.json()), want);
    }
}

/// The events of a job's stream, read to its end: (name, data).
async fn events(app: &Router, job: u64) -> Vec<(String, Value)> {
    let a = call(app, get(&format!("/api/train/{job}/events"))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.content_type.starts_with("text/event-stream"));
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(d).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_jobs_stream_events_switch_models_and_cancel() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let sample = crate::training::sample();
    db.insert_images(sample.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
        .unwrap();
    let app = router(db.clone(), ServeOptions::default());

    // A long job: a second one is refused while it runs; cancelled, it changes nothing.
    let long = call(
        &app,
        post_json(
            "/api/train",
            &json!({"extractor": "simnet", "config": "cpu-gray", "epochs": 500}),
        ),
    )
    .await;
    assert_eq!(long.status, StatusCode::ACCEPTED);
    let long = long.json()["job"].as_u64().unwrap();
    let busy = call(
        &app,
        post_json("/api/train", &json!({"extractor": "simnet"})),
    )
    .await;
    assert_eq!(busy.error(StatusCode::CONFLICT), "job_running");
    let cancel = Request::delete(format!("/api/train/{long}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, cancel).await.status, StatusCode::ACCEPTED);
    let ev = events(&app, long).await;
    let (last, data) = ev.last().unwrap();
    assert_eq!(
        (last.as_str(), data["kind"].as_str()),
        ("failed", Some("cancelled"))
    );
    assert_eq!(db.models().unwrap().len(), 1);
    let status = call(&app, get(&format!("/api/train/{long}"))).await.json();
    assert_eq!(status["state"], "cancelled");

    // A one-epoch job to its switch: the curve starts before training, ends after the epoch.
    // `auto` chooses SimNet cpu-gray for the greyscale sample and says why.
    let job = call(
        &app,
        post_json(
            "/api/train",
            &json!({"extractor": "auto", "epochs": 1, "activate": "always"}),
        ),
    )
    .await
    .json()["job"]
        .as_u64()
        .unwrap();
    let ev = events(&app, job).await;
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"));
    assert!(
        names.contains(&"progress") && names.contains(&"phase"),
        "{names:?}"
    );
    let curve: Vec<u64> = ev
        .iter()
        .filter(|(n, _)| n == "evaluation")
        .map(|(_, d)| d["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(curve, vec![0, 1]);
    let (last, done) = ev.last().unwrap();
    assert_eq!(last, "done");
    assert_eq!(
        (done["version"].as_u64(), done["activated"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(
        (done["extractor"].as_str(), done["config"].as_str()),
        (Some("simnet"), Some("cpu-gray"))
    );
    assert!(
        done["chosen"]
            .as_str()
            .is_some_and(|w| w.contains("greyscale")),
        "{done}"
    );
    assert!(ev
        .iter()
        .filter(|(n, _)| n == "progress")
        .all(|(_, d)| d["eta_seconds"].as_f64().is_some_and(|s| s >= 0.0)));

    // Models: both listed, v2 active with its metrics; back to v1.
    let models = call(&app, get("/api/models")).await.json();
    assert_eq!(models["active"], 2);
    assert_eq!(models["models"].as_array().unwrap().len(), 2);
    assert!(models["models"][1]["metrics"]["after"]["accuracy_at_1"].is_f64());
    let back = Request::post("/api/models/1/use")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, back).await.json(), json!({"active": 1}));
    assert_eq!(db.active_model().version, 1);

    // Re-ranking with a pair scorer the server was given: hits carry P(same), highest first.
    let scorer = db
        .train_scorer(
            "mlp-diff",
            lookalike::ScorerTrainOptions {
                epochs: 2,
                pairs_per_epoch: 1024,
                pairs_per_case: 100,
                seed: 3,
                ..Default::default()
            },
        )
        .unwrap()
        .scorer;
    let ranked = router(
        db.clone(),
        ServeOptions {
            scorer: Some(scorer),
            ..ServeOptions::default()
        },
    );
    let a = call(
        &ranked,
        post_json("/api/query", &json!({"id": 10, "k": 5, "rerank": 30})),
    )
    .await
    .json();
    let scores: Vec<f64> = a["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 5);
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
}

/// One HTTP/1.1 request over a fresh connection: the raw answer.
fn http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_server_stops_on_sigterm_with_a_job_running_and_a_stream_open() {
    use std::io::{Read, Write};
    let dir = tempdir();
    let path = dir.path().join("db");
    {
        let db = Db::open_with(&path, relaxed()).unwrap();
        let sample = crate::training::sample();
        db.insert_images(sample.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))
            .unwrap();
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .arg("serve")
        .arg(&path)
        .args(["--addr", &addr])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            started.elapsed().as_secs() < 20,
            "the server did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let body = r#"{"extractor": "simnet", "config": "cpu-gray", "epochs": 500}"#;
    let answer = http(
        &addr,
        &format!(
            "POST /api/train HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    // A page following the job: its stream stays open until the shutdown ends it.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /api/train/1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(std::time::Duration::from_millis(500));

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed().as_secs() < 30,
            "the server did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("stopped; the database is closed"), "{err}");
    // The stream was ended, the job cancelled: the database is as it was, and opens.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let db = Db::open(&path).unwrap();
    assert_eq!(db.len(), 300);
    assert_eq!(db.models().unwrap().len(), 1);
    assert_eq!(db.active_model().extractor, "classic");
}

#[test]
fn serving_beyond_loopback_needs_a_flag() {
    let dir = tempdir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .arg("serve")
        .arg(dir.path().join("db"))
        .args(["--addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow-remote") && err.contains("no authentication"),
        "{err}"
    );
}
