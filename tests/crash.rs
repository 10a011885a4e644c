//! Crash harness: re-runs itself as a child that inserts and removes images under the default
//! (immediate) durability, kills it with SIGKILL at a random moment, reopens, and checks that
//! every acknowledged insert is there, every acknowledged removal is gone, and the index holds
//! exactly the ids the store holds. Then a training job is killed the same way after its first
//! epoch checkpoint, resumed, and compared with an uninterrupted job of the same seed (same
//! embeddings, bit for bit). `harness = false`: run with `cargo test --test crash`.

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
const TRAIN_CHILD_ENV: &str = "LOOKALIKE_CRASH_TRAIN_CHILD";
/// Kill rounds of a normal run; `LOOKALIKE_CRASH_ROUNDS=N` runs N (by hand: 1,000, see
/// docs/reliability.md). Every `FRESH_EVERY` rounds start on a new database, so that a long run
/// does not spend its time reopening a huge one.
const ROUNDS: u64 = 8;
const FRESH_EVERY: u64 = 25;

/// A random-pixel PNG: 24 x 24 (about 1.8 KB, stored inline in sled); for every seed that is
/// a multiple of 4, 96 x 96 (about 28 KB, stored in a pack file through the page cache); for
/// every multiple of 16, 320 x 320 (about 300 KB, written to its pack file directly where the
/// file system takes direct writes).
fn png(seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let side = if seed.is_multiple_of(16) {
        320
    } else if seed.is_multiple_of(4) {
        96
    } else {
        24
    };
    let img = RgbImage::from_fn(side, side, |_, _| {
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
        let r: u32 = rng.random_range(0..12);
        if r == 10 && !mine.is_empty() {
            // A label change goes through the change log that catalogue.bin is caught up from.
            let id = mine[rng.random_range(0..mine.len())];
            let label = ["a", "b", "c"][rng.random_range(0..3)];
            db.set_label(id, Some(label)).expect("set label");
        } else if r == 11 {
            // Writes catalogue.bin and the index snapshot, and trims the change log.
            db.flush().expect("flush");
        } else if r < 5 {
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
        } else if r < 10 && !mine.is_empty() {
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
    // The catalogue (ids and labels in memory, from catalogue.bin and the change log) agrees
    // with the entries in the store.
    let listed: std::collections::BTreeSet<u64> = store.iter().copied().collect();
    for id in &inserted {
        if db.image(ImageId(*id)).is_ok() != listed.contains(id) {
            return Err(format!("image {id}: the store and the catalogue disagree"));
        }
    }
    for id in &store {
        let label = db
            .label(ImageId(*id))
            .map_err(|e| format!("label {id}: {e}"))?;
        let entry = db
            .meta(ImageId(*id))
            .map_err(|e| format!("entry {id}: {e}"))?;
        if label != entry.label {
            return Err(format!(
                "image {id}: catalogue label {label:?}, stored {:?}",
                entry.label
            ));
        }
    }
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

/// The training job of the kill test: SimNet `cpu`, small batches, seeded.
fn train_options() -> lookalike::TrainOptions {
    lookalike::TrainOptions::default()
        .epochs(3)
        .batch(32, 6, 8)
        .steps_per_epoch(3)
        .eval_sizes(60, 240)
        .seed(11)
}

/// A database holding the bundled Fashion-MNIST sample with folder labels.
fn fill_sample(path: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let mut files = Vec::new();
    for class in std::fs::read_dir(&root).expect("sample") {
        let class = class.expect("entry").path();
        if class.is_dir() {
            for f in std::fs::read_dir(&class).expect("class") {
                files.push(f.expect("file").path());
            }
        }
    }
    files.sort();
    let db = Db::open(path).expect("open");
    for f in files {
        let label = f
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        db.insert_image(&std::fs::read(&f).expect("read"), label.as_deref())
            .expect("insert");
    }
}

/// The training child: runs the job, touching `dir/second-epoch` when epoch 2 starts (the
/// first checkpoint is on disk by then), and keeps going until killed.
fn train_child(dir: &Path) -> ExitCode {
    let db = Db::open(dir.join("db")).expect("child open");
    let marker = dir.join("second-epoch");
    let opts = train_options().on_progress(move |p| {
        if p.phase == lookalike::Phase::Training && p.epoch == 1 {
            let _ = std::fs::write(&marker, b"1");
            std::thread::sleep(Duration::from_secs(60)); // wait for the kill
        }
    });
    let _ = db.train_extractor_with("simnet", opts);
    ExitCode::SUCCESS
}

/// Kills a training job after its first checkpoint, resumes it, compares with an
/// uninterrupted job.
fn training_kill(dir: &Path, exe: &Path) -> Result<(), String> {
    let (cut, whole) = (dir.join("train-cut"), dir.join("train-whole"));
    std::fs::create_dir_all(&cut).map_err(|e| e.to_string())?;
    fill_sample(&cut.join("db"));
    fill_sample(&whole);
    let mut c = Command::new(exe)
        .env(TRAIN_CHILD_ENV, &cut)
        .spawn()
        .map_err(|e| e.to_string())?;
    let marker = cut.join("second-epoch");
    for _ in 0..600 {
        if marker.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill().map_err(|e| e.to_string())?;
    let _ = c.wait();
    if !marker.exists() {
        return Err("the training child never reached its second epoch".into());
    }
    let db = Db::open(cut.join("db")).map_err(|e| format!("reopen: {e}"))?;
    match db.pending_job().map_err(|e| e.to_string())? {
        Some((e, _, 1)) if e == "simnet" => {}
        other => {
            return Err(format!(
                "expected a simnet checkpoint after 1 epoch, got {other:?}"
            ))
        }
    }
    if db.active_model().version != 1 {
        return Err("the killed job switched models".into());
    }
    let resumed = db
        .train_extractor_with("simnet", train_options().resume(true))
        .map_err(|e| format!("resume: {e}"))?;
    let full = Db::open(&whole)
        .and_then(|w| {
            let r = w.train_extractor_with("simnet", train_options())?;
            Ok((w, r))
        })
        .map_err(|e| format!("uninterrupted: {e}"))?;
    if resumed.after != full.1.after || resumed.steps != full.1.steps {
        return Err(format!(
            "resumed {:?} vs uninterrupted {:?}",
            resumed.after, full.1.after
        ));
    }
    for id in [1u64, 150, 300] {
        let (a, b) = (db.embedding(ImageId(id)), full.0.embedding(ImageId(id)));
        match (a, b) {
            (Ok(a), Ok(b)) if a == b => {}
            _ => return Err(format!("embedding of image {id} differs after resume")),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(&PathBuf::from(dir));
    }
    if let Ok(dir) = std::env::var(TRAIN_CHILD_ENV) {
        return train_child(&PathBuf::from(dir));
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
    let rounds = std::env::var("LOOKALIKE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let dir = dir.join(format!("run-{}", round / FRESH_EVERY));
        std::fs::create_dir_all(&dir).expect("round dir");
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
    match training_kill(&dir, &exe) {
        Ok(()) => {
            passed += 1;
            println!("training job killed after its first checkpoint: resumed to the same weights");
        }
        Err(e) => {
            failed += 1;
            println!("training kill: FAILED: {e}");
        }
    }
    println!("crash recovery: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
