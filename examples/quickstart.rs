//! Quickstart: store the bundled Fashion-MNIST sample, then find look-alikes.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The sample (examples/data/fashion-mnist-sample, 300 PNGs in one folder per class) is split:
//! 27 images per class go into the database with their class as label, 3 per class are held
//! out as queries. Nothing is trained: the database uses its default extractor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lookalike::{Db, Query};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let db_dir = std::env::temp_dir().join("lookalike-quickstart.db");
    if db_dir.exists() {
        std::fs::remove_dir_all(&db_dir)?;
    }

    // 1. Read the sample: class folder -> image files.
    let mut by_class: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for class in std::fs::read_dir(&sample)? {
        let class = class?.path();
        if !class.is_dir() {
            continue;
        }
        let name = class
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        files.sort();
        by_class.insert(name, files);
    }

    // 2. Open a database and insert all but the last 3 images of each class, in one batch.
    let db = Db::open(&db_dir)?;
    let mut stored = Vec::new();
    let mut queries = Vec::new();
    for (class, files) in &by_class {
        let split = files.len().saturating_sub(3);
        for f in &files[..split] {
            stored.push((std::fs::read(f)?, class.clone()));
        }
        for f in &files[split..] {
            queries.push((f.clone(), class.clone()));
        }
    }
    db.insert_images(stored.iter().map(|(b, l)| (b.as_slice(), Some(l.as_str()))))?;
    let model = db.active_model();
    println!(
        "stored {} images in {} labels at {}; extractor {} ({}-d, {})",
        db.len(),
        db.labels().len(),
        db_dir.display(),
        model.extractor,
        model.dim,
        model.metric.as_str()
    );

    // 3. Query: the 5 nearest neighbours of a few held-out images.
    for (file, class) in queries.iter().step_by(7) {
        let hits = db.nearest(&std::fs::read(file)?, 5)?;
        println!(
            "\nquery {} (a {class}):",
            file.file_name().unwrap_or_default().to_string_lossy()
        );
        for h in hits {
            println!(
                "  id {:>4}  distance {:.4}  {}",
                h.id,
                h.distance,
                h.label.as_deref().unwrap_or("-")
            );
        }
    }

    // 4. A label filter: the nearest bags to a sneaker (k hits although bags look different).
    if let Some((file, _)) = queries.iter().find(|(_, c)| c == "sneaker") {
        let hits = db.nearest_with(&std::fs::read(file)?, &Query::k(3).labels(["bag"]))?;
        println!(
            "\nnearest bags to a sneaker: {:?}",
            hits.iter().map(|h| h.id.0).collect::<Vec<_>>()
        );
    }

    // 5. How often is the nearest neighbour of a held-out image of the same class?
    let mut correct = 0;
    for (file, class) in &queries {
        let hits = db.nearest(&std::fs::read(file)?, 1)?;
        if hits[0].label.as_deref() == Some(class.as_str()) {
            correct += 1;
        }
    }
    println!(
        "\naccuracy@1 on the {} held-out images: {correct}/{} ({:.0} %)",
        queries.len(),
        queries.len(),
        100.0 * correct as f64 / queries.len().max(1) as f64
    );
    Ok(())
}
