//! Duplicate groups: how well the default distance separates near-identical copies from other
//! images, and how long `lookalike duplicates` takes on a large database.
//!
//! ```text
//! cargo bench --bench duplicates [-- --originals 1000 --scale 100000 --data ../shared/data]
//! ```
//!
//! 1. Quality: `--originals` photo-like images (256 x 256 JPEGs: a 2 x 2 mosaic of Fashion-MNIST
//!    test images, tinted, upscaled, with noise), one near copy of each (re-encoded at JPEG
//!    quality 70-95, scaled 50-200 %, cropped by up to 10 %, or each channel shifted by up to
//!    8 levels; a fifth of the copies each, and a fifth all four at once) and as many other
//!    such images, into a fresh
//!    database with the default extractor. For a range of distances: pair precision and recall
//!    of `Db::duplicates` (pairs inside a group against the true original-copy pairs), and the
//!    distances of the true pairs against each image's nearest other image.
//!    The same again with `efficientnet-lite0` when its weights are in `--data`.
//! 2. Scale (`--scale N`, 0 to skip): N Fashion-MNIST images (train, test, then mirrored train
//!    images) in a database kept in `target/bench-duplicates/` between runs; then
//!    `lookalike duplicates` on it under `/usr/bin/time`: seconds, peak RSS, groups. Then
//!    1,000 test images as query files through one `lookalike query DIR --json` process,
//!    against the same queries through the API.
//!
//! Prints figures only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use image::{imageops, RgbImage};
use lookalike::datasets::{fashion_mnist, Split};
use lookalike::{Db, Durability, ImageId, ImageMeta, InsertMode, Options};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "support/fashion_db.rs"]
mod fashion_db;
#[path = "../tests/support/mosaic.rs"]
mod mosaic;
use fashion_db::cached_db;
use mosaic::{jpeg, mosaic};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    originals: usize,
    scale: usize,
    data: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        originals: 1000,
        scale: 100_000,
        data: PathBuf::from("../shared/data"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next();
        match (k.as_str(), v) {
            ("--originals", Some(v)) => a.originals = v.parse().unwrap_or(a.originals),
            ("--scale", Some(v)) => a.scale = v.parse().unwrap_or(a.scale),
            ("--data", Some(v)) => a.data = PathBuf::from(v),
            _ => {}
        }
    }
    a
}

/// The kinds of near copy: one change alone, or all four.
const KINDS: [&str; 5] = [
    "re-encoded (quality 70-95)",
    "scaled 50-200 %",
    "cropped by up to 10 %",
    "colour-shifted (up to 8 levels)",
    "all four",
];

/// A near copy of kind `kind` (see [`KINDS`]): cropped, scaled, colour-shifted, re-encoded.
fn near_copy(img: &RgbImage, kind: usize, rng: &mut StdRng) -> Res<Vec<u8>> {
    let (w, h) = img.dimensions();
    let all = kind == 4;
    let crop = if kind == 2 || all {
        rng.random_range(0.0..0.10f32)
    } else {
        0.0
    };
    let (cw, ch) = (
        (w as f32 * (1.0 - crop)) as u32,
        (h as f32 * (1.0 - crop)) as u32,
    );
    let (x, y) = (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch));
    let cropped = imageops::crop_imm(img, x, y, cw, ch).to_image();
    let s = if kind == 1 || all {
        rng.random_range(0.5..2.0f32)
    } else {
        1.0
    };
    let mut out = imageops::resize(
        &cropped,
        ((cw as f32 * s) as u32).max(8),
        ((ch as f32 * s) as u32).max(8),
        imageops::Triangle,
    );
    let shift: [i16; 3] = if kind == 3 || all {
        [
            rng.random_range(-8..=8),
            rng.random_range(-8..=8),
            rng.random_range(-8..=8),
        ]
    } else {
        [0; 3]
    };
    for p in out.pixels_mut() {
        for (c, d) in p.0.iter_mut().zip(shift) {
            *c = (i16::from(*c) + d).clamp(0, 255) as u8;
        }
    }
    let quality = if kind == 0 || all {
        rng.random_range(70..=95)
    } else {
        95
    };
    Ok(jpeg(&out, quality))
}

