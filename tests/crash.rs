//! Crash harness: re-runs itself as a child that inserts and removes images under the default
//! (immediate) durability, kills it with SIGKILL at a random moment, reopens, and checks that
//! every acknowledged insert is there, every acknowledged removal is gone, and the index holds
//! exactly the ids the store holds. `harness = false`: run with `cargo test --test crash`.

#![allow(clippy::unwrap_used)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use image::{ImageFormat, RgbImage};
use lookalike::{Db, ImageId};
use rand::{rngs::StdRng, Rng, SeedableRng};

const CHILD_ENV: &str = "LOOKALIKE_CRASH_CHILD";
const ROUNDS: u64 = 8;

fn png(seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = RgbImage::from_fn(24, 24, |_, _| {
        image::Rgb([rng.random(), rng.random(), rng.random()])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).expect("encode");
    out.into_inner()
}

/// The child: insert (single and batch) and remove forever, logging each acknowledged change.
fn child(dir: &Path) -> ExitCode {
    let db = Db::open(dir.join("db")).expect("child open");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acks"))
        .expect("log");
    let mut rng = StdRng::seed_from_u64(std::process::id().into());
    let mut mine: Vec<ImageId> = Vec::new();
    loop {
        let r: u32 = rng.random_range(0..10);
        if r < 5 {
            let id = db
                .insert_image(&png(rng.random()), Some("x"))
                .expect("insert");
            writeln!(log, "i {id}").expect("log");
            mine.push(id);
        } else if r < 8 {
            let batch: Vec<Vec<u8>> = (0..8).map(|_| png(rng.random())).collect();
            let ids = db
                .insert_images(batch.iter().map(|b| (b.as_slice(), None)))
                .expect("batch");
            for id in ids {
                writeln!(log, "i {id}").expect("log");
                mine.push(id);
            }
        } else if !mine.is_empty() {
            let id = mine.swap_remove(rng.random_range(0..mine.len()));
            // Log the intent first: a removal that completes but is killed before its
            // acknowledgement is logged may legitimately be either applied or not.
            writeln!(log, "r? {id}").expect("log");
            db.remove(id).expect("remove");
            writeln!(log, "r {id}").expect("log");
        }
    }
}

fn check(dir: &Path) -> Result<usize, String> {
    let db = Db::open(dir.join("db")).map_err(|e| format!("reopen: {e}"))?;
    let log = std::fs::read_to_string(dir.join("acks")).unwrap_or_default();
    let mut inserted = std::collections::BTreeSet::new();
    let mut removed = std::collections::BTreeSet::new();
    let mut maybe_removed = std::collections::BTreeSet::new();
    for line in log.lines() {
        // The last line may be cut short by the kill.
        let Some((op, id)) = line.split_once(' ') else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        if op == "i" {
            inserted.insert(id);
        } else if op == "r" {
            removed.insert(id);
        } else if op == "r?" {
            maybe_removed.insert(id);
        }
    }
    for id in &inserted {
        let present = db.image(ImageId(*id)).is_ok();
        if removed.contains(id) && present {
            return Err(format!("acknowledged removal of {id} was lost"));
        }
        if !removed.contains(id) && !maybe_removed.contains(id) && !present {
            return Err(format!("acknowledged insert of {id} was lost"));
        }
    }
    let store: Vec<u64> = db.ids().into_iter().map(|i| i.0).collect();
    let info = db.index_info();
    if info.len != store.len() {
        return Err(format!(
            "index holds {} vectors, store {} images",
            info.len,
            store.len()
        ));
    }
    if !store.is_empty() {
        let mut hits: Vec<u64> = db
            .nearest(&png(1), store.len())
            .map_err(|e| format!("query: {e}"))?
            .into_iter()
            .map(|h| h.id.0)
            .collect();
        hits.sort();
        if hits != store {
            return Err("index ids differ from store ids".into());
        }
    }
    Ok(store.len())
}

fn main() -> ExitCode {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(&PathBuf::from(dir));
    }
    if std::env::args().any(|a| a == "--list") {
        println!("crash_recovery: test");
        return ExitCode::SUCCESS;
    }
    // LOOKALIKE_CRASH_KEEP=DIR keeps the database and the log there for a post-mortem.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = match std::env::var("LOOKALIKE_CRASH_KEEP") {
        Ok(keep) => tempfile::TempDir::new_in(keep).expect("dir").keep(),
        Err(_) => tmp.path().to_path_buf(),
    };
    println!("working in {}", dir.display());
    let exe = std::env::current_exe().expect("own path");
    let mut rng = StdRng::seed_from_u64(7);
    let (mut passed, mut failed) = (0, 0);
    for round in 0..ROUNDS {
        let mut c = Command::new(&exe)
            .env(CHILD_ENV, &dir)
            .spawn()
            .expect("spawn child");
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        c.kill().expect("SIGKILL the child");
        let _ = c.wait();
        match check(&dir) {
            Ok(n) => {
                passed += 1;
                println!("round {round}: ok, {n} images after recovery");
            }
            Err(e) => {
                failed += 1;
                println!("round {round}: FAILED: {e}");
            }
        }
    }
    println!("crash recovery: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
