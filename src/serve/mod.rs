//! `lookalike serve`: a JSON API over HTTP and a page to look at similar images (feature
//! `serve`, on by default).
//!
//! One process holds the database (the same [`Db`] handle the library gives) and serves
//! [`router`]: the API under `/api/` and the page at `/`. Decoding, embedding, searching and
//! training run off the async runtime (`spawn_blocking` and a thread per training job), so
//! many requests are served at once. There is no authentication: [`serve`] binds to loopback
//! unless told otherwise. The reference is `docs/serve.md`.
//!
//! ```no_run
//! # fn main() -> lookalike::Result<()> {
//! use lookalike::serve::{router, serve, ServeOptions};
//!
//! let db = lookalike::Db::open("shop.db")?;
//! // Mount the API and the page in your own axum server under some path...
//! let app = axum::Router::new().nest("/images", router(db.clone(), ServeOptions::default()));
//! # let _ = app;
//! // ...or run them alone until Ctrl-C:
//! let runtime = tokio::runtime::Runtime::new()
//!     .map_err(|e| lookalike::Error::InvalidArgument(e.to_string()))?;
//! runtime.block_on(serve(db, ServeOptions::default(), ([127, 0, 0, 1], 7878).into()))?;
//! # Ok(()) }
//! ```

mod api;
mod errors;
mod jobs;
mod page;
mod thumbs;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use lookalike_plugin::PairScorer;

pub use errors::ApiError;

use crate::{Db, Error, Result};

/// How the HTTP API behaves beyond what the database's [`crate::Options`] say.
#[derive(Clone)]
pub struct ServeOptions {
    /// The pair scorer that answers `"rerank"` in queries; without one such queries get 400.
    pub scorer: Option<Arc<dyn PairScorer>>,
    /// Thumbnails kept in memory (each a JPEG of a few KB to a few tens of KB).
    pub thumb_cache: usize,
    /// Uploaded query images kept in memory so that their results can be shown again from the
    /// page's address (`?upload=HASH`) while the server runs.
    pub upload_cache: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            scorer: None,
            thumb_cache: 2048,
            upload_cache: 16,
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("scorer", &self.scorer.as_ref().map(|_| "PairScorer"))
            .field("thumb_cache", &self.thumb_cache)
            .field("upload_cache", &self.upload_cache)
            .finish()
    }
}

/// What every handler shares.
pub(crate) struct State {
    pub db: Db,
    pub options: ServeOptions,
    pub thumbs: thumbs::Cache,
    /// Uploaded query images by content hash (hex), most recent kept.
    pub uploads: Mutex<lru::LruCache<String, Arc<Vec<u8>>>>,
    pub jobs: jobs::Jobs,
}

pub(crate) type Shared = Arc<State>;

/// The HTTP API and the page over `db`, to mount in an axum server ([`serve`] runs one).
pub fn router(db: Db, options: ServeOptions) -> Router {
    app(db, options).0
}

/// The router and the state its handlers share.
fn app(db: Db, options: ServeOptions) -> (Router, Shared) {
    // An upload is the image plus its multipart framing and form fields.
    let max_body = usize::try_from(db.options().image_byte_limit())
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20);
    let cap =
        |n: usize| std::num::NonZeroUsize::new(n.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
    let state = Arc::new(State {
        thumbs: thumbs::Cache::new(cap(options.thumb_cache)),
        uploads: Mutex::new(lru::LruCache::new(cap(options.upload_cache))),
        jobs: jobs::Jobs::default(),
        db,
        options,
    });
    let api = Router::new()
        .route("/query", post(api::query))
        .route("/images", post(api::add))
        .route("/images/{id}", get(api::image).delete(api::remove))
        .route("/images/{id}/info", get(api::info))
        .route("/uploads/{hash}", get(api::upload))
        .route("/thumbs/{id}", get(thumbs::thumb))
        .route("/labels", get(api::labels))
        .route("/browse", get(api::browse))
        .route("/stats", get(api::stats))
        .route("/duplicates", get(api::duplicates))
        .route("/models", get(jobs::models))
        .route("/models/{version}/use", post(jobs::use_model))
        .route("/train", post(jobs::start))
        .route("/train/{job}", get(jobs::status))
        .route("/train/{job}/events", get(jobs::events))
        .route("/train/{job}", delete(jobs::cancel))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(max_body));
    let router = Router::new()
        .nest("/api", api)
        .merge(page::routes())
        .layer(tower_http::compression::CompressionLayer::new())
        .with_state(Arc::clone(&state));
    (router, state)
}

/// Serves the API and the page over `db` on `addr` until Ctrl-C or SIGTERM. Then it stops
/// accepting connections, ends the training event streams, asks running training jobs to stop
/// (a cancelled job changes nothing), answers the requests in flight, waits for the jobs and
/// returns, so that the last handle closes the database cleanly. Binding is the caller's
/// choice: the API has no authentication (see `docs/serve.md`).
pub async fn serve(db: Db, options: ServeOptions, addr: SocketAddr) -> Result<()> {
    let (router, state) = app(db, options);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("{addr}"), e))?;
    let s = Arc::clone(&state);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown().await;
            s.jobs.shut_down();
        })
        .await
        .map_err(|e| Error::io(format!("{addr}"), e))?;
    tokio::task::spawn_blocking(move || state.jobs.join())
        .await
        .map_err(|e| Error::InvalidArgument(format!("a training job failed to stop: {e}")))
}

/// Resolves at Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
