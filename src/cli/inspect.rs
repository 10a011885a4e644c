//! Commands that read a database: `stats`, `export`, `duplicates`, `models`.

use std::process::ExitCode;

use lookalike::{Db, ImageId};

use super::out;

/// An f32 setting as the decimal it was written as (0.03, not 0.029999999329447746).
fn rounded(x: f32) -> f64 {
    (f64::from(x) * 1e6).round() / 1e6
}

/// "dim 2408", or "dim 256, compact vectors: PCA of v1's 2408" for a compacted model.
fn dims(m: &lookalike::ModelInfo) -> String {
    match m.compacted_from {
        Some(from) => format!(
            "dim {}, compact vectors: PCA of v{from}'s {}",
            m.dim, m.extractor_dim
        ),
        None => format!("dim {}", m.dim),
    }
}

pub(super) fn stats(db: &Db, json: bool) -> lookalike::Result<ExitCode> {
    let model = db.active_model();
    let index = db.index_info();
    let labels = db.labels();
    if json {
        let v = serde_json::json!({
            "images": db.len(),
            "labels": labels,
            "model": {"version": model.version, "extractor": model.extractor,
                      "config": model.config, "dim": model.dim,
                      "extractor_dim": model.extractor_dim, "compacted_from": model.compacted_from,
                      "metric": model.metric.as_str(),
                      "duplicate_distance": rounded(db.default_duplicate_distance())},
            "index": {"kind": index.kind, "vectors": index.len, "dim": index.dim},
            "extractors": db.extractors(),
        });
        out!("{v}");
    } else {
        out!("database   {}", db.path().display());
        out!("images     {}", db.len());
        out!(
            "model      v{} {} ({}, {}; duplicates within {})",
            model.version,
            model.extractor,
            dims(&model),
            model.metric.as_str(),
            db.default_duplicate_distance()
        );
        out!("index      {} with {} vectors", index.kind, index.len);
        out!("extractors {}", db.extractors().join(", "));
        out!("labels     {}", labels.len());
        for (l, n) in labels {
            out!("  {l:<20} {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per stored image, in id order.
pub(super) fn export(db: &Db, json: bool) -> lookalike::Result<ExitCode> {
    if !json {
        out!("id\thash\tlabel\tsource");
    }
    for id in db.ids() {
        let info = match db.info(id) {
            Ok(info) => info,
            // Removed by another process since the list was taken: not there any more.
            Err(lookalike::Error::UnknownImage(_)) => continue,
            Err(e) => return Err(e),
        };
        if json {
            out!(
                "{}",
                serde_json::json!({
                    "id": id.0, "source": info.meta.source, "label": info.meta.label,
                    "metadata": info.meta.metadata, "hash": info.hash.to_string(),
                    "width": info.width, "height": info.height,
                })
            );
        } else {
            out!(
                "{id}\t{}\t{}\t{}",
                info.hash,
                info.meta.label.as_deref().unwrap_or("-"),
                info.meta.source.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One group of near-identical images per line.
pub(super) fn duplicates(
    db: &Db,
    max_distance: Option<f32>,
    json: bool,
) -> lookalike::Result<ExitCode> {
    let groups = db.duplicates(max_distance)?;
    let source = |id: ImageId| db.meta(id).ok().and_then(|m| m.source);
    for g in &groups {
        let sources: Vec<Option<String>> = g.ids.iter().map(|id| source(*id)).collect();
        if json {
            let ids: Vec<u64> = g.ids.iter().map(|i| i.0).collect();
            out!(
                "{}",
                serde_json::json!({"ids": ids, "sources": sources, "distances": g.distances})
            );
        } else {
            let members: Vec<String> = g
                .ids
                .iter()
                .zip(&sources)
                .zip(&g.distances)
                .map(|((id, s), d)| {
                    let s = s.as_deref().unwrap_or("-");
                    if *d == 0.0 {
                        format!("{id} {s}")
                    } else {
                        format!("{id} {s} ({d:.4})")
                    }
                })
                .collect();
            out!("{}", members.join("  |  "));
        }
    }
    if !json {
        eprintln!(
            "{} {} ({} images) within {}",
            groups.len(),
            if groups.len() == 1 { "group" } else { "groups" },
            groups.iter().map(|g| g.ids.len()).sum::<usize>(),
            max_distance.unwrap_or_else(|| db.default_duplicate_distance())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn models(db: &Db, json: bool) -> lookalike::Result<ExitCode> {
    let active = db.active_model().version;
    let pending = db.pending_job()?;
    for m in db.models()? {
        if json {
            out!(
                "{}",
                serde_json::json!({"version": m.version, "active": m.version == active,
                    "extractor": m.extractor, "config": m.config, "dim": m.dim,
                    "extractor_dim": m.extractor_dim, "compacted_from": m.compacted_from,
                    "metric": m.metric.as_str()})
            );
        } else {
            out!(
                "{} v{} {} {:?} ({}, {})",
                if m.version == active { "*" } else { " " },
                m.version,
                m.extractor,
                m.config,
                dims(&m),
                m.metric.as_str()
            );
        }
    }
    if let Some((e, c, n)) = pending {
        if json {
            eprintln!(
                "{}",
                serde_json::json!({"interrupted_job": {"extractor": e, "config": c, "epochs": n}})
            );
        } else {
            out!("interrupted job: {e} {c:?} after {n} epochs (resume with train --resume)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
