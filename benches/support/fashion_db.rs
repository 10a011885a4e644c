//! A large database of Fashion-MNIST images, made once and kept in `target/bench-duplicates/`
//! between runs (shared by `benches/duplicates.rs` and `benches/serve.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::imageops;
use lookalike::datasets::{fashion_mnist, Split};
use lookalike::{Db, Durability, Options};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `n` Fashion-MNIST images as PNGs: train, test, then mirrored train images.
pub fn fashion_pngs(data: &Path, n: usize) -> Res<Vec<Vec<u8>>> {
    let train = fashion_mnist(data.join("fashion-mnist"), Split::Train)?;
    let test = fashion_mnist(data.join("fashion-mnist"), Split::Test)?;
    let mut out = Vec::with_capacity(n);
    for set in [&train, &test] {
        for i in 0..set.len() {
            if out.len() == n {
                return Ok(out);
            }
            out.push(set.png(i)?);
        }
    }
    for px in &train.pixels {
        if out.len() == n {
            break;
        }
        let img = image::GrayImage::from_raw(28, 28, px.clone()).ok_or("bad pixels")?;
        let mut c = std::io::Cursor::new(Vec::new());
        imageops::flip_horizontal(&img).write_to(&mut c, image::ImageFormat::Png)?;
        out.push(c.into_inner());
    }
    Ok(out)
}

/// The path of a database of `n` unlabelled Fashion-MNIST images (default extractor), made
/// now unless an earlier run left it complete (its `READY` marker).
pub fn cached_db(root: &Path, data: &Path, n: usize) -> Res<PathBuf> {
    let path = root.join(format!("target/bench-duplicates/db-{n}"));
    let ready = path.join("READY");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&path);
        let pngs = fashion_pngs(data, n)?;
        let started = Instant::now();
        let db = Db::open_with(&path, Options::default().durability(Durability::Relaxed))?;
        for chunk in pngs.chunks(1000) {
            db.insert_images(chunk.iter().map(|b| (&b[..], None)))?;
        }
        db.flush()?;
        drop(db);
        std::fs::write(&ready, b"")?;
        println!(
            "made a database of {n} images in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(path)
}
