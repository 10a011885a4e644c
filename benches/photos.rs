//! Photo ingest benchmark: a folder of phone-sized JPEGs through `lookalike add`, against the
//! decode-bound rate and Pillow measured in the same run.
//!
//! ```text
//! cargo bench --bench photos [-- --photos 240 --dir target/bench-photos --data ../shared/data]
//! ```
//!
//! 1. Makes (once; reused while the count matches) `DIR/a/*.jpg`: 4032 x 3024 JPEGs at quality
//!    90, each a 4 x 3 mosaic of the bundled Fashion-MNIST sample images, tinted, upscaled and
//!    given sensor-like noise; every fourth carries EXIF orientation 6 (a portrait photo).
//! 2. Decode-bound rate: `lookalike::decode_for` (the database's own decode policy for the
//!    default extractor's 32 x 32 input) over the files in memory on one thread, times the
//!    cores.
//! 3. `lookalike add DIR/a` (release binary, fresh database in `DIR.work/`, after `sync`)
//!    under `/usr/bin/time`: images/s and peak RSS, three times at the default batch and once
//!    at `--batch 100000`.
//! 4. Pillow's draft-mode decode (`../shared/peers/pillow_rate.py`), when python3 has PIL.
//! 5. `Db::nearest` with one 12 MP photo: median and worst of 20.
//! 6. With EfficientNet-Lite0 weights in `--data`: `add` images/s, and per image the scaled
//!    JPEG decode, the resize and the network.
//!
//! Prints figures only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fast_image_resize::images::Image;
use fast_image_resize::{PixelType, ResizeAlg, ResizeOptions, Resizer};
use lookalike::lookalike_plugin::candle_core::{Device, Tensor};
use lookalike::lookalike_plugin::{ExtractorPlugin, InputSpec};
use lookalike::Db;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const W: u32 = 4032;
const H: u32 = 3024;

/// The bundled sample images, decoded to grey.
fn tiles(root: &Path) -> Res<Vec<image::GrayImage>> {
    let mut out = Vec::new();
    let sample = root.join("examples/data/fashion-mnist-sample");
    let mut dirs: Vec<_> = std::fs::read_dir(&sample)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let mut files: Vec<_> = std::fs::read_dir(&d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            out.push(image::open(&f)?.into_luma8());
        }
    }
    Ok(out)
}

/// Inserts an APP1 segment with EXIF orientation `o` after the SOI marker.
fn with_orientation(jpeg: &[u8], o: u16) -> Vec<u8> {
    let mut tiff = b"MM\0*".to_vec();
    tiff.extend_from_slice(&8u32.to_be_bytes());
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&o.to_be_bytes());
    tiff.extend_from_slice(&[0; 6]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(&tiff);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// One 12 MP photo from `tiles`, seeded by `i`.
fn photo(tiles: &[image::GrayImage], i: usize) -> Res<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(i as u64);
    let (tw, th) = (28u32, 28u32);
    let mut small = image::RgbImage::new(4 * tw, 3 * th);
    for r in 0..3 {
        for c in 0..4 {
            let t = &tiles[rng.random_range(0..tiles.len())];
            let tint: [f32; 3] = [
                rng.random_range(0.3..1.0),
                rng.random_range(0.3..1.0),
                rng.random_range(0.3..1.0),
            ];
            for (x, y, p) in t.enumerate_pixels() {
                let v = f32::from(p.0[0]);
                small.put_pixel(
                    c * tw + x,
                    r * th + y,
                    image::Rgb(tint.map(|k| (v * k) as u8)),
                );
            }
        }
    }
    let src = Image::from_vec_u8(
        small.width(),
        small.height(),
        small.into_raw(),
        PixelType::U8x3,
    )?;
    let mut big = Image::new(W, H, PixelType::U8x3);
    Resizer::new().resize(
        &src,
        &mut big,
        &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(
            fast_image_resize::FilterType::CatmullRom,
        )),
    )?;
    let mut pixels = big.into_vec();
    for p in &mut pixels {
        let n: i16 = rng.random_range(-10..=10);
        *p = (i16::from(*p) + n).clamp(0, 255) as u8;
    }
    let mut c = turbojpeg::Compressor::new()?;
    c.set_quality(90)?;
    let jpeg = c.compress_to_vec(turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: W as usize,
        pitch: 3 * W as usize,
        height: H as usize,
        format: turbojpeg::PixelFormat::RGB,
    })?;
    Ok(if i % 4 == 3 {
        with_orientation(&jpeg, 6)
    } else {
        jpeg
    })
}

