//! Scale: up to a million distinct images through the public API, one figure table.
//!
//! ```text
//! cargo bench --bench scale                                  # 10k, 100k, 300k, 1M
//! cargo bench --bench scale -- --sizes 10000,100000          # smaller
//! cargo bench --bench scale -- --data DIR --dir DIR          # Fashion-MNIST elsewhere; keep the database
//! cargo bench --bench scale -- --python PY                   # with the FAISS peer (PY has faiss-cpu, numpy)
//! cargo bench --bench scale -- --inserters 2                 # two threads: prepare one batch while the other commits
//! cargo bench --bench scale -- --peer DIR --python PY        # only the FAISS peer, on a kept database
//! ```
//!
//! Distinct 28 x 28 images: Fashion-MNIST's 60,000 training images, each shifted by -2..2
//! pixels in x and y and optionally mirrored (50 variants of each, 3 million in all), as PNG.
//! The default extractor and options (compact vectors included), `Durability::Relaxed`,
//! batches of 1,000 through `Db::insert_images` (with `--inserters N`, N threads each making
//! and preparing a batch while another commits, in order, as `lookalike add` does). While it
//! loads, another thread queries
//! (`Db::nearest` with a stored image's bytes, k = 10, one every 20 ms) and the worst latency
//! is kept. At each size the database is closed (timed: the flush and the index snapshot),
//! then a fresh process opens it and reports its open time, its memory right after the open
//! (VmRSS) and the latency of 500 queries one at a time; the loading continues in a reopened
//! handle. At the last size, recall@10 of the index against an exact scan of the stored
//! vectors (200 queries) is measured too, and with `--python`, the peer: the same 500 stored
//! images searched through `Db::nearest_to` and through faiss-python on the database's own
//! index file (`benches/support/faiss_peer.py`), one query at a time. Last, three sessions on
//! the largest database: open, insert 1,000 more images, close (each timed).
//!
//! Prints figures only; nothing here asserts a speed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lookalike::datasets::{fashion_mnist, LabelledImages, Split, FASHION_MNIST_CLASSES};
use lookalike::{Db, Durability, ImageId, ImageMeta, InsertMode, Options};

#[path = "support/stats.rs"]
mod stats;
use stats::percentile;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Variants of each training image: 5 x 5 shifts, mirrored or not.
const VARIANTS: usize = 50;
const BATCH: usize = 1000;

struct Args {
    sizes: Vec<usize>,
    data: PathBuf,
    dir: Option<PathBuf>,
    /// `--probe DIR`: the child process that opens the database and measures.
    probe: Option<PathBuf>,
    /// A Python with faiss-cpu and numpy: the FAISS peer.
    python: Option<PathBuf>,
    /// `--peer DIR`: only the FAISS peer's comparison, on the database kept in DIR (opened
    /// in this process, as the full run's last step does after loading).
    peer: Option<PathBuf>,
    /// Threads inserting: 1 calls `Db::insert_images` batch after batch; more prepare batches
    /// at once and commit them in order (`Db::prepare_images_with`, `Db::commit_prepared`), as
    /// `lookalike add` does.
    inserters: usize,
}

fn args() -> Args {
    let mut a = Args {
        sizes: vec![10_000, 100_000, 300_000, 1_000_000],
        data: PathBuf::from("../shared/data/fashion-mnist"),
        dir: None,
        probe: None,
        python: None,
        peer: None,
        inserters: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => {
                a.sizes = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
            }
            "--data" => a.data = it.next().map(PathBuf::from).unwrap_or(a.data),
            "--dir" => a.dir = it.next().map(PathBuf::from),
            "--probe" => a.probe = it.next().map(PathBuf::from),
            "--python" => a.python = it.next().map(PathBuf::from),
            "--peer" => a.peer = it.next().map(PathBuf::from),
            "--inserters" => {
                a.inserters = it.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
            }
            _ => {}
        }
    }
    a.sizes.sort_unstable();
    a
}

