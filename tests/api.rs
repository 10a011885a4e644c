//! Round trips through the public API: insert, query, labels, removal, formats.

use image::ImageFormat;
use lookalike::{Db, ImageId, Options, Query};

use crate::common::*;

#[test]
fn insert_and_query_round_trip() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let bytes = class_png(0, 1);
    let id = db.insert_image(&bytes, Some("stripes")).unwrap();
    assert_eq!(db.image(id).unwrap(), bytes, "bytes come back as inserted");
    assert_eq!(db.label(id).unwrap().as_deref(), Some("stripes"));
    assert_eq!(db.len(), 1);
    let hits = db.nearest(&bytes, 5).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, id);
    assert!(
        hits[0].distance.abs() < 1e-4,
        "an image is at distance 0 from itself"
    );
    assert_eq!(db.active_model().extractor, "classic");
    assert!(db.extractors().contains(&"classic".to_string()));
}

#[test]
fn nearest_finds_same_class_best_first() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let labels = ["h", "v", "disc", "diag"];
    let items: Vec<(Vec<u8>, &str)> = (0..80u64)
        .map(|i| (class_png((i % 4) as u32, i), labels[(i % 4) as usize]))
        .collect();
    db.insert_images(items.iter().map(|(b, l)| (b.as_slice(), Some(*l))))
        .unwrap();
    let mut correct = 0;
    for class in 0..4u32 {
        let hits = db
            .nearest(&class_png(class, 1000 + u64::from(class)), 10)
            .unwrap();
        assert_eq!(hits.len(), 10);
        for w in hits.windows(2) {
            assert!(w[0].distance <= w[1].distance, "best first");
        }
        correct += hits
            .iter()
            .filter(|h| h.label.as_deref() == Some(labels[class as usize]))
            .count();
    }
    assert!(
        correct >= 36,
        "{correct}/40 neighbours share the query's class"
    );
}

#[test]
fn every_supported_format_decodes() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 100]));
    for format in [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Bmp,
    ] {
        let bytes = encode(&img, format);
        let id = db
            .insert_image(&bytes, Some("fmt"))
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(db.image(id).unwrap(), bytes);
    }
    assert_eq!(db.labels().get("fmt"), Some(&5));
}

#[test]
fn label_filter_returns_k_when_k_match() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    // 300 "common" images and 7 "rare" ones that look unlike the query.
    let mut items = Vec::new();
    for i in 0..300u64 {
        items.push((class_png(0, i), "common"));
    }
    for i in 0..7u64 {
        items.push((class_png(2, 500 + i), "rare"));
    }
    db.insert_images(items.iter().map(|(b, l)| (b.as_slice(), Some(*l))))
        .unwrap();
    let q = class_png(0, 9999);
    let hits = db.nearest_with(&q, &Query::k(5).labels(["rare"])).unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.label.as_deref() == Some("rare")));
    let hits = db.nearest_with(&q, &Query::k(50).labels(["rare"])).unwrap();
    assert_eq!(hits.len(), 7, "all matching images when fewer than k match");
    let hits = db
        .nearest_with(&q, &Query::k(20).labels(["rare", "common"]))
        .unwrap();
    assert_eq!(hits.len(), 20);
}

#[test]
fn label_filter_on_hnsw_returns_k() {
    let dir = tempdir();
    let db = open(
        dir.path(),
        relaxed().index(lookalike::IndexKind::Hnsw {
            m: 16,
            ef_search: 16,
        }),
    );
    let mut items = Vec::new();
    for i in 0..400u64 {
        items.push((class_png(0, i), "common"));
    }
    for i in 0..6u64 {
        items.push((class_png(3, 900 + i), "rare"));
    }
    db.insert_images(items.iter().map(|(b, l)| (b.as_slice(), Some(*l))))
        .unwrap();
    assert_eq!(db.index_info().kind, "hnsw");
    let hits = db
        .nearest_with(&class_png(0, 1), &Query::k(6).labels(["rare"]))
        .unwrap();
    assert_eq!(hits.len(), 6);
    assert!(hits.iter().all(|h| h.label.as_deref() == Some("rare")));
}

#[test]
fn nearest_to_excludes_the_image_itself() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let ids = db
        .insert_images(
            (0..10u64)
                .map(|i| class_png(1, i))
                .collect::<Vec<_>>()
                .iter()
                .map(|b| (b.as_slice(), None)),
        )
        .unwrap();
    let hits = db.nearest_to(ids[3], 20).unwrap();
    assert_eq!(hits.len(), 9);
    assert!(hits.iter().all(|h| h.id != ids[3]));
}

#[test]
fn set_label_and_remove() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    let a = db.insert_image(&class_png(0, 1), Some("x")).unwrap();
    let b = db.insert_image(&class_png(0, 2), None).unwrap();
    db.set_label(b, Some("x")).unwrap();
    assert_eq!(db.labels().get("x"), Some(&2));
    db.set_label(a, Some("y")).unwrap();
    db.set_label(b, None).unwrap();
    assert_eq!(db.labels().get("x"), None);
    assert_eq!(db.labels().get("y"), Some(&1));
    assert_eq!(db.label(b).unwrap(), None);

    db.remove(a).unwrap();
    assert_eq!(db.len(), 1);
    let hits = db.nearest(&class_png(0, 1), 10).unwrap();
    assert_eq!(hits.len(), 1, "removal is honoured at once");
    assert_eq!(hits[0].id, b);
    assert!(matches!(db.image(a), Err(lookalike::Error::UnknownImage(id)) if id == a));
}

#[test]
fn removal_honoured_by_hnsw() {
    let dir = tempdir();
    let db = open(
        dir.path(),
        relaxed().index(lookalike::IndexKind::Hnsw {
            m: 16,
            ef_search: 32,
        }),
    );
    let bytes: Vec<Vec<u8>> = (0..50u64).map(|i| class_png((i % 4) as u32, i)).collect();
    let ids = db
        .insert_images(bytes.iter().map(|b| (b.as_slice(), None)))
        .unwrap();
    db.remove(ids[0]).unwrap();
    let hits = db.nearest(&bytes[0], 50).unwrap();
    assert_eq!(hits.len(), 49);
    assert!(hits.iter().all(|h| h.id != ids[0]));
}

#[test]
fn ids_are_never_reused() {
    let dir = tempdir();
    let first: ImageId;
    {
        let db = open(dir.path(), Options::default());
        first = db.insert_image(&class_png(0, 1), None).unwrap();
        db.remove(first).unwrap();
    }
    let db = open(dir.path(), Options::default());
    let second = db.insert_image(&class_png(0, 1), None).unwrap();
    assert!(second > first);
}

#[test]
fn db_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Db>();
}
