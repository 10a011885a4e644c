//! `lookalike serve` over a real socket: query by upload of a 12 MP photo end to end, and 50
//! concurrent clients querying a 100,000-image database, each against the library in the same
//! run.
//!
//! ```text
//! cargo bench --bench serve [-- --images 100000 --seconds 30 --clients 50 --data ../shared/data]
//! ```
//!
//! Needs `curl` and `wrk` (Debian packages). The server is the crate's router on a tokio
//! runtime in this process, on 127.0.0.1; the load tool runs on the same machine, so on 2 cores
//! server and clients share them.
//!
//! 1. Upload: a 4032 x 3024 JPEG (quality 90) made from Fashion-MNIST tiles, posted 20 times
//!    as multipart with `curl` (its `time_total`: connect, upload, answer); median and worst,
//!    against `Db::nearest` on the same bytes in-process (the peer: what HTTP adds).
//! 2. Load: `wrk` with `--clients` connections for `--seconds`, each request `POST /api/query`
//!    `{"id": random, "k": 10}`: requests/s, p50 and p99 latency, errors; against 2 threads
//!    calling `Db::nearest_to_with` on random ids for 10 s in the same run.
//!
//! Prints figures only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lookalike::serve::{router, ServeOptions};
use lookalike::{Db, Durability, ImageId, Options, Query};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "support/fashion_db.rs"]
mod fashion_db;
#[path = "../tests/support/mosaic.rs"]
mod mosaic;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    images: usize,
    seconds: u64,
    clients: usize,
    data: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        images: 100_000,
        seconds: 30,
        clients: 50,
        data: PathBuf::from("../shared/data"),
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--images" => a.images = v.parse().unwrap_or(a.images),
            "--seconds" => a.seconds = v.parse().unwrap_or(a.seconds),
            "--clients" => a.clients = v.parse().unwrap_or(a.clients),
            "--data" => a.data = PathBuf::from(v),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A 12 MP photo-like JPEG.
fn photo(data: &Path) -> Res<Vec<u8>> {
    let test = lookalike::datasets::fashion_mnist(
        data.join("fashion-mnist"),
        lookalike::datasets::Split::Test,
    )?;
    let tiles: Vec<Vec<u8>> = test.pixels.iter().take(64).cloned().collect();
    let mut rng = StdRng::seed_from_u64(12);
    let square = mosaic::mosaic(&tiles, 3024, &mut rng);
    let wide = image::imageops::resize(&square, 4032, 3024, image::imageops::Triangle);
    Ok(mosaic::jpeg(&wide, 90))
}

/// `POST /api/query` with `file` by curl: seconds from connect to the whole answer.
fn curl_upload(url: &str, file: &Path) -> Res<f64> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-F",
        ])
        .arg(format!("image=@{}", file.display()))
        .arg(format!("{url}/api/query"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut f = text.split_whitespace();
    if f.next() != Some("200") {
        return Err(format!("upload failed: {text}").into());
    }
    Ok(f.next().ok_or("no time")?.parse()?)
}

/// The figures of wrk's report.
struct WrkFigures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: String,
}

fn wrk_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn wrk(url: &str, clients: usize, seconds: u64, n: usize) -> Res<WrkFigures> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("query.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             math.randomseed(7)\n\
             request = function()\n  \
               return wrk.format(nil, \"/api/query\", nil, '{{\"id\": ' .. math.random(1, {n}) .. ', \"k\": 10}}')\n\
             end\n"
        ),
    )?;
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .args(["--latency", "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no wrk figures in: {text}"))?;
    let p50_ms = field("50%").and_then(|v| wrk_ms(&v)).ok_or("no p50")?;
    let p99_ms = field("99%").and_then(|v| wrk_ms(&v)).ok_or("no p99")?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no request count")?;
    let mut errors = Vec::new();
    if let Some(e) = field("Socket errors:") {
        errors.push(format!("socket errors: {e}"));
    }
    if let Some(e) = field("Non-2xx or 3xx responses:") {
        errors.push(format!("non-2xx answers: {e}"));
    }
    Ok(WrkFigures {
        rps,
        p50_ms,
        p99_ms,
        requests,
        errors: if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        },
    })
}

/// Queries by random id from 2 threads for `seconds`: queries per second.
fn library_rate(db: &Db, n: usize, seconds: u64) -> f64 {
    let stop = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    let mut count = 0;
                    while Instant::now() < stop {
                        let id = ImageId(rng.random_range(1..=n as u64));
                        if db.nearest_to_with(id, &Query::k(10)).is_ok() {
                            count += 1;
                        }
                    }
                    count
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    done as f64 / started.elapsed().as_secs_f64()
}

fn main() -> Res<()> {
    let a = args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = fashion_db::cached_db(&root, &a.data, a.images)?;
    let opened = Instant::now();
    let db = Db::open_with(&path, Options::default().durability(Durability::Relaxed))?;
    println!(
        "{} images, index {} (opened in {:.1} s)",
        db.len(),
        db.index_info().kind,
        opened.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = router(db.clone(), ServeOptions::default());
    runtime.spawn(async move { axum::serve(listener, app).await });

    // 1. A 12 MP photo by upload, end to end, against the library on the same bytes.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("photo.jpg");
    let bytes = photo(&a.data)?;
    std::fs::write(&file, &bytes)?;
    curl_upload(&url, &file)?; // warm-up
    let mut http: Vec<f64> = (0..20)
        .map(|_| curl_upload(&url, &file).map(|s| s * 1000.0))
        .collect::<Res<_>>()?;
    let mut lib: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            db.nearest(&bytes, 10)
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<_, _>>()?;
    let worst = http.iter().copied().fold(0.0, f64::max);
    let (h, l) = (median(&mut http), median(&mut lib));
    println!();
    println!(
        "| query by upload, 4032 x 3024 JPEG of {:.1} MB (20 runs) | median | worst |",
        bytes.len() as f64 / 1e6
    );
    println!("|---|---|---|");
    println!("| HTTP: curl's time_total (connect, upload, answer) | {h:.1} ms | {worst:.1} ms |");
    println!("| library: `Db::nearest` on the same bytes (peer) | {l:.1} ms | |");
    println!("| HTTP / library | {:.2} | |", h / l);

    // 2. Load against the library's own rate, in the same run.
    let n = db.len();
    let w = wrk(&url, a.clients, a.seconds, n)?;
    let lib_rate = library_rate(&db, n, 10);
    println!();
    println!(
        "| {} clients for {} s, POST /api/query {{id, k: 10}} on {n} images | value |",
        a.clients, a.seconds
    );
    println!("|---|---|");
    println!("| requests | {} |", w.requests);
    println!("| throughput | {:.0} requests/s |", w.rps);
    println!(
        "| latency p50 / p99 | {:.1} / {:.1} ms |",
        w.p50_ms, w.p99_ms
    );
    println!("| errors | {} |", w.errors);
    println!("| library, 2 threads of `nearest_to_with` (peer) | {lib_rate:.0} queries/s |");
    println!("| HTTP / library throughput | {:.2} |", w.rps / lib_rate);
    Ok(())
}
