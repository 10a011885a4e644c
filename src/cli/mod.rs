//! Command-line interface over the public API (binary only). Every command prints tables for
//! people or, with `--json`, JSON for programs (errors too, on stderr); see `docs/cli.md`.

mod add;
mod inspect;
mod query;
#[cfg(feature = "serve")]
mod serve;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lookalike::{Db, ImageId};

/// An embeddable image-similarity database.
#[derive(Debug, Parser)]
#[command(name = "lookalike", version, about)]
struct Cli {
    /// Print JSON for programs instead of text (errors too, as {"error", "kind"} on stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add image files, or whole folders (searched recursively); byte-identical copies of
    /// stored images are skipped.
    Add(add::AddArgs),
    /// Find the stored images most similar to image files (any number, one process) or to
    /// stored images.
    Query(query::QueryArgs),
    /// Groups of near-identical stored images, one group per line.
    Duplicates {
        /// The database directory.
        db: PathBuf,
        /// Largest distance between two images of a group (default: the active model's
        /// default, see `stats`).
        #[arg(long)]
        max_distance: Option<f32>,
    },
    /// Print counts, labels, the active model and the index.
    Stats {
        /// The database directory.
        db: PathBuf,
    },
    /// Print every stored image: id, content hash, label, source (and metadata with --json).
    Export {
        /// The database directory.
        db: PathBuf,
    },
    /// Train an extractor from the labelled images in the database and switch to it.
    Train(train::TrainArgs),
    /// List the stored model versions.
    Models {
        /// The database directory.
        db: PathBuf,
    },
    /// Make a stored model version the active one.
    Use {
        /// The database directory.
        db: PathBuf,
        /// The model version.
        version: u32,
    },
    /// Serve the HTTP API and the page (http://127.0.0.1:7878 by default).
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
    /// Remove images by id.
    Remove {
        /// The database directory.
        db: PathBuf,
        /// Ids to remove.
        #[arg(required = true)]
        ids: Vec<ImageId>,
    },
}

/// `println!` that ends the program quietly when stdout is closed (`lookalike stats | head`)
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
pub(crate) use out;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            report(&e, json);
            ExitCode::from(2)
        }
    }
}

/// Prints an error on stderr: one line for people, a JSON object for programs.
fn report(e: &lookalike::Error, json: bool) {
    if json {
        eprintln!(
            "{}",
            serde_json::json!({"error": e.message(), "kind": e.kind()})
        );
        return;
    }
    eprintln!("error: {}", e.message());
}

/// Opens a database that must exist.
fn existing(db: &Path) -> lookalike::Result<Db> {
    if !db.join("store").exists() {
        return Err(lookalike::Error::InvalidArgument(format!(
            "{} is not a lookalike database (create one with `lookalike add`)",
            db.display()
        )));
    }
    Db::open(db)
}

/// Runs a command; the exit code says what happened (0: done; 1: some files were skipped).
fn run(cli: Cli) -> lookalike::Result<ExitCode> {
    let json = cli.json;
    match cli.command {
        Command::Add(args) => add::run(args, json),
        Command::Query(args) => query::run(args, json),
        Command::Duplicates { db, max_distance } => {
            inspect::duplicates(&existing(&db)?, max_distance, json)
        }
        Command::Stats { db } => inspect::stats(&existing(&db)?, json),
        Command::Export { db } => inspect::export(&existing(&db)?, json),
        Command::Train(args) => train::run(args, json),
        #[cfg(feature = "serve")]
        Command::Serve(args) => serve::run(args),
        Command::Models { db } => inspect::models(&existing(&db)?, json),
        Command::Use { db, version } => {
            existing(&db)?.use_model(version)?;
            if json {
                out!("{}", serde_json::json!({"active_model": version}));
            } else {
                out!("model v{version} is active");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove { db, ids } => {
            let db = existing(&db)?;
            // All or nothing: every id is checked before any image is removed.
            let known: std::collections::HashSet<ImageId> = db.ids().into_iter().collect();
            let unknown: Vec<String> = ids
                .iter()
                .filter(|id| !known.contains(id))
                .map(ToString::to_string)
                .collect();
            if !unknown.is_empty() {
                return Err(lookalike::Error::InvalidArgument(format!(
                    "no image with id {}; nothing was removed",
                    unknown.join(", ")
                )));
            }
            for id in ids {
                db.remove(id)?;
                if json {
                    out!("{}", serde_json::json!({"removed": id.0}));
                } else {
                    out!("removed {id}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A file's path as its source: as given on the command line (joined with the folders
/// walked), lossily as UTF-8.
fn source_of(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A hit as JSON.
fn hit_json(h: &lookalike::Hit) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": h.id.0,
        "distance": h.distance,
        "label": h.label,
        "source": h.source,
        "metadata": h.metadata,
    });
    if let Some(s) = h.score {
        v["score"] = serde_json::json!(s);
    }
    v
}
