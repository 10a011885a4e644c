//! Sources, metadata, content hashes and duplicate groups through the public API.

use lookalike::{ContentHash, Error, ImageId, ImageMeta, InsertMode, Inserted, Query};
use serde_json::json;

use crate::common::{class_png, noise_png, open, relaxed, tempdir};
use crate::mosaic::{jpeg, mosaic};

fn meta(label: &str, source: &str, metadata: serde_json::Value) -> ImageMeta {
    ImageMeta::label(label)
        .source(source)
        .metadata(metadata)
        .unwrap()
}

#[test]
fn sources_and_metadata_are_stored_returned_and_changed() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let png = class_png(2, 1);
    let m = meta(
        "disc",
        "shop/disc-1.png",
        json!({"sku": "D-1", "price": 12.5}),
    );
    let id = db.insert_image_with(&png, &m).unwrap();
    assert_eq!(db.meta(id).unwrap(), m);
    let info = db.info(id).unwrap();
    assert_eq!(info.hash, ContentHash::of(&png));
    assert_eq!((info.width, info.height), (32, 32));
    // Hits carry source and metadata.
    let hits = db.nearest(&png, 1).unwrap();
    assert_eq!(hits[0].source.as_deref(), Some("shop/disc-1.png"));
    assert_eq!(hits[0].metadata, m.metadata);
    // set_meta replaces all three; the catalogue of labels follows.
    let m2 = ImageMeta {
        label: Some("round".into()),
        source: None,
        metadata: Some(json!({"sku": "D-2"}).as_object().unwrap().clone()),
    };
    db.set_meta(id, &m2).unwrap();
    assert_eq!(db.meta(id).unwrap(), m2);
    assert_eq!(db.labels().get("round"), Some(&1));
    assert_eq!(db.labels().get("disc"), None);
    // set_label keeps source and metadata.
    db.set_label(id, Some("disc")).unwrap();
    assert_eq!(db.meta(id).unwrap().metadata, m2.metadata);
    drop(db);
    // Durable across a reopen.
    let db = open(dir.path(), relaxed());
    assert_eq!(db.meta(id).unwrap().label.as_deref(), Some("disc"));
    assert!(matches!(
        db.meta(ImageId(99)),
        Err(Error::UnknownImage(ImageId(99)))
    ));
}

#[test]
fn bad_metadata_is_refused_and_stores_nothing() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let big = json!({"blob": "x".repeat(20_000)});
    let m = ImageMeta::default().metadata(big).unwrap();
    assert!(matches!(
        db.insert_image_with(&class_png(0, 1), &m),
        Err(Error::MetadataTooLarge { limit: 16384, .. })
    ));
    assert!(matches!(
        ImageMeta::default().metadata(json!([1, 2])),
        Err(Error::InvalidArgument(_))
    ));
    let long_source = ImageMeta::default().source("p".repeat(5000));
    assert!(db
        .insert_image_with(&class_png(0, 1), &long_source)
        .is_err());
    assert!(db.is_empty());
    // In a batch, only the bad item is refused.
    let good = meta("a", "a.png", json!({}));
    let out = db
        .insert_images_with(
            [(&class_png(0, 2)[..], &m), (&class_png(0, 3)[..], &good)],
            InsertMode::Always,
        )
        .unwrap();
    assert!(out[0].is_err() && out[1].is_ok());
    assert_eq!(db.len(), 1);
    // Changing metadata checks it too, and keeps the old.
    let id = out[1].as_ref().unwrap().id();
    assert!(db.set_meta(id, &m).is_err());
    assert_eq!(db.meta(id).unwrap(), good);
}

#[test]
fn queries_filter_on_metadata_and_still_return_k() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let mut items = Vec::new();
    for i in 0..60u64 {
        let colour = ["red", "blue", "green"][(i % 3) as usize];
        items.push((
            class_png((i % 4) as u32, i),
            meta(
                "x",
                &format!("{i}.png"),
                json!({"colour": colour, "n": i % 2, "big": i >= 30}),
            ),
        ));
    }
    let refs: Vec<_> = items.iter().map(|(b, m)| (&b[..], m)).collect();
    db.insert_images_with(refs, InsertMode::Always).unwrap();
    let probe = class_png(1, 999);
    let hits = db
        .nearest_with(&probe, &Query::k(7).metadata("colour", "blue"))
        .unwrap();
    assert_eq!(hits.len(), 7);
    for h in &hits {
        assert_eq!(h.metadata.as_ref().unwrap()["colour"], "blue");
    }
    // Several filters all apply, numbers and booleans too.
    let hits = db
        .nearest_with(
            &probe,
            &Query::k(50).metadata("colour", "red").metadata("big", true),
        )
        .unwrap();
    // i in 30..60 with i % 3 == 0: 10 images.
    assert_eq!(hits.len(), 10);
    let hits = db
        .nearest_with(&probe, &Query::k(50).metadata("n", 1))
        .unwrap();
    assert_eq!(hits.len(), 30);
    // Nothing matches: the typed error names the filter.
    let e = db
        .nearest_with(&probe, &Query::k(3).metadata("colour", "mauve"))
        .unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
    // A value that is not indexed cannot be filtered on.
    assert!(matches!(
        db.nearest_with(&probe, &Query::k(3).metadata("colour", json!(["red"]))),
        Err(Error::InvalidArgument(_))
    ));
    // After a change and a removal the filter follows.
    let blue: Vec<ImageId> = db
        .nearest_with(&probe, &Query::k(20).metadata("colour", "blue"))
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(blue.len(), 20);
    db.remove(blue[0]).unwrap();
    db.set_meta(blue[1], &meta("x", "y", json!({"colour": "red"})))
        .unwrap();
    let hits = db
        .nearest_with(&probe, &Query::k(50).metadata("colour", "blue"))
        .unwrap();
    assert_eq!(hits.len(), 18);
}

