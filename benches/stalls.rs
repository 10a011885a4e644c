//! Query stalls behind index work: how long a query waits while the index is reshaped,
//! rebuilt, snapshotted or cleaned up, with inserts running at the same time.
//!
//! ```text
//! cargo bench --bench stalls [-- --images 20000] [--hnsw]
//! ```
//!
//! A database of small random PNGs (`Durability::Relaxed`, exact limit at half the image
//! count) is filled to just under the limit. Then, with one thread querying
//! (`Db::nearest_to`, k = 10) and one inserting batches of 64 images throughout, the main thread
//! does each piece of index work in turn: the insert that crosses the exact limit (the switch
//! to HNSW), `flush` (a snapshot save), `rebuild_index`, and removals until removed vectors
//! pass 20 % of the index (the clean-up rebuild). For each it prints how long the work took
//! (what a query would wait if the work held the index lock: the peer figure of the same run)
//! and the queries' median, 99th percentile and worst latency while it ran.
//!
//! Prints figures only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lookalike::{Db, Durability, ImageId, IndexKind, IndexSource, Options};
use rand::{rngs::StdRng, Rng, SeedableRng};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn png(rng: &mut StdRng) -> Res<Vec<u8>> {
    let img = image::RgbImage::from_fn(16, 16, |_, _| image::Rgb(rng.random::<[u8; 3]>()));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn batch(rng: &mut StdRng, n: usize) -> Res<Vec<Vec<u8>>> {
    (0..n).map(|_| png(rng)).collect()
}

fn insert(db: &Db, images: &[Vec<u8>]) -> Res<Vec<ImageId>> {
    Ok(db.insert_images(images.iter().map(|b| (b.as_slice(), None)))?)
}

/// Waits (up to ten minutes) until `done`.
fn wait_for(done: impl Fn() -> bool) -> Res<()> {
    wait_up_to(Duration::from_secs(600), done)
}

/// Waits up to `limit` until `done`.
fn wait_up_to(limit: Duration, done: impl Fn() -> bool) -> Res<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return Err("gave up waiting for the index work".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Query latencies recorded by the query thread.
struct Latencies {
    samples: Mutex<Vec<(Instant, Duration)>>,
}

impl Latencies {
    fn between(&self, from: Instant, to: Instant) -> Vec<Duration> {
        let s = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        let mut d: Vec<Duration> = s
            .into_iter()
            .filter(|(t, l)| *t + *l >= from && *t <= to)
            .map(|(_, l)| l)
            .collect();
        d.sort();
        d
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, took: Duration, lat: &[Duration]) {
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{name:<28} {:>9.0} ms  {:>7} queries  median {:>6.1} ms  p99 {:>6.1} ms  worst {:>6.1} ms  (worst / work {:.3})",
        ms(took),
        lat.len(),
        ms(pick(0.5)),
        ms(pick(0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        ms(lat.last().copied().unwrap_or_default()) / ms(took).max(1e-9),
    );
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let images: usize = args
        .iter()
        .position(|a| a == "--images")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // --hnsw: HNSW from the start (no switch phase), for measuring the rest faster.
    let hnsw_only = args.iter().any(|a| a == "--hnsw");
    let limit = images / 2;
    let dir = tempfile::tempdir()?;
    let mut options = Options::default()
        .durability(Durability::Relaxed)
        .exact_limit(limit);
    if hnsw_only {
        options = options.index(IndexKind::Hnsw {
            m: 32,
            ef_search: 64,
        });
    }
    let db = Db::open_with(dir.path().join("stalls.db"), options)?;
    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut ids = Vec::new();
    while ids.len() + 1000 < limit {
        ids.extend(insert(&db, &batch(&mut rng, 1000)?)?);
    }
    ids.extend(insert(&db, &batch(&mut rng, limit - ids.len())?)?);
    println!(
        "filled {} images in {:.1} s; index {:?}",
        ids.len(),
        started.elapsed().as_secs_f64(),
        db.index_info().kind
    );

    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Latencies {
        samples: Mutex::new(Vec::new()),
    });
    let querier = {
        let (db, stop, lat, probe) = (db.clone(), stop.clone(), lat.clone(), ids[0]);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = db.nearest_to(probe, 10);
                if let Ok(mut s) = lat.samples.lock() {
                    s.push((t, t.elapsed()));
                }
            }
        })
    };
    let inserter = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || -> usize {
            let mut rng = StdRng::seed_from_u64(11);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(b) = batch(&mut rng, 64) else { break };
                match insert(&db, &b) {
                    Ok(i) => n += i.len(),
                    Err(_) => break,
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    report(
        "baseline (inserts only)",
        Duration::from_secs(2),
        &lat.between(t - Duration::from_secs(2), t),
    );

    // Whichever thread's insert crosses the limit builds the HNSW index: timed from the
    // crossing insert to the swap.
    if !hnsw_only {
        let t = Instant::now();
        ids.extend(insert(&db, &batch(&mut rng, 1000)?)?);
        wait_for(|| db.index_info().kind == "hnsw")?;
        report(
            "switch to HNSW",
            t.elapsed(),
            &lat.between(t, Instant::now()),
        );
    }

    let t = Instant::now();
    db.flush()?;
    report(
        "flush (snapshot save)",
        t.elapsed(),
        &lat.between(t, Instant::now()),
    );

    let t = Instant::now();
    db.rebuild_index()?;
    report(
        "rebuild_index",
        t.elapsed(),
        &lat.between(t, Instant::now()),
    );

    let t = Instant::now();
    let mut removed = 0;
    let cleaned = |db: &Db| matches!(&db.index_info().source, IndexSource::Rebuilt { reason } if reason.contains("removed"));
    // Every other stored image, the inserting thread's included, until the removal that
    // passes 20 % of the index has run the clean-up: the inserting thread keeps adding, so a
    // fixed count of removals can fall short of 20 %.
    'removing: while !cleaned(&db) {
        let ids = db.ids();
        if ids.len() < 2 {
            break;
        }
        for id in ids.iter().skip(1).step_by(2) {
            match db.remove(*id) {
                Ok(()) => removed += 1,
                Err(lookalike::Error::UnknownImage(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if cleaned(&db) {
                break 'removing;
            }
        }
    }
    wait_up_to(Duration::from_secs(120), || cleaned(&db))
        .map_err(|e| format!("{e} after {removed} removals; index: {:?}", db.index_info()))?;
    report(
        &format!("{removed} removals + clean-up"),
        t.elapsed(),
        &lat.between(t, Instant::now()),
    );

    stop.store(true, Ordering::Relaxed);
    let _ = querier.join();
    let inserted = inserter.join().unwrap_or(0);
    println!(
        "inserted meanwhile: {inserted}; index at the end: {:?}",
        db.index_info()
    );
    Ok(())
}
