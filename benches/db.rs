//! Database benchmark: ingest throughput, query latency (exact and HNSW, 10k and 100k
//! vectors), HNSW recall@10 against exact, open time with and without a snapshot, and the
//! retrieval quality of the default extractor on Fashion-MNIST against raw pixels measured in
//! the same run.
//!
//! ```text
//! cargo bench --bench db                 # full run (about 15 minutes on 2 cores)
//! cargo bench --bench db -- --quick      # smaller sizes, for a smoke run
//! cargo bench --bench db -- --data DIR   # Fashion-MNIST elsewhere (default ../shared/data/fashion-mnist)
//! cargo bench --bench db -- --quality-only --skip-baselines --efficientnet W --keep DIR
//!                                        # EfficientNet row; --keep resumes an interrupted run
//! ```
//!
//! Prints figures only; nothing here asserts a speed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lookalike::datasets::{fashion_mnist, LabelledImages, Split, FASHION_MNIST_CLASSES};
use lookalike::lookalike_plugin::candle_core::Tensor;
use lookalike::lookalike_plugin::{
    check_batch, Extractor, ExtractorPlugin, ExtractorSpec, InputSpec, Metric, PluginError,
};
use lookalike::{Db, Durability, ImageId, IndexKind, IndexSource, Options, Query};

/// Nearest neighbour on raw pixels: the baseline the default extractor must beat.
#[derive(Debug)]
struct RawPixels;

impl Extractor for RawPixels {
    fn name(&self) -> &str {
        "raw-pixels"
    }
    fn spec(&self) -> ExtractorSpec {
        ExtractorSpec {
            input: InputSpec::luma(28, 28),
            dim: 784,
            metric: Metric::Cosine,
        }
    }
    fn embed(&self, batch: &Tensor) -> Result<Tensor, PluginError> {
        let n = check_batch(batch, &self.spec().input)?;
        Ok(batch.reshape((n, 784))?)
    }
    fn save_weights(&self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }
}

impl ExtractorPlugin for RawPixels {
    fn name(&self) -> &str {
        "raw-pixels"
    }
    fn build(&self, _: &str, _: Option<&[u8]>) -> Result<Box<dyn Extractor>, PluginError> {
        Ok(Box::new(RawPixels))
    }
}

#[path = "support/stats.rs"]
mod stats;
use stats::percentile;

type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// One query's hits: ids and labels, best first.
type Ranked = Vec<(ImageId, Option<String>)>;

struct Args {
    quick: bool,
    data: PathBuf,
    /// Only the retrieval-quality section.
    quality_only: bool,
    /// Stored / query counts for the quality section (default: all 60,000 / 10,000).
    train: Option<usize>,
    test: Option<usize>,
    /// EfficientNet-Lite0 weights: adds its row to the quality table.
    efficientnet: Option<PathBuf>,
    /// Leave out the raw-pixel and classic rows of the quality table.
    skip_baselines: bool,
    /// Keep the quality databases in this folder and resume filling them on the next run
    /// (a long embedding run that is cut off continues where it stopped).
    keep: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        data: PathBuf::from("../shared/data/fashion-mnist"),
        quality_only: false,
        train: None,
        test: None,
        efficientnet: None,
        skip_baselines: false,
        keep: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--quality-only" => a.quality_only = true,
            "--skip-baselines" => a.skip_baselines = true,
            "--train" => a.train = it.next().and_then(|v| v.parse().ok()),
            "--test" => a.test = it.next().and_then(|v| v.parse().ok()),
            "--efficientnet" => a.efficientnet = it.next().map(PathBuf::from),
            "--keep" => a.keep = it.next().map(PathBuf::from),
            "--data" => {
                if let Some(d) = it.next() {
                    a.data = PathBuf::from(d);
                }
            }
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

fn pngs(set: &LabelledImages, range: std::ops::Range<usize>, flip: bool) -> Res<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(range.len());
    for i in range {
        if flip {
            let w = set.width as usize;
            let mut px = set.pixels[i].clone();
            for row in px.chunks_mut(w) {
                row.reverse();
            }
            let img = image::GrayImage::from_raw(set.width, set.height, px).ok_or("bad image")?;
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Png)?;
            out.push(buf.into_inner());
        } else {
            out.push(set.png(i)?);
        }
    }
    Ok(out)
}