/// Image `n` (0 ..): training image `n % 60,000`, variant `n / 60,000`, as PNG.
fn image(set: &LabelledImages, n: usize) -> Res<(Vec<u8>, &'static str)> {
    let i = n % set.len();
    let v = (n / set.len()) % VARIANTS;
    let (dx, dy, flip) = ((v % 5) as i32 - 2, ((v / 5) % 5) as i32 - 2, v >= 25);
    let (w, h) = (set.width as i32, set.height as i32);
    let src = &set.pixels[i];
    let img = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        let sx = if flip { w - 1 - x as i32 } else { x as i32 } - dx;
        let sy = y as i32 - dy;
        if (0..w).contains(&sx) && (0..h).contains(&sy) {
            image::Luma([src[(sy * w + sx) as usize]])
        } else {
            image::Luma([0])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok((
        out.into_inner(),
        FASHION_MNIST_CLASSES[set.labels[i] as usize],
    ))
}

fn options() -> Options {
    Options::default().durability(Durability::Relaxed)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes the files under `dir` take on disk (allocated blocks).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += disk_bytes(&e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// The child: open, measure memory, time 500 queries; prints one line of figures.
/// Queries slower than this while loading are listed with the time they started.
const SLOW_QUERY: Duration = Duration::from_millis(50);

fn probe(dir: &Path, set: &LabelledImages) -> Res<()> {
    let t = Instant::now();
    let db = Db::open_with(dir, options())?;
    let open_s = t.elapsed().as_secs_f64();
    let rss = rss_mib();
    let n = db.len();
    let mut lat = Vec::new();
    for q in 0..500 {
        let (bytes, _) = image(set, (q * 7919) % n)?;
        let t = Instant::now();
        db.nearest(&bytes, 10)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let info = db.index_info();
    println!(
        "PROBE {open_s:.3} {rss:.0} {:.3} {:.3} {:.3} {} {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        info.open_seconds,
        info.kind,
        info.source
    );
    Ok(())
}

struct Row {
    size: usize,
    segment_rate: f64,
    overall_rate: f64,
    bytes_per_image: f64,
    close_s: f64,
    open_s: f64,
    /// The index's part of the open (snapshot load and catch-up).
    index_open_s: f64,
    rss_mib: f64,
    p50: f64,
    p99: f64,
    worst_during_load: f64,
    kind: String,
    dim: usize,
}

fn main() -> Res<()> {
    let a = args();
    let set = fashion_mnist(&a.data, Split::Train)?;
    if let Some(dir) = &a.probe {
        return probe(dir, &set);
    }
    if let Some(dir) = &a.peer {
        let python = a.python.as_deref().ok_or("--peer needs --python")?;
        return faiss_peer(&Db::open_with(dir, options())?, dir, python);
    }
    let tmp = tempfile::tempdir_in(std::env::current_dir()?.join("target"))?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().join("scale.db"));
    let max = a.sizes.last().copied().unwrap_or(0);
    if max > set.len() * VARIANTS {
        return Err(format!("at most {} distinct images", set.len() * VARIANTS).into());
    }
    println!(
        "lookalike scale benchmark: {:?} images, {} cores",
        a.sizes,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut db = Db::open_with(&dir, options())?;
    let mut have = db.len();
    let mut rows = Vec::new();
    let mut load_seconds = 0.0;
    for &size in &a.sizes {
        if size <= have {
            continue;
        }
        // Queries while loading: the worst latency.
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let querier = {
            let (db, stop, worst_us, set) =
                (db.clone(), stop.clone(), worst_us.clone(), set.clone());
            std::thread::spawn(move || -> Result<Vec<(f64, f64)>, String> {
                let began = Instant::now();
                let mut slow = Vec::new();
                let mut q = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    // Any of the images makes a query; it need not be stored yet.
                    let (bytes, _) = image(&set, (q * 104_729) % (set.len() * VARIANTS))
                        .map_err(|e| e.to_string())?;
                    // Only the query is timed, and nothing else takes the database's locks
                    // (a thread that wakes during a long hold blocks inside the timed call).
                    let t = Instant::now();
                    match db.nearest(&bytes, 10) {
                        Ok(_) => {
                            let took = t.elapsed();
                            if took > SLOW_QUERY {
                                slow.push(((t - began).as_secs_f64(), took.as_secs_f64() * 1e3));
                            }
                            worst_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed)
                        }
                        // Nothing stored yet.
                        Err(lookalike::Error::Empty { .. }) => 0,
                        Err(e) => return Err(e.to_string()),
                    };
                    q += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(slow)
            })
        };
        let started = Instant::now();
        let from = have;
        load(&db, &set, have, size, a.inserters, &started)?;
        have = size;
        let seconds = started.elapsed().as_secs_f64();
        load_seconds += seconds;
        stop.store(true, Ordering::Relaxed);
        let slow = querier.join().map_err(|_| "query thread panicked")??;
        // When the slow queries came, for finding what they waited for.
        if !slow.is_empty() {
            let list: Vec<String> = slow
                .iter()
                .map(|(at, ms)| format!("{ms:.0} ms at {at:.1} s"))
                .collect();
            eprintln!(
                "  queries over {} ms while loading: {}",
                SLOW_QUERY.as_millis(),
                list.join(", ")
            );
        }
        let info = db.index_info();
        if let Some(e) = &info.rebuild_error {
            eprintln!("  index work failed: {e}");
        }
        let (kind, dim) = (info.kind.to_string(), db.active_model().dim);
        let t = Instant::now();
        drop(db);
        let close_s = t.elapsed().as_secs_f64();
        let bytes = disk_bytes(&dir);
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--probe".as_ref(), dir.as_os_str()])
            .args(["--data".as_ref(), a.data.as_os_str()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("PROBE "))
            .ok_or_else(|| format!("probe failed: {}", String::from_utf8_lossy(&out.stderr)))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            f.get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        eprintln!("  probe: {line}");
        rows.push(Row {
            size,
            segment_rate: (size - from) as f64 / seconds,
            overall_rate: size as f64 / load_seconds,
            bytes_per_image: bytes as f64 / size as f64,
            close_s,
            open_s: num(1),
            rss_mib: num(2),
            p50: num(3),
            p99: num(4),
            index_open_s: num(5),
            worst_during_load: worst_us.load(Ordering::Relaxed) as f64 / 1e3,
            kind,
            dim,
        });
        db = Db::open_with(&dir, options())?;
    }

    println!(
        "\n| images | index | dim | load images/s (this step) | load images/s (overall) | on disk per image | close s | reopen s (index) | RSS after open | query p50 ms | p99 ms | worst query while loading ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} KB | {:.2} | {:.2} ({:.2}) | {:.0} MiB | {:.2} | {:.2} | {:.0} |",
            r.size,
            r.kind,
            r.dim,
            r.segment_rate,
            r.overall_rate,
            r.bytes_per_image / 1e3,
            r.close_s,
            r.open_s,
            r.index_open_s,
            r.rss_mib,
            r.p50,
            r.p99,
            r.worst_during_load
        );
    }
    recall(&db, 200)?;
    if let Some(python) = &a.python {
        faiss_peer(&db, &dir, python)?;
    }
    drop(db);
    sessions(&dir, &set, have)
}

/// Inserts images `from..to` in batches of [`BATCH`], with `inserters` threads (see
/// [`Args::inserters`]), printing the rate every 100,000.
fn load(
    db: &Db,
    set: &LabelledImages,
    from: usize,
    to: usize,
    inserters: usize,
    started: &Instant,
) -> Res<()> {
    let report = |have: usize| {
        if have.is_multiple_of(100_000) {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "  {have} images, {:.0} images/s, at {seconds:.1} s",
                (have - from) as f64 / seconds
            );
        }
    };
    let batch_of = |start: usize| -> Res<Vec<(Vec<u8>, &'static str)>> {
        (start..(start + BATCH).min(to))
            .map(|i| image(set, i))
            .collect()
    };
    if inserters == 1 {
        for start in (from..to).step_by(BATCH) {
            let batch = batch_of(start)?;
            db.insert_images(batch.iter().map(|(b, l)| (b.as_slice(), Some(*l))))?;
            report(start + batch.len());
        }
        return Ok(());
    }
    // Batch k goes to thread k % inserters, which makes and prepares it, then waits for its
    // turn to commit (ids stay in batch order). A failed thread sets the turn to `FAILED`.
    const FAILED: usize = usize::MAX;
    let starts: Vec<usize> = (from..to).step_by(BATCH).collect();
    let turn = std::sync::Mutex::new(0usize);
    let moved = std::sync::Condvar::new();
    let work = |t: usize| -> Result<(), String> {
        for (k, start) in starts.iter().enumerate().skip(t).step_by(inserters) {
            let batch = batch_of(*start).map_err(|e| e.to_string())?;
            let metas: Vec<ImageMeta> = batch
                .iter()
                .map(|(_, l)| ImageMeta {
                    label: Some(l.to_string()),
                    ..ImageMeta::default()
                })
                .collect();
            let prepared = db
                .prepare_images_with(
                    batch
                        .iter()
                        .zip(&metas)
                        .map(|((b, _), m)| (b.as_slice(), m)),
                    InsertMode::Always,
                )
                .map_err(|e| e.to_string())?;
            let mut now = turn.lock().map_err(|_| "poisoned")?;
            while *now != k {
                if *now == FAILED {
                    return Err("another inserting thread failed".into());
                }
                now = moved.wait(now).map_err(|_| "poisoned")?;
            }
            let outcomes = db.commit_prepared(prepared).map_err(|e| e.to_string())?;
            if let Some(Err(e)) = outcomes.into_iter().find(|o| o.is_err()) {
                return Err(e.to_string());
            }
            report(start + batch.len());
            *now += 1;
            moved.notify_all();
        }
        Ok(())
    };
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..inserters)
            .map(|t| {
                let (work, turn, moved) = (&work, &turn, &moved);
                s.spawn(move || {
                    let done = work(t);
                    if done.is_err() {
                        if let Ok(mut now) = turn.lock() {
                            *now = FAILED;
                        }
                        moved.notify_all();
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("an inserting thread panicked".into()))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(())
}

/// A day's use of the largest database: three times, open it, insert 1,000 more images and
/// close it (the close writes the index snapshot: the graph again, and only the new vectors).
fn sessions(dir: &Path, set: &LabelledImages, mut have: usize) -> Res<()> {
    println!("\n| session | images | open s | insert 1,000 s | close s |");
    println!("|---|---|---|---|---|");
    for round in 1..=3 {
        let t = Instant::now();
        let db = Db::open_with(dir, options())?;
        let open_s = t.elapsed().as_secs_f64();
        let batch: Vec<(Vec<u8>, &str)> = (have..have + 1000)
            .map(|i| image(set, i))
            .collect::<Res<_>>()?;
        let t = Instant::now();
        db.insert_images(batch.iter().map(|(b, l)| (b.as_slice(), Some(*l))))?;
        let insert_s = t.elapsed().as_secs_f64();
        have += 1000;
        let t = Instant::now();
        drop(db);
        println!(
            "| {round} | {have} | {open_s:.2} | {insert_s:.2} | {:.2} |",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `Db::nearest_to` (k = 10) against faiss-python's search of the same index file (k = 11:
/// `nearest_to` leaves the query's own image out), 500 stored images one at a time, each side
/// after one untimed pass over the same queries (warm: the store's cache holds the hits'
/// entries, as in a process that has been answering queries).
fn faiss_peer(db: &Db, dir: &Path, python: &Path) -> Res<()> {
    let ids = db.ids();
    let step = (ids.len() / 500).max(1);
    let queries: Vec<ImageId> = ids.iter().step_by(step).take(500).copied().collect();
    for q in &queries {
        std::hint::black_box(db.nearest_to(*q, 10)?);
    }
    let mut lat = Vec::new();
    for q in &queries {
        let t = Instant::now();
        std::hint::black_box(db.nearest_to(*q, 10)?);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let list = dir.join("peer-ids.txt");
    let text: String = queries.iter().map(|q| format!("{}\n", q.0)).collect();
    std::fs::write(&list, text)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/support/faiss_peer.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir.join("index.faiss"))
        .arg(&list)
        .output()?;
    let _ = std::fs::remove_file(&list);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("FAISSPEER "))
        .ok_or_else(|| {
            format!(
                "the FAISS peer failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "\nsame index, same {} stored images as queries, one at a time:\n| | p50 ms | p99 ms |\n|---|---|---|\n| lookalike `Db::nearest_to` (k = 10) | {p50:.3} | {p99:.3} |\n| faiss-python `index.search` (k = 11, {}) | {:.3} | {:.3} |\nlookalike / FAISS: {:.2}x at p50, {:.2}x at p99",
        queries.len(),
        f.get(3..).map(|s| s.join(" ")).unwrap_or_default(),
        num(1),
        num(2),
        p50 / num(1),
        p99 / num(2)
    );
    Ok(())
}

/// Recall@10 of `db`'s index against an exact scan of its stored vectors, for `n` stored
/// images as queries (each query's own id left out of both).
fn recall(db: &Db, n: usize) -> Res<()> {
    let t = Instant::now();
    let ids = db.ids();
    let dim = db.active_model().dim;
    let mut all = Vec::with_capacity(ids.len() * dim);
    for id in &ids {
        all.extend_from_slice(&db.embedding(*id)?);
    }
    let mut found = 0usize;
    let step = (ids.len() / n).max(1);
    let queries: Vec<ImageId> = ids.iter().step_by(step).take(n).copied().collect();
    for q in &queries {
        let qv = db.embedding(*q)?;
        let mut scored: Vec<(f32, u64)> = all
            .chunks(dim)
            .zip(&ids)
            .filter(|(_, id)| *id != q)
            .map(|(v, id)| (-v.iter().zip(&qv).map(|(a, b)| a * b).sum::<f32>(), id.0))
            .collect();
        let k = 10.min(scored.len());
        scored.select_nth_unstable_by(k.saturating_sub(1), |a, b| a.0.total_cmp(&b.0));
        let truth: std::collections::HashSet<u64> = scored[..k].iter().map(|s| s.1).collect();
        let hits = db.nearest_to(*q, 10)?;
        found += hits.iter().filter(|h| truth.contains(&h.id.0)).count();
    }
    println!(
        "\nrecall@10 of the index against an exact scan of the stored vectors ({} queries, {} images): {:.4} ({:.0} s)",
        queries.len(),
        ids.len(),
        found as f64 / (queries.len() * 10) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
