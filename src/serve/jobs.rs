//! Models and training jobs: list and switch models, start a job, follow it as Server-Sent
//! Events, cancel it.
//!
//! A job runs [`Db::train_extractor_with`] on a thread of its own; its progress becomes
//! events kept with the job (so a page that connects late, or reconnects, sees the whole
//! curve) and pushed to every open event stream. One job at a time (409 otherwise).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::{blocking, ApiError};
use super::Shared;
use crate::{
    Activate, CancelToken, Db, Error, Metrics, Phase, Progress, TrainOptions, TrainReport,
};

/// Training progress is sent at most this often (epoch ends and phase changes always).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The training jobs this server started, and the held-out metrics of the models they made.
pub(crate) struct Jobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    /// Model version -> {"before", "after"} metrics of the job that made it.
    metrics: Mutex<HashMap<u32, Value>>,
    /// The jobs' threads, joined at shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set when the server shuts down: event streams end, so that the shutdown does not wait
    /// for a long job's stream.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            next: AtomicU64::new(0),
            jobs: Mutex::default(),
            metrics: Mutex::default(),
            threads: Mutex::default(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Jobs {
    /// Ends every event stream and asks every running job to stop at its next step (a job
    /// cancelled changes nothing; its checkpoint of finished epochs stays for a resume).
    pub(crate) fn shut_down(&self) {
        self.closing.send_replace(true);
        if let Ok(jobs) = self.jobs.lock() {
            for job in jobs.values() {
                job.cancel.cancel();
            }
        }
    }

    /// Waits for the jobs' threads to end.
    pub(crate) fn join(&self) {
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One training job.
pub(crate) struct Job {
    id: u64,
    extractor: String,
    cancel: CancelToken,
    log: Mutex<Log>,
    /// Counts events; event streams wait on it.
    tick: tokio::sync::watch::Sender<usize>,
}

/// A job's events and how it ended, under one lock (a stream never sees the end before the
/// last event).
#[derive(Default)]
struct Log {
    /// Every event so far: (SSE event name, data).
    events: Vec<(&'static str, Value)>,
    /// `Some` once the job ended: `"done"`, `"failed"` or `"cancelled"`.
    ended: Option<&'static str>,
}

impl Job {
    fn push(&self, name: &'static str, data: Value) {
        self.log_event(name, data, None);
    }

    fn end(&self, state: &'static str, name: &'static str, data: Value) {
        self.log_event(name, data, Some(state));
    }

    fn log_event(&self, name: &'static str, data: Value, ended: Option<&'static str>) {
        let n = match self.log.lock() {
            Ok(mut log) => {
                log.events.push((name, data));
                if ended.is_some() {
                    log.ended = ended;
                }
                log.events.len()
            }
            Err(_) => return,
        };
        self.tick.send_replace(n);
    }

    fn state(&self) -> &'static str {
        self.log
            .lock()
            .ok()
            .and_then(|l| l.ended)
            .unwrap_or("running")
    }
}

fn metrics_json(m: &Metrics) -> Value {
    json!({"accuracy_at_1": m.accuracy_at_1, "map_at_10": m.map_at_10, "queries": m.queries})
}

/// `GET /api/models`: every stored version, the active one, the metrics of those this server
/// trained, and an interrupted job if one is stored.
pub(super) async fn models(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let db = s.db.clone();
    let (models, pending) = blocking(move || Ok((db.models()?, db.pending_job()?))).await?;
    let active = s.db.active_model().version;
    let metrics = s.jobs.metrics.lock().map(|m| m.clone()).unwrap_or_default();
    let models: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({"version": m.version, "active": m.version == active,
                   "extractor": m.extractor, "config": m.config, "dim": m.dim,
                   "extractor_dim": m.extractor_dim, "compacted_from": m.compacted_from,
                   "metric": m.metric.as_str(), "metrics": metrics.get(&m.version)})
        })
        .collect();
    let pending = pending.map(|(e, c, n)| json!({"extractor": e, "config": c, "epochs": n}));
    Ok(Json(
        json!({"active": active, "models": models, "interrupted_job": pending}),
    ))
}

/// `POST /api/models/{version}/use`: makes a stored version active (embeds what it lacks
/// first; queries keep running on the old model meanwhile).
pub(super) async fn use_model(
    State(s): State<Shared>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let version: u32 = version.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{version:?} is not a model version (a whole number)"
        ))
    })?;
    let db = s.db.clone();
    blocking(move || db.use_model(version)).await?;
    Ok(Json(json!({"active": version})))
}