fn label(set: &LabelledImages, i: usize) -> &'static str {
    FASHION_MNIST_CLASSES[set.labels[i] as usize % 10]
}

/// Inserts in batches of `batch`; returns images per second.
fn ingest(db: &Db, images: &[Vec<u8>], labels: &[&str], batch: usize) -> Res<f64> {
    let t = Instant::now();
    for (i, (chunk, ls)) in images.chunks(batch).zip(labels.chunks(batch)).enumerate() {
        if batch > 1 && images.len() > 10 * batch && i % 10 == 0 {
            eprintln!("  inserted {} of {}", i * batch, images.len());
        }
        if batch == 1 {
            db.insert_image(&chunk[0], Some(ls[0]))?;
        } else {
            db.insert_images(chunk.iter().zip(ls).map(|(b, l)| (b.as_slice(), Some(*l))))?;
        }
    }
    db.flush()?;
    Ok(images.len() as f64 / t.elapsed().as_secs_f64())
}

/// Runs queries on 2 threads; returns per-query hit ids, labels and latencies (ms).
fn run_queries(db: &Db, queries: &[Vec<u8>], k: usize) -> Res<(Vec<Ranked>, Vec<f64>)> {
    let results: Vec<Res<(usize, Ranked, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let db = db.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (i, q) in queries.iter().enumerate().skip(t).step_by(2) {
                        let start = Instant::now();
                        let hits = db.nearest_with(q, &Query::k(k)).map_err(|e| e.to_string());
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        out.push(
                            hits.map(|h| (i, h.into_iter().map(|h| (h.id, h.label)).collect(), ms)),
                        );
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .map(|r| r.map_err(Into::into))
            .collect()
    });
    let mut hits = vec![Vec::new(); queries.len()];
    let mut lat = Vec::with_capacity(queries.len());
    for r in results {
        let (i, h, ms) = r?;
        hits[i] = h;
        lat.push(ms);
    }
    lat.sort_by(f64::total_cmp);
    Ok((hits, lat))
}

/// Accuracy@1 and mAP@10 (AP@10 = sum of precision@i at relevant ranks / 10; every class has
/// more than 10 relevant images).
fn quality(hits: &[Ranked], truth: &[&str]) -> (f64, f64) {
    let (mut top1, mut ap_sum) = (0usize, 0f64);
    for (h, t) in hits.iter().zip(truth) {
        if h.first().and_then(|x| x.1.as_deref()) == Some(*t) {
            top1 += 1;
        }
        let (mut rel, mut ap) = (0usize, 0f64);
        for (rank, x) in h.iter().take(10).enumerate() {
            if x.1.as_deref() == Some(*t) {
                rel += 1;
                ap += rel as f64 / (rank + 1) as f64;
            }
        }
        ap_sum += ap / 10.0;
    }
    let n = hits.len() as f64;
    (top1 as f64 / n, ap_sum / n)
}

fn open_timed(path: &Path, opts: Options) -> Res<(Db, f64)> {
    let t = Instant::now();
    let db = Db::open_with(path, opts)?;
    Ok((db, t.elapsed().as_secs_f64()))
}

fn source(db: &Db) -> String {
    match db.index_info().source {
        IndexSource::Snapshot => "snapshot".into(),
        IndexSource::CaughtUp { added, removed } => format!("caught up (+{added} -{removed})"),
        IndexSource::Rebuilt { reason } => format!("rebuilt ({reason})"),
    }
}

