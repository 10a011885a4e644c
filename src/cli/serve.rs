//! `lookalike serve`: the HTTP API and the page over one database (see `docs/serve.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use lookalike::serve::ServeOptions;

use super::existing;

/// Arguments of `lookalike serve`.
#[derive(Debug, clap::Args)]
pub(super) struct ServeArgs {
    /// The database directory.
    db: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: SocketAddr,
    /// Allow an address other than loopback. There is no authentication: anyone who can
    /// reach the address can read, add, remove and train.
    #[arg(long)]
    allow_remote: bool,
    /// Train an mlp-diff pair scorer on the labelled images at start, for queries that ask
    /// to re-rank (`"rerank": N`).
    #[arg(long)]
    train_scorer: bool,
}

pub(super) fn run(a: ServeArgs) -> lookalike::Result<ExitCode> {
    if !a.addr.ip().is_loopback() && !a.allow_remote {
        return Err(lookalike::Error::InvalidArgument(format!(
            "{} is not a loopback address; the API has no authentication, so serving beyond \
             this machine needs --allow-remote",
            a.addr
        )));
    }
    let db = existing(&a.db)?;
    let mut options = ServeOptions::default();
    if a.train_scorer {
        eprintln!("training the mlp-diff pair scorer for re-ranking...");
        let r = db.train_scorer("mlp-diff", lookalike::ScorerTrainOptions::default())?;
        eprintln!(
            "scorer ready: held-out pair accuracy {:.1} %, ROC AUC {:.3}",
            r.accuracy * 100.0,
            r.roc_auc
        );
        options.scorer = Some(r.scorer);
    }
    if !a.addr.ip().is_loopback() {
        eprintln!(
            "warning: serving on {} without authentication: anyone who can reach it can read, \
             add, remove and train",
            a.addr
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| lookalike::Error::Io {
            path: "tokio runtime".into(),
            source,
        })?;
    eprintln!(
        "serving {} on http://{} (Ctrl-C to stop)",
        a.db.display(),
        a.addr
    );
    runtime.block_on(lookalike::serve::serve(db, options, a.addr))?;
    eprintln!("stopped; the database is closed");
    Ok(ExitCode::SUCCESS)
}