/// The body of `POST /api/train`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrainRequest {
    /// The trainable extractor (`simnet`, `fused`), or `auto` (the job chooses).
    extractor: String,
    config: Option<String>,
    epochs: Option<usize>,
    /// Stop after this many minutes of training.
    minutes: Option<f64>,
    seed: Option<u64>,
    /// `"if_better"` (the default), `"always"` or `"never"` (store only).
    activate: Option<String>,
}

/// `POST /api/train`: starts a job; answers its id (202). 409 while another runs.
pub(super) async fn start(
    State(s): State<Shared>,
    body: Result<Json<TrainRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(r) = body?;
    let mut opts = TrainOptions::default();
    if let Some(c) = &r.config {
        opts = opts.config(c.clone());
    }
    if let Some(e) = r.epochs {
        if e == 0 || e > 10_000 {
            return Err(ApiError::bad_request("epochs must be between 1 and 10000"));
        }
        opts = opts.epochs(e);
    }
    if let Some(m) = r.minutes {
        if !(m.is_finite() && m > 0.0) {
            return Err(ApiError::bad_request("minutes must be a positive number"));
        }
        opts = opts.max_minutes(m);
    }
    if let Some(seed) = r.seed {
        opts = opts.seed(seed);
    }
    match r.activate.as_deref() {
        None => {}
        Some("always") => opts = opts.activate(Activate::Always),
        Some("if_better") => opts = opts.activate(Activate::IfBetter),
        Some("never") => opts = opts.activate(Activate::Never),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "activate is \"always\", \"if_better\" or \"never\", not {other:?}"
            )))
        }
    }
    if r.extractor != "auto" && !s.db.extractors().contains(&r.extractor) {
        return Err(Error::UnknownExtractor {
            name: r.extractor.clone(),
            known: s.db.extractors(),
        }
        .into());
    }
    let job = {
        let mut jobs = s
            .jobs
            .jobs
            .lock()
            .map_err(|_| ApiError::bad_request("the job table is unavailable"))?;
        if jobs.values().any(|j| j.state() == "running") {
            return Err(Error::JobRunning.into());
        }
        let id = s.jobs.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            extractor: r.extractor.clone(),
            cancel: CancelToken::new(),
            log: Mutex::new(Log::default()),
            tick: tokio::sync::watch::channel(0).0,
        });
        jobs.insert(id, Arc::clone(&job));
        job
    };
    let opts = opts.cancel_token(job.cancel.clone());
    let (db, state, j) = (s.db.clone(), Arc::clone(&s), Arc::clone(&job));
    let thread = std::thread::Builder::new()
        .name(format!("train-{}", job.id))
        .spawn(move || run(&db, &state, &j, opts))
        .map_err(|e| Error::io("training thread", e))?;
    if let Ok(mut threads) = s.jobs.threads.lock() {
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job": job.id, "events": format!("/api/train/{}/events", job.id)})),
    ))
}

/// Runs a job to its end, turning progress into events.
fn run(db: &Db, state: &Shared, job: &Arc<Job>, opts: TrainOptions) {
    let j = Arc::clone(job);
    let max_seconds = opts.max_minutes.map(|m| m * 60.0);
    let last = Mutex::new(Instant::now() - PROGRESS_EVERY);
    let opts = opts.on_progress(move |p| {
        let Ok(mut last) = last.lock() else { return };
        match (p.phase, &p.validation) {
            (Phase::Baseline, Some(m)) | (Phase::Evaluating, Some(m)) => {
                // Epoch 0: the active model before training.
                let epoch = if p.phase == Phase::Baseline { 0 } else { p.epoch + 1 };
                let mut v = metrics_json(m);
                v["epoch"] = json!(epoch);
                v["elapsed_seconds"] = json!(p.elapsed_seconds);
                j.push("evaluation", v);
            }
            (Phase::Baseline, None) => j.push(
                "phase",
                json!({"phase": "baseline", "elapsed_seconds": p.elapsed_seconds}),
            ),
            (Phase::Evaluating, None) => j.push(
                "phase",
                json!({"phase": "evaluating", "epoch": p.epoch, "elapsed_seconds": p.elapsed_seconds}),
            ),
            (Phase::Training, _) => {
                let epoch_end = p.step + 1 == p.steps;
                if !epoch_end && last.elapsed() < PROGRESS_EVERY {
                    return;
                }
                *last = Instant::now();
                j.push("progress", training_json(p, max_seconds));
            }
            (Phase::Embedding | Phase::Features, _) => {
                let (done, total) = p.embedded;
                if done != total && last.elapsed() < PROGRESS_EVERY {
                    return;
                }
                *last = Instant::now();
                let phase = if p.phase == Phase::Features {
                    "features"
                } else {
                    "embedding"
                };
                j.push(
                    "phase",
                    json!({"phase": phase, "embedded": done, "total": total,
                           "elapsed_seconds": p.elapsed_seconds}),
                );
            }
        }
    });
    job.push(
        "start",
        json!({"job": job.id, "extractor": job.extractor, "epochs": opts.epochs,
               "max_minutes": opts.max_minutes}),
    );
    match db.train_extractor_with(&job.extractor, opts) {
        Ok(r) => {
            if let Ok(mut m) = state.jobs.metrics.lock() {
                m.insert(
                    r.version,
                    json!({"before": metrics_json(&r.before), "after": metrics_json(&r.after)}),
                );
            }
            job.end("done", "done", report_json(&r));
        }
        Err(Error::Cancelled) => job.end(
            "cancelled",
            "failed",
            json!({"error": Error::Cancelled.message(), "kind": "cancelled"}),
        ),
        Err(e) => job.end(
            "failed",
            "failed",
            json!({"error": e.message(), "kind": e.kind()}),
        ),
    }
}

