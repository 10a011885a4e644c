//! `lookalike query`: any number of query images (files, folders, stored ids) in one process.

use std::path::PathBuf;
use std::process::ExitCode;

use lookalike::{Db, Hit, ImageId, Query};

use super::add::{collect, read_bounded};
use super::{existing, hit_json, out, source_of};

/// Query images read and embedded at once (bounded by bytes as well).
const QUERY_BATCH: usize = 64;
const QUERY_BATCH_BYTES: usize = 64 << 20;

/// Arguments of `lookalike query`.
#[derive(Debug, clap::Args)]
pub(super) struct QueryArgs {
    /// The database directory.
    db: PathBuf,
    /// Query image files, or folders of them (searched recursively).
    #[arg(required_unless_present = "id")]
    images: Vec<PathBuf>,
    /// Query by a stored image instead (repeat for several); it is left out of its results.
    #[arg(long)]
    id: Vec<ImageId>,
    /// How many results per query.
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Only images with this label (repeat for several).
    #[arg(long)]
    label: Vec<String>,
    /// Only images whose metadata has KEY equal to VALUE (repeat: all must hold). VALUE is read
    /// as JSON when it is a number, true or false (or quoted), else as a string.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
}

/// `KEY=VALUE` as a metadata filter.
fn meta_filter(arg: &str) -> lookalike::Result<(String, serde_json::Value)> {
    let (k, v) = arg.split_once('=').ok_or_else(|| {
        lookalike::Error::InvalidArgument(format!("--meta takes KEY=VALUE, not {arg:?}"))
    })?;
    let value = match serde_json::from_str::<serde_json::Value>(v) {
        Ok(
            j @ (serde_json::Value::Number(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::String(_)),
        ) => j,
        _ => serde_json::Value::String(v.to_string()),
    };
    Ok((k.to_string(), value))
}

pub(super) fn run(a: QueryArgs, json: bool) -> lookalike::Result<ExitCode> {
    let mut query = Query::k(a.k);
    if !a.label.is_empty() {
        query = query.labels(a.label.clone());
    }
    for m in &a.meta {
        let (k, v) = meta_filter(m)?;
        query = query.metadata(k, v);
    }
    let mut files = inputs(&a.images)?;
    let db = existing(&a.db)?;
    let mut failed = 0usize;
    for id in &a.id {
        let name = format!("id {id}");
        failed += usize::from(!print(&name, db.nearest_to_with(*id, &query), json));
    }
    let limit = lookalike::Options::default().image_byte_limit();
    let mut start = 0;
    while start < files.len() {
        // Read a batch of at most QUERY_BATCH files and QUERY_BATCH_BYTES bytes.
        let mut batch: Vec<(PathBuf, lookalike::Result<Vec<u8>>)> = Vec::new();
        let mut bytes = 0;
        while start < files.len() && batch.len() < QUERY_BATCH && bytes < QUERY_BATCH_BYTES {
            let (f, unusable) = &mut files[start];
            let mut buf = Vec::new();
            let read = match unusable.take() {
                Some(e) => Err(e),
                None => read_bounded(f, limit, &mut buf).map(|()| buf),
            };
            bytes += read.as_ref().map(Vec::len).unwrap_or(0);
            batch.push((f.clone(), read));
            start += 1;
        }
        failed += answer(&db, &query, batch, json)?;
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Query files in the order given, folders walked as `add` walks them. A named path that is
/// missing or not a regular file is kept with why, to be that query's error: one bad name does
/// not stop the other queries.
fn inputs(paths: &[PathBuf]) -> lookalike::Result<Vec<(PathBuf, Option<lookalike::Error>)>> {
    let mut out = Vec::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                let (files, _) = collect(std::slice::from_ref(p))?;
                out.extend(files.into_iter().map(|f| (f, None)));
            }
            Ok(m) if m.is_file() => out.push((p.clone(), None)),
            Ok(_) => out.push((
                p.clone(),
                Some(lookalike::Error::InvalidArgument(format!(
                    "{} is not a regular file or a folder",
                    p.display()
                ))),
            )),
            Err(e) => out.push((
                p.clone(),
                Some(lookalike::Error::Io {
                    path: p.clone(),
                    source: e,
                }),
            )),
        }
    }
    Ok(out)
}

/// Answers one batch of query files (decoded and embedded on every core); returns how many
/// failed.
fn answer(
    db: &Db,
    query: &Query,
    batch: Vec<(PathBuf, lookalike::Result<Vec<u8>>)>,
    json: bool,
) -> lookalike::Result<usize> {
    let readable: Vec<&[u8]> = batch
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(Vec::as_slice))
        .collect();
    let mut answers = db.nearest_batch(&readable, query)?.into_iter();
    let mut failed = 0;
    for (path, read) in batch {
        let result = match read {
            Err(e) => Err(e),
            Ok(_) => answers.next().unwrap_or_else(|| {
                Err(lookalike::Error::InvalidArgument(
                    "a query was not answered".into(),
                ))
            }),
        };
        failed += usize::from(!print(&source_of(&path), result, json));
    }
    Ok(failed)
}

/// Prints the answer to one query: a JSON line, or a heading and a table; errors on stderr
/// (text) or in the line (JSON). Returns whether it had hits.
fn print(name: &str, result: lookalike::Result<Vec<Hit>>, json: bool) -> bool {
    match (result, json) {
        (Ok(hits), true) => {
            let hits: Vec<_> = hits.iter().map(hit_json).collect();
            out!("{}", serde_json::json!({"query": name, "hits": hits}));
            true
        }
        (Ok(hits), false) => {
            out!("query {name}");
            out!(
                "{:>4}  {:>10}  {:>10}  {:<16}  source",
                "rank",
                "id",
                "distance",
                "label"
            );
            for (i, h) in hits.iter().enumerate() {
                out!(
                    "{:>4}  {:>10}  {:>10.5}  {:<16}  {}",
                    i + 1,
                    h.id,
                    h.distance,
                    h.label.as_deref().unwrap_or("-"),
                    h.source.as_deref().unwrap_or("-")
                );
            }
            out!("");
            true
        }
        (Err(e), true) => {
            out!(
                "{}",
                serde_json::json!({"query": name, "error": e.to_string(), "kind": e.kind()})
            );
            false
        }
        (Err(e), false) => {
            eprintln!("query {name}: {e}");
            false
        }
    }
}