/// The photo folder `dir/a`, made if it does not hold `n` photos.
fn folder(root: &Path, dir: &Path, n: usize) -> Res<Vec<PathBuf>> {
    let a = dir.join("a");
    let name = |i: usize| a.join(format!("photo-{i:05}.jpg"));
    let have = (0..n).all(|i| name(i).exists()) && !name(n).exists();
    if !have {
        let _ = std::fs::remove_dir_all(&a);
        std::fs::create_dir_all(&a)?;
        let tiles = tiles(root)?;
        let t = Instant::now();
        (0..n)
            .into_par_iter()
            .try_for_each(|i| -> Result<(), String> {
                let bytes = photo(&tiles, i).map_err(|e| e.to_string())?;
                std::fs::write(name(i), bytes).map_err(|e| e.to_string())
            })?;
        eprintln!("made {n} photos in {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok((0..n).map(name).collect())
}

/// Runs `lookalike add` under `/usr/bin/time`: (seconds, peak RSS in MiB). The previous
/// database is removed and the disk synced first, so that its write-back does not run during
/// this one.
fn add(db: &Path, dir: &Path, extra: &[&str]) -> Res<(f64, f64)> {
    let _ = std::fs::remove_dir_all(db);
    let _ = Command::new("sync").status();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("TIME %e %M")
        .arg(env!("CARGO_BIN_EXE_lookalike"))
        .arg("add")
        .arg(db)
        .arg(dir)
        .args(extra)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("lookalike add failed: {stderr}").into());
    }
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("TIME "))
        .ok_or("no /usr/bin/time line (apt-get install time)")?;
    let mut f = line[5..].split_whitespace();
    let secs: f64 = f.next().ok_or("time")?.parse()?;
    let kb: f64 = f.next().ok_or("rss")?.parse()?;
    Ok((secs, kb / 1024.0))
}