fn percentile(sorted: &[f32], p: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn quality(args: &Args, options: Options) -> Res<()> {
    let test = fashion_mnist(args.data.join("fashion-mnist"), Split::Test)?;
    let mut rng = StdRng::seed_from_u64(7);
    let n = args.originals;
    let (mut originals, mut copies, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let img = mosaic(&test.pixels, 256, &mut rng);
        copies.push(near_copy(&img, i % KINDS.len(), &mut rng)?);
        originals.push(jpeg(&img, 90));
        others.push(jpeg(&mosaic(&test.pixels, 256, &mut rng), 90));
    }
    let dir = tempfile::tempdir()?;
    let db = Db::open_with(dir.path().join("db"), options)?;
    let m = ImageMeta::default();
    let insert = |set: &[Vec<u8>]| -> Res<Vec<ImageId>> {
        let items: Vec<_> = set.iter().map(|b| (&b[..], &m)).collect();
        let out = db.insert_images_with(items, InsertMode::Always)?;
        Ok(out
            .into_iter()
            .map(|r| r.map(|i| i.id()))
            .collect::<Result<_, _>>()?)
    };
    let a = insert(&originals)?;
    let b = insert(&copies)?;
    insert(&others)?;
    let truth: std::collections::HashSet<(u64, u64)> =
        a.iter().zip(&b).map(|(x, y)| (x.0, y.0)).collect();
    let partner: std::collections::HashMap<u64, u64> = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| [(x.0, y.0), (y.0, x.0)])
        .collect();

    // Distances of true pairs, and of each image to its nearest image that is not its pair.
    let mut pair_d = Vec::new();
    let mut by_kind: Vec<Vec<f32>> = vec![Vec::new(); KINDS.len()];
    let kind_of: std::collections::HashMap<u64, usize> = a
        .iter()
        .enumerate()
        .map(|(i, id)| (id.0, i % KINDS.len()))
        .collect();
    let mut other_d = Vec::new();
    for id in db.ids() {
        let hits = db.nearest_to(id, 2)?;
        if let Some(p) = partner.get(&id.0) {
            if id.0 < *p {
                let v = db.embedding(id)?;
                let w = db.embedding(ImageId(*p))?;
                let d = (1.0 - v.iter().zip(&w).map(|(x, y)| x * y).sum::<f32>()).max(0.0);
                pair_d.push(d);
                if let Some(k) = kind_of.get(&id.0) {
                    by_kind[*k].push(d);
                }
            }
        }
        if let Some(h) = hits.iter().find(|h| partner.get(&id.0) != Some(&h.id.0)) {
            other_d.push(h.distance);
        }
    }
    pair_d.sort_by(f32::total_cmp);
    other_d.sort_by(f32::total_cmp);
    println!(
        "{n} originals, {n} near copies, {n} other images; extractor {}",
        db.active_model().extractor
    );
    println!();
    println!("| distance (1 - cos) | min | p1 | p10 | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|");
    for d in &mut by_kind {
        d.sort_by(f32::total_cmp);
    }
    let mut rows: Vec<(String, &Vec<f32>)> = vec![("original to its copy".into(), &pair_d)];
    for (k, d) in KINDS.iter().zip(&by_kind) {
        rows.push((format!("... copies {k}"), d));
    }
    rows.push(("image to its nearest other image".into(), &other_d));
    for (name, d) in rows {
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            percentile(d, 0.0),
            percentile(d, 0.01),
            percentile(d, 0.10),
            percentile(d, 0.5),
            percentile(d, 0.9),
            percentile(d, 0.99),
            percentile(d, 1.0)
        );
    }
    println!();
    println!("| max_distance | groups | pairs predicted | precision | recall | seconds |");
    println!("|---|---|---|---|---|---|");
    let default = db.default_duplicate_distance();
    let mut ts = vec![0.01, 0.03, 0.05, 0.08, 0.1, 0.12, 0.15, default];
    ts.sort_by(f32::total_cmp);
    ts.dedup();
    for t in ts {
        let started = Instant::now();
        let groups = db.duplicates(Some(t))?;
        let secs = started.elapsed().as_secs_f64();
        let mut predicted = 0usize;
        let mut hit = 0usize;
        for g in &groups {
            for i in 0..g.ids.len() {
                for j in i + 1..g.ids.len() {
                    predicted += 1;
                    let (x, y) = (g.ids[i].0.min(g.ids[j].0), g.ids[i].0.max(g.ids[j].0));
                    hit += usize::from(truth.contains(&(x, y)));
                }
            }
        }
        println!(
            "| {t}{} | {} | {predicted} | {:.1} % | {:.1} % | {secs:.2} |",
            if t == default { " (default)" } else { "" },
            groups.len(),
            100.0 * hit as f64 / predicted.max(1) as f64,
            100.0 * hit as f64 / n as f64,
        );
    }
    Ok(())
}