#[test]
fn identical_bytes_are_found_by_hash_and_skipped_on_request() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let a = class_png(0, 1);
    let b = class_png(1, 2);
    let first = db.insert_image(&a, Some("a")).unwrap();
    assert_eq!(db.find_by_hash(&ContentHash::of(&a)).unwrap(), vec![first]);
    let m = ImageMeta::default();
    let out: Vec<Inserted> = db
        .insert_images_with(
            [(&a[..], &m), (&b[..], &m), (&b[..], &m)],
            InsertMode::SkipExisting,
        )
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(out[0], Inserted::Existing(first));
    let Inserted::New(b_id) = out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(out[2], Inserted::Existing(b_id));
    assert_eq!(db.len(), 2);
    // Always stores them again; both ids are found.
    let again = db.insert_image(&a, None).unwrap();
    assert_eq!(
        db.find_by_hash(&ContentHash::of(&a)).unwrap(),
        vec![first, again]
    );
    // A removed image is no longer found, nor skipped against.
    db.remove(first).unwrap();
    db.remove(again).unwrap();
    assert!(db.find_by_hash(&ContentHash::of(&a)).unwrap().is_empty());
    let out = db
        .insert_images_with([(&a[..], &m)], InsertMode::SkipExisting)
        .unwrap();
    assert!(matches!(out[0], Ok(Inserted::New(_))));
    // Hashes print and parse as 64 hex digits.
    let h = ContentHash::of(&a);
    assert_eq!(h.to_string().parse::<ContentHash>().unwrap(), h);
    assert!("xyz".parse::<ContentHash>().is_err());
}

#[test]
fn concurrent_skip_existing_inserts_store_bytes_once() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let images: Vec<Vec<u8>> = (0..40).map(|i| class_png(i % 4, i as u64)).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let m = ImageMeta::default();
                let items: Vec<_> = images.iter().map(|b| (&b[..], &m)).collect();
                for r in db
                    .insert_images_with(items, InsertMode::SkipExisting)
                    .unwrap()
                {
                    r.unwrap();
                }
            });
        }
    });
    assert_eq!(db.len(), 40);
}

/// A 128 x 128 photo-like image from the sample's tiles.
fn photo(tiles: &[Vec<u8>], seed: u64) -> image::RgbImage {
    use rand::SeedableRng;
    mosaic(tiles, 128, &mut rand::rngs::StdRng::seed_from_u64(seed))
}

/// A copy as a user's collection has them: re-encoded at quality 75, then by `variant` also
/// scaled to 60 % or 180 %, cropped by 2 pixels (1.6 %) on two sides, or brightened by 6
/// levels. (Crops of 3 pixels come 0.04-0.07 from their originals, around the default
/// distance: docs/benchmarks.md, "Duplicates".)
fn near_copy(img: &image::RgbImage, variant: u32) -> Vec<u8> {
    use image::imageops;
    let (w, h) = img.dimensions();
    let changed = match variant % 5 {
        0 => img.clone(),
        1 => imageops::resize(img, w * 3 / 5, h * 3 / 5, imageops::Triangle),
        2 => imageops::resize(img, w * 9 / 5, h * 9 / 5, imageops::Triangle),
        3 => imageops::crop_imm(img, 2, 2, w - 2, h - 2).to_image(),
        _ => {
            let mut c = img.clone();
            c.pixels_mut()
                .for_each(|p| p.0.iter_mut().for_each(|v| *v = v.saturating_add(6)));
            c
        }
    };
    jpeg(&changed, 75)
}

#[test]
fn near_identical_images_group_and_different_ones_do_not() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let mut tiles = Vec::new();
    for label in ["bag", "sandal", "trouser", "sneaker", "dress"] {
        for e in std::fs::read_dir(sample.join(label)).unwrap() {
            tiles.push(
                image::open(e.unwrap().path())
                    .unwrap()
                    .to_luma8()
                    .into_raw(),
            );
        }
    }
    let originals: Vec<image::RgbImage> = (0..20).map(|s| photo(&tiles, s)).collect();
    let mut pairs = Vec::new();
    for (i, img) in originals.iter().enumerate() {
        let a = db.insert_image(&jpeg(img, 92), None).unwrap();
        let b = db.insert_image(&near_copy(img, i as u32), None).unwrap();
        pairs.push(vec![a, b]);
    }
    // Other images of the same kind, and noise, join no group.
    for s in 100..120 {
        db.insert_image(&jpeg(&photo(&tiles, s), 92), None).unwrap();
    }
    for s in 0..5 {
        db.insert_image(&noise_png(s, 40), None).unwrap();
    }
    let groups = db.duplicates(None).unwrap();
    let found: Vec<Vec<ImageId>> = groups.iter().map(|g| g.ids.clone()).collect();
    assert_eq!(found, pairs);
    for g in &groups {
        assert_eq!(g.distances[0], 0.0);
        assert!(g.distances[1] <= db.default_duplicate_distance());
    }
    // A tiny distance groups byte-identical images only.
    let original = db.image(pairs[0][0]).unwrap();
    let copy = db.insert_image(&original, None).unwrap();
    let groups = db.duplicates(Some(1e-6)).unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].ids, vec![pairs[0][0], copy]);
    assert!(db.duplicates(Some(f32::NAN)).is_err());
    assert!(db.duplicates(Some(-1.0)).is_err());
}
