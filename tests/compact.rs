//! Compact vectors: the switch to a PCA projection of the active model's own vectors
//! (`Options::compact`, `src/db/compact.rs`), and the format-3 store it upgrades.

use std::fs;
use std::path::Path;

use lookalike::{Db, ImageId, IndexSource, Options};

use crate::common::{class_png, insert_classes, relaxed, tempdir};

/// Whether a query with `id`'s bytes finds it among the 3 nearest at distance 0 (ties
/// between near-identical synthetic images can put another first).
fn finds_itself(db: &Db, id: ImageId) -> bool {
    db.nearest(&db.image(id).unwrap(), 3)
        .unwrap()
        .iter()
        .any(|h| h.id == id && h.distance < 1e-4)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Share of stored images whose nearest other image has their label.
fn label_agreement(db: &Db) -> f64 {
    let ids = db.ids();
    let mut same = 0;
    for id in &ids {
        let nearest = &db.nearest_to(*id, 1).unwrap()[0];
        same += usize::from(nearest.label == db.meta(*id).unwrap().label);
    }
    same as f64 / ids.len() as f64
}

#[test]
fn past_the_threshold_the_model_is_compacted_and_answers_stay() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    let opts = || relaxed().compact(16, 60);
    let first = {
        let db = Db::open_with(&path, opts()).unwrap();
        let ids = insert_classes(&db, 0, 50, 4);
        let before = db.active_model();
        assert_eq!(
            (before.version, before.dim, before.compacted_from),
            (1, 2408, None)
        );
        let full = label_agreement(&db);
        // The write that reaches 60 images compacts.
        insert_classes(&db, 50, 70, 4);
        let m = db.active_model();
        assert_eq!((m.version, m.dim, m.extractor_dim), (2, 16, 2408));
        assert_eq!(m.compacted_from, Some(1));
        assert_eq!(db.index_info().dim, 16);
        assert!(matches!(
            db.index_info().source,
            IndexSource::Rebuilt { .. }
        ));
        assert_eq!(db.index_info().rebuild_error, None);
        let v = db.embedding(ids[3]).unwrap();
        assert_eq!(v.len(), 16);
        assert!((norm(&v) - 1.0).abs() < 1e-4);
        // Stored images find themselves, queries by bytes go through the projection.
        let bytes = db.image(ids[7]).unwrap();
        let hit = &db.nearest(&bytes, 1).unwrap()[0];
        assert_eq!(hit.id, ids[7]);
        assert!(hit.distance < 1e-4, "{}", hit.distance);
        let compact = label_agreement(&db);
        assert!(
            compact >= full - 0.05,
            "label agreement {full} -> {compact}"
        );
        // Both versions are listed; the old one's full-size vectors are gone.
        let models = db.models().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!((models[0].dim, models[0].compacted_from), (2408, None));
        assert_eq!((models[1].dim, models[1].compacted_from), (16, Some(1)));
        // Inserts after the switch are stored compact.
        let later = insert_classes(&db, 70, 75, 4);
        assert_eq!(db.embedding(later[0]).unwrap().len(), 16);
        assert!(finds_itself(&db, later[0]));
        ids[7]
    };
    // Reopened: the compacted model and its snapshot are used as they are.
    let db = Db::open_with(&path, opts()).unwrap();
    assert_eq!(db.active_model().version, 2);
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    let bytes = db.image(first).unwrap();
    assert_eq!(db.nearest(&bytes, 1).unwrap()[0].id, first);

    // Back to the full-size model: every image is embedded again; the next write compacts
    // again by switching to the version already projected from it (no third version).
    db.use_model(1).unwrap();
    assert_eq!(db.active_model().dim, 2408);
    assert_eq!(db.embedding(first).unwrap().len(), 2408);
    insert_classes(&db, 75, 76, 4);
    let m = db.active_model();
    assert_eq!((m.version, m.dim), (2, 16));
    assert_eq!(db.models().unwrap().len(), 2);
    assert_eq!(db.nearest(&bytes, 1).unwrap()[0].id, first);
}

#[test]
fn compaction_is_off_with_dim_zero_and_below_the_threshold() {
    let dir = tempdir();
    let db = Db::open_with(dir.path().join("off.db"), relaxed().compact(0, 10)).unwrap();
    insert_classes(&db, 0, 30, 4);
    assert_eq!(db.active_model().dim, 2408);
    let dir = tempdir();
    let db = Db::open_with(dir.path().join("few.db"), relaxed().compact(16, 40)).unwrap();
    insert_classes(&db, 0, 30, 4);
    assert_eq!(
        (db.active_model().dim, db.models().unwrap().len()),
        (2408, 1)
    );
}

#[test]
fn a_database_written_by_format_3_opens_as_it_was_and_compacts() {
    let dir = tempdir();
    let path = dir.path().join("old.db");
    crate::persistence::fixture("main-v3.db", &path);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let mut sandals: Vec<_> = fs::read_dir(src.join("sandal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    sandals.sort();
    let sandal = fs::read(&sandals[0]).unwrap();
    let db = Db::open_with(&path, Options::default().compact(8, 12)).unwrap();
    // What main stored (id 1 removed): bag 2-6, sandal 7-12, with their sources.
    assert_eq!(db.len(), 11);
    let labels = db.labels();
    assert_eq!((labels["bag"], labels["sandal"]), (5, 6));
    assert_eq!(db.image(ImageId(7)).unwrap(), sandal);
    assert!(db
        .meta(ImageId(7))
        .unwrap()
        .source
        .unwrap()
        .ends_with(".png"));
    assert_eq!(db.index_info().source, IndexSource::Snapshot);
    assert_eq!(db.active_model().dim, 2408);
    assert_eq!(db.nearest(&sandal, 1).unwrap()[0].id, ImageId(7));
    // The twelfth image compacts the upgraded store.
    db.insert_image(&class_png(2, 9), None).unwrap();
    let m = db.active_model();
    assert_eq!((m.version, m.dim, m.compacted_from), (2, 8, Some(1)));
    for id in db.ids() {
        assert!(finds_itself(&db, id), "{id:?}");
    }
    assert_eq!(db.nearest(&sandal, 1).unwrap()[0].id, ImageId(7));
    assert_eq!(db.labels()["sandal"], 6);
}

#[test]
fn a_damaged_projection_is_a_corrupt_record_at_open() {
    let dir = tempdir();
    let path = dir.path().join("c.db");
    {
        let db = Db::open_with(&path, relaxed().compact(16, 60)).unwrap();
        insert_classes(&db, 0, 60, 4);
        assert_eq!(db.active_model().version, 2);
    }
    let key = [&b"projection"[..], &2u32.to_be_bytes()[..]].concat();
    for damage in [vec![1u8, 2, 3], vec![0xff; 40]] {
        {
            let raw = crate::errors::raw_sled(&path);
            let meta = raw.open_tree("meta").unwrap();
            assert!(
                meta.get(&key).unwrap().is_some(),
                "the projection is where format.md says"
            );
            meta.insert(&key[..], damage).unwrap();
            raw.flush().unwrap();
        }
        let err = Db::open_with(&path, relaxed()).unwrap_err();
        assert!(
            matches!(err, lookalike::Error::Corrupt { what: "meta", .. }),
            "{err}"
        );
    }
}