/// A training progress event, with an estimate of the time left.
fn training_json(p: &Progress, max_seconds: Option<f64>) -> Value {
    let total = (p.epochs * p.steps).max(1) as f64;
    let done = (p.epoch * p.steps + p.step + 1) as f64;
    let elapsed = p.elapsed_seconds;
    let mut eta = elapsed * (total - done) / done;
    if let Some(max) = max_seconds {
        eta = eta.min((max - elapsed).max(0.0));
    }
    json!({"epoch": p.epoch + 1, "epochs": p.epochs, "step": p.step + 1, "steps": p.steps,
           "loss": p.loss, "images_per_second": p.images_per_second,
           "pairs_per_second": p.pairs_per_second, "eta_seconds": eta,
           "elapsed_seconds": elapsed})
}

fn report_json(r: &TrainReport) -> Value {
    json!({"version": r.version, "activated": r.activated, "decision": r.decision,
           "holdout": r.holdout.as_str(),
           "extractor": r.extractor,
           "config": r.config, "miner": r.miner, "before": metrics_json(&r.before),
           "after": metrics_json(&r.after), "epochs": r.epochs, "steps": r.steps,
           "train_seconds": r.train_seconds, "total_seconds": r.total_seconds,
           "chosen": r.chosen, "embed_seconds": r.embed_seconds,
           "embedded_from_features": r.embedded_from_features,
           "stored_features": r.stored_features})
}

fn job(s: &Shared, id: &str) -> Result<Arc<Job>, ApiError> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| s.jobs.jobs.lock().ok()?.get(&id).cloned())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_job",
                format!("no training job {id} on this server"),
            )
        })
}

/// `GET /api/train/{job}`: the job's state and its events so far.
pub(super) async fn status(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = job(&s, &id)?;
    let events: Vec<Value> = job
        .log
        .lock()
        .map(|l| {
            l.events
                .iter()
                .map(|(n, d)| json!({"event": n, "data": d}))
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(
        json!({"job": job.id, "extractor": job.extractor, "state": job.state(), "events": events}),
    ))
}

/// `DELETE /api/train/{job}`: asks the job to stop; the database stays as it was. Its event
/// stream ends with a `failed` event of kind `cancelled`.
pub(super) async fn cancel(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let job = job(&s, &id)?;
    job.cancel.cancel();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job": job.id, "state": job.state()})),
    ))
}

/// `GET /api/train/{job}/events`: every event from the start, then new ones as they come;
/// the stream ends after `done` or `failed`.
pub(super) async fn events(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = job(&s, &id)?;
    let start = (job.tick.subscribe(), s.jobs.closing.subscribe(), 0usize);
    let stream = futures_util::stream::unfold(start, move |(mut rx, mut closing, next)| {
        let job = Arc::clone(&job);
        async move {
            loop {
                let (item, ended) = match job.log.lock() {
                    Ok(l) => (l.events.get(next).cloned(), l.ended.is_some()),
                    Err(_) => return None,
                };
                if let Some((name, data)) = item {
                    let event = Event::default().event(name).data(data.to_string());
                    return Some((Ok(event), (rx, closing, next + 1)));
                }
                if ended || *closing.borrow() {
                    return None;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return None },
                    _ = closing.changed() => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