fn scale(args: &Args, root: &Path) -> Res<()> {
    let n = args.scale;
    let path = cached_db(root, &args.data, n)?;
    let bin = root.join("target/release/lookalike");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M"])
        .arg(&bin)
        .arg("duplicates")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default().to_string();
    let mut f = last.split_whitespace();
    let secs: f64 = f
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(err.to_string())?;
    let kb: f64 = f
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(err.to_string())?;
    let groups = String::from_utf8_lossy(&out.stdout).lines().count();
    println!();
    println!("| `lookalike duplicates` on {n} images (default distance) | value |");
    println!("|---|---|");
    println!("| wall time | {secs:.1} s |");
    println!("| peak RSS | {:.0} MiB |", kb / 1024.0);
    println!("| groups | {groups} |");
    queries(&args.data, &path, &bin)
}

/// 1,000 Fashion-MNIST test images as query files: `lookalike query DIR --json` in one process
/// against the same queries through the API (one `Db::nearest` each, and `Db::nearest_batch`).
fn queries(data: &Path, db_path: &Path, bin: &Path) -> Res<()> {
    let test = fashion_mnist(data.join("fashion-mnist"), Split::Test)?;
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for i in 0..1000 {
        let png = test.png(i)?;
        std::fs::write(dir.path().join(format!("{i:04}.png")), &png)?;
        files.push(png);
    }
    let started = Instant::now();
    let out = Command::new(bin)
        .arg("query")
        .arg(db_path)
        .arg(dir.path())
        .args(["-k", "10", "--json"])
        .output()?;
    let cli = started.elapsed().as_secs_f64();
    let answered = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"hits\""))
        .count();
    let started = Instant::now();
    let db = Db::open_with(db_path, Options::default())?;
    let open = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for f in &files {
        db.nearest(f, 10)?;
    }
    let one = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let refs: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    for chunk in refs.chunks(64) {
        for r in db.nearest_batch(chunk, &lookalike::Query::k(10))? {
            r?;
        }
    }
    let batch = started.elapsed().as_secs_f64();
    println!();
    println!("| 1,000 queries (k 10) on the same database | seconds | queries/s |");
    println!("|---|---|---|");
    println!(
        "| `lookalike query DIR --json`, one process ({answered} answered; open included) | {cli:.2} | {:.0} |",
        1000.0 / cli
    );
    println!("| API: `Db::open_with` | {open:.2} | |");
    println!(
        "| API: `Db::nearest`, one at a time | {one:.2} | {:.0} |",
        1000.0 / one
    );
    println!(
        "| API: `Db::nearest_batch`, 64 at a time | {batch:.2} | {:.0} |",
        1000.0 / batch
    );
    Ok(())
}

fn main() -> Res<()> {
    let args = args();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let relaxed = Options::default().durability(Durability::Relaxed);
    quality(&args, relaxed.clone())?;
    let weights = args
        .data
        .join("efficientnet-lite0/efficientnet-lite0.safetensors");
    if weights.exists() {
        println!();
        quality(
            &args,
            relaxed
                .extractor("efficientnet-lite0", "")
                .extractor_weights(weights),
        )?;
    }
    if args.scale > 0 {
        scale(&args, root)?;
    }
    Ok(())
}