fn pillow(root: &Path, dir: &Path) -> Option<f64> {
    let script = root.join("../shared/peers/pillow_rate.py");
    let out = Command::new("python3").arg(script).arg(dir).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "Pillow peer skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Images/s of `f` over `files` on this thread.
fn rate(files: &[Vec<u8>], mut f: impl FnMut(&[u8]) -> Res<()>) -> Res<f64> {
    let t = Instant::now();
    for b in files {
        f(b)?;
    }
    Ok(files.len() as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Res<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut n = 240;
    let mut dir = root.join("target/bench-photos");
    let mut data = root.join("../shared/data");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--photos" => n = it.next().ok_or("--photos N")?.parse()?,
            "--dir" => dir = it.next().ok_or("--dir DIR")?.into(),
            "--data" => data = it.next().ok_or("--data DIR")?.into(),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let paths = folder(&root, &dir, n)?;
    let files: Vec<Vec<u8>> = paths.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let mb = files.iter().map(Vec::len).sum::<usize>() as f64 / n as f64 / 1e6;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("{n} photos of {W} x {H}, {mb:.2} MB each on average, {cores} cores");

    let classic = InputSpec::rgb(32, 32);
    let one = rate(&files, |b| {
        lookalike::decode_for(b, &classic)?;
        Ok(())
    })?;
    let bound = one * cores as f64;
    let t = Instant::now();
    files
        .par_iter()
        .try_for_each(|b| lookalike::decode_for(b, &classic).map(|_| ()))?;
    let parallel = n as f64 / t.elapsed().as_secs_f64();
    let pil = pillow(&root, &dir);
    // Databases and the EfficientNet subset beside the folder, not in it (add walks folders).
    let work = dir.with_extension("work");
    std::fs::create_dir_all(&work)?;
    let db_path = work.join("bench.db");
    let photos = dir.join("a");
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(add(&db_path, &photos, &[])?);
    }
    let (secs_big, rss_big) = add(&db_path, &photos, &["--batch", "100000"])?;
    let pil_after = pillow(&root, &dir);

    let db = Db::open(&db_path)?;
    let mut times: Vec<f64> = (0..20)
        .map(|i| {
            let t = Instant::now();
            db.nearest(&files[i % n], 10)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    drop(db);
    times.sort_by(f64::total_cmp);

    println!();
    println!("| figure (default extractor `classic`) | value |");
    println!("|---|---|");
    println!("| decode-bound rate: own decode, 1 thread x {cores} cores | {bound:.1} images/s ({one:.1} per core) |");
    println!("| own decode on all cores (rayon) | {parallel:.1} images/s |");
    match (pil, pil_after) {
        (Some(a), Some(b)) => println!(
            "| Pillow draft-mode decode, 1 core (before / after the adds) | {a:.1} / {b:.1} images/s (x {cores} = {:.1}) |",
            (a + b) / 2.0 * cores as f64
        ),
        _ => println!("| Pillow draft-mode decode | not measured (pip install pillow) |"),
    }
    for (secs, rss) in &runs {
        let add_rate = n as f64 / secs;
        println!(
            "| `lookalike add`, default batch | {add_rate:.1} images/s ({:.0} % of the decode-bound rate), peak RSS {rss:.0} MiB |",
            100.0 * add_rate / bound
        );
    }
    println!(
        "| `lookalike add --batch 100000` | {:.1} images/s, peak RSS {rss_big:.0} MiB |",
        n as f64 / secs_big
    );
    println!(
        "| `Db::nearest` with one 12 MP photo (k 10) | median {:.1} ms, worst {:.1} ms of 20 |",
        times[times.len() / 2],
        times[times.len() - 1]
    );

    let weights = data.join("efficientnet-lite0/efficientnet-lite0.safetensors");
    if !weights.exists() {
        println!("\nEfficientNet-Lite0 skipped: no {}", weights.display());
        return Ok(());
    }
    let sub = 60.min(n);
    let sub_dir = work.join("effnet");
    let _ = std::fs::remove_dir_all(&sub_dir);
    std::fs::create_dir_all(sub_dir.join("a"))?;
    for p in &paths[..sub] {
        if let Some(name) = p.file_name() {
            std::fs::hard_link(p, sub_dir.join("a").join(name))?;
        }
    }
    let w = weights.to_string_lossy().into_owned();
    let (secs_e, rss_e) = add(
        &work.join("effnet.db"),
        &sub_dir,
        &["--extractor", "efficientnet-lite0", "--weights", &w],
    )?;
    let input = lookalike::fused::efficientnet::input_spec();
    let some = &files[..sub];
    // The scaled decode (the DCT scale the policy picks for 224 x 224: both sides >= 448)
    // and the resize to 224 x 224, timed apart on the same images, one thread.
    let (mut dec_s, mut res_s) = (0.0, 0.0);
    for b in some {
        let t = Instant::now();
        let mut d = turbojpeg::Decompressor::new()?;
        let header = d.read_header(b)?;
        let scale = [8, 4, 2]
            .into_iter()
            .map(|k| turbojpeg::ScalingFactor::new(1, k))
            .find(|s| s.scale(header.width.min(header.height)) >= 448)
            .unwrap_or(turbojpeg::ScalingFactor::ONE);
        d.set_scaling_factor(scale)?;
        let h = header.scaled(scale);
        let mut img = turbojpeg::Image {
            pixels: vec![0u8; 3 * h.width * h.height],
            width: h.width,
            pitch: 3 * h.width,
            height: h.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        d.decompress(b, img.as_deref_mut())?;
        dec_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let src = Image::from_vec_u8(h.width as u32, h.height as u32, img.pixels, PixelType::U8x3)?;
        let mut dst = Image::new(224, 224, PixelType::U8x3);
        Resizer::new().resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(
                fast_image_resize::FilterType::Bilinear,
            )),
        )?;
        res_s += t.elapsed().as_secs_f64();
    }
    let whole = rate(some, |b| {
        lookalike::decode_for(b, &input)?;
        Ok(())
    })?;
    let net = lookalike::fused::EfficientNetPlugin.build("", Some(&std::fs::read(&weights)?))?;
    let batch = Tensor::rand(0f32, 1f32, (32, 3, 224, 224), &Device::Cpu)?;
    net.embed(&batch)?;
    let t = Instant::now();
    net.embed(&batch)?;
    let net_ms = t.elapsed().as_secs_f64() * 1e3 / 32.0;
    let (dec_ms, res_ms) = (dec_s * 1e3 / sub as f64, res_s * 1e3 / sub as f64);
    println!();
    println!("| figure (`efficientnet-lite0`, {sub} photos) | value |");
    println!("|---|---|");
    println!(
        "| `lookalike add` | {:.1} images/s, peak RSS {rss_e:.0} MiB |",
        sub as f64 / secs_e
    );
    println!("| per image, 1 thread: scaled JPEG decode | {dec_ms:.1} ms |");
    println!("| per image, 1 thread: resize to 224 x 224 | {res_ms:.1} ms |");
    println!(
        "| per image, 1 thread: the whole decode policy (`decode_for`) | {:.1} ms |",
        1e3 / whole
    );
    println!("| per image: network (batch 32, candle on all cores) | {net_ms:.1} ms |");
    Ok(())
}