fn main() -> Res<()> {
    let a = args();
    if !a.data.join("train-images-idx3-ubyte.gz").exists() {
        println!(
            "SKIP: Fashion-MNIST not found in {} (apt-get install dataset-fashion-mnist, then --data /usr/share/datasets/fashion-mnist)",
            a.data.display()
        );
        return Ok(());
    }
    let train = fashion_mnist(&a.data, Split::Train)?;
    let test = fashion_mnist(&a.data, Split::Test)?;
    let (n_train, n_test, n_lat, big) = if a.quick {
        (6_000, 1_000, 200, 12_000)
    } else {
        (60_000, 10_000, 1_000, 100_000)
    };
    let n_train = a.train.unwrap_or(n_train).min(train.len());
    let n_test = a.test.unwrap_or(n_test).min(test.len());
    let tmp = tempfile::tempdir()?;
    println!(
        "lookalike database benchmark ({} run), {} cores",
        if a.quick { "quick" } else { "full" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("encoding {n_train} train + {n_test} test images as PNG...");
    let train_png = pngs(&train, 0..n_train, false)?;
    let train_labels: Vec<&str> = (0..n_train).map(|i| label(&train, i)).collect();
    let test_png = pngs(&test, 0..n_test, false)?;
    let test_labels: Vec<&str> = (0..n_test).map(|i| label(&test, i)).collect();

    if !a.quality_only {
        ingest_section(&a, &tmp, &train_png, &train_labels)?;
    }
    quality_section(&a, &tmp, &train_png, &train_labels, &test_png, &test_labels)?;
    if !a.quality_only {
        latency_section(
            &tmp,
            &train,
            &train_png,
            &train_labels,
            &test_png[..n_lat.min(n_test)],
            big,
        )?;
    }
    Ok(())
}

fn ingest_section(
    a: &Args,
    tmp: &tempfile::TempDir,
    train_png: &[Vec<u8>],
    train_labels: &[&str],
) -> Res<()> {
    println!("\n## Ingest (classic extractor, PNG 28x28 in)");
    let n_single = if a.quick { 100 } else { 500 };
    let n_batch = if a.quick { 2_000 } else { 10_000 };
    let db = Db::open(tmp.path().join("ingest-single"))?;
    let single = ingest(&db, &train_png[..n_single], &train_labels[..n_single], 1)?;
    drop(db);
    let db = Db::open(tmp.path().join("ingest-batch"))?;
    let batch = ingest(&db, &train_png[..n_batch], &train_labels[..n_batch], 256)?;
    drop(db);
    let db = Db::open_with(
        tmp.path().join("ingest-relaxed"),
        Options::default().durability(Durability::Relaxed),
    )?;
    let relaxed = ingest(&db, &train_png[..n_batch], &train_labels[..n_batch], 256)?;
    drop(db);
    println!("| mode | images | images/s |");
    println!("|---|---|---|");
    println!("| insert_image, immediate durability | {n_single} | {single:.0} |");
    println!("| insert_images (256), immediate durability | {n_batch} | {batch:.0} |");
    println!("| insert_images (256), relaxed durability | {n_batch} | {relaxed:.0} |");
    println!("batch/single ratio: {:.1}x", batch / single);
    Ok(())
}

fn quality_section(
    a: &Args,
    tmp: &tempfile::TempDir,
    train_png: &[Vec<u8>],
    train_labels: &[&str],
    test_png: &[Vec<u8>],
    test_labels: &[&str],
) -> Res<()> {
    let (n_train, n_test) = (train_png.len(), test_png.len());
    println!("\n## Retrieval quality: {n_train} train stored, {n_test} test queries, exact index");
    let mut rows = Vec::new();
    let mut cases = vec![
        (
            "raw pixels (cosine)",
            Options::default()
                .register(Arc::new(RawPixels))
                .extractor("raw-pixels", "")
                .compact(0, 0),
        ),
        (
            "classic, full vectors (compact off)",
            Options::default().compact(0, 0),
        ),
        ("classic (default: compact vectors)", Options::default()),
    ];
    if a.skip_baselines {
        cases.clear();
    }
    if let Some(w) = &a.efficientnet {
        cases.push((
            "efficientnet-lite0 (ImageNet, untrained)",
            Options::default()
                .extractor("efficientnet-lite0", "")
                .extractor_weights(w),
        ));
    }
    for (name, opts) in cases {
        // The first word names the folder (kept folders of earlier runs resume), "-full" the
        // row without compact vectors.
        let first = name.split([' ', ',']).next().unwrap_or("x");
        let full = if name.contains("compact off") {
            "-full"
        } else {
            ""
        };
        let folder = format!("quality-{first}{full}");
        let path = match &a.keep {
            Some(dir) => dir.join(folder),
            None => tmp.path().join(folder),
        };
        let db = Db::open_with(
            &path,
            opts.durability(Durability::Relaxed).index(IndexKind::Exact),
        )?;
        // A kept database from an earlier, interrupted run already holds the first images
        // (inserted in order): add the rest.
        let have = db.len().min(n_train);
        if have > 0 {
            println!("{name}: resuming, {have} of {n_train} images already stored");
        }
        let rate = ingest(&db, &train_png[have..], &train_labels[have..], 1000)?;
        let t = Instant::now();
        let (hits, lat) = run_queries(&db, test_png, 10)?;
        let qps = n_test as f64 / t.elapsed().as_secs_f64();
        let (acc, map) = quality(&hits, test_labels);
        rows.push((
            name,
            db.active_model().dim,
            acc,
            map,
            rate,
            qps,
            percentile(&lat, 0.5),
        ));
    }
    println!("| extractor | dim | accuracy@1 | mAP@10 | ingest images/s | queries/s (2 threads) | p50 ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, dim, acc, map, rate, qps, p50) in &rows {
        println!(
            "| {name} | {dim} | {:.2} % | {:.2} % | {rate:.0} | {qps:.1} | {p50:.2} |",
            acc * 100.0,
            map * 100.0
        );
    }
    for r in rows.iter().skip(1).filter(|_| !a.skip_baselines) {
        println!(
            "{} - raw pixels: {:+.2} points accuracy@1",
            r.0,
            (r.2 - rows[0].2) * 100.0
        );
    }
    Ok(())
}

fn latency_section(
    tmp: &tempfile::TempDir,
    train: &LabelledImages,
    train_png: &[Vec<u8>],
    train_labels: &[&str],
    lat_queries: &[Vec<u8>],
    big: usize,
) -> Res<()> {
    let n_train = train_png.len();
    let n_lat = lat_queries.len();
    println!("\n## Query latency (single query, 1 thread), HNSW recall@10, open time");
    println!("| vectors | index | p50 ms | p99 ms | recall@10 vs exact | build s |");
    println!("|---|---|---|---|---|---|");
    let mut open_rows = Vec::new();
    for size in [big / 10, big] {
        let path = tmp.path().join(format!("lat-{size}"));
        {
            let db = Db::open_with(
                &path,
                Options::default()
                    .durability(Durability::Relaxed)
                    .index(IndexKind::Exact),
            )?;
            let n_plain = size.min(n_train);
            ingest(&db, &train_png[..n_plain], &train_labels[..n_plain], 1000)?;
            if size > n_plain {
                let extra = pngs(train, 0..size - n_plain, true)?;
                let extra_labels: Vec<&str> =
                    (0..size - n_plain).map(|i| label(train, i)).collect();
                ingest(&db, &extra, &extra_labels, 1000)?;
            }
        }
        let mut exact_ids = Vec::new();
        for (kind_name, kind) in [
            ("exact", IndexKind::Exact),
            (
                "hnsw32",
                IndexKind::Hnsw {
                    m: 32,
                    ef_search: 64,
                },
            ),
        ] {
            let opts = || Options::default().index(kind.clone());
            let (db, open_s) = open_timed(&path, opts())?;
            let src = source(&db);
            let build = if src.starts_with("rebuilt") {
                db.index_info().open_seconds
            } else {
                0.0
            };
            let mut lat = Vec::with_capacity(n_lat);
            let mut ids = Vec::with_capacity(n_lat);
            for q in lat_queries {
                let t = Instant::now();
                let hits = db.nearest(q, 10)?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                ids.push(hits.into_iter().map(|h| h.id).collect::<Vec<_>>());
            }
            lat.sort_by(f64::total_cmp);
            let recall = if kind_name == "exact" {
                exact_ids = ids;
                "1 (reference)".to_string()
            } else {
                let found: usize = ids
                    .iter()
                    .zip(&exact_ids)
                    .map(|(g, w)| g.iter().filter(|x| w.contains(x)).count())
                    .sum();
                format!("{:.4}", found as f64 / (10 * n_lat) as f64)
            };
            println!(
                "| {size} | {kind_name} | {:.2} | {:.2} | {recall} | {build:.1} |",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
            drop(db);
            // Open time: with the snapshot just written, then without it.
            let (db, with_snap) = open_timed(&path, opts())?;
            let with_src = source(&db);
            drop(db);
            std::fs::remove_file(path.join("index.stamp"))?;
            let (db, without) = open_timed(&path, opts())?;
            drop(db);
            open_rows.push((size, kind_name, with_snap, with_src, without, open_s, src));
        }
    }
    println!(
        "\n| vectors | index | open with snapshot s | open without snapshot s (rebuild) | ratio |"
    );
    println!("|---|---|---|---|---|");
    for (size, kind, with, with_src, without, _, _) in &open_rows {
        println!(
            "| {size} | {kind} | {with:.3} ({with_src}) | {without:.3} | {:.1}x |",
            without / with
        );
    }
    Ok(())
}
