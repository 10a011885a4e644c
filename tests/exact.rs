//! The exact index returns what a brute-force scan over the stored embeddings returns.

use lookalike::{ImageId, IndexKind};

use crate::common::*;

fn brute_force(
    all: &[(ImageId, Vec<f32>)],
    q: &[f32],
    k: usize,
    exclude: Option<ImageId>,
) -> Vec<(ImageId, f32)> {
    let mut scored: Vec<(ImageId, f32)> = all
        .iter()
        .filter(|(id, _)| Some(*id) != exclude)
        .map(|(id, v)| (*id, 1.0 - v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
        .collect();
    scored.sort_by(|a, b| a.1.total_cmp(&b.1));
    scored.truncate(k);
    scored
}

fn assert_same(
    got: &[lookalike::Hit],
    want: &[(ImageId, f32)],
    all: &[(ImageId, Vec<f32>)],
    q: &[f32],
) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.distance - w.1).abs() < 1e-5,
            "distance {} vs brute force {}",
            g.distance,
            w.1
        );
        // Ids must agree except between ties (equal distances up to float rounding), where the
        // order is arbitrary: then the returned id must really be at that distance.
        if g.id != w.0 {
            let v = &all
                .iter()
                .find(|(id, _)| *id == g.id)
                .expect("returned id is stored")
                .1;
            let d = 1.0 - v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
            assert!(
                (d - w.1).abs() < 1e-5,
                "id {} at {d} where brute force has {} at {}",
                g.id,
                w.0,
                w.1
            );
        }
    }
}

#[test]
fn exact_index_matches_brute_force() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed().index(IndexKind::Exact));
    let images: Vec<Vec<u8>> = (0..3000u64).map(|i| class_png((i % 4) as u32, i)).collect();
    for chunk in images.chunks(500) {
        db.insert_images(chunk.iter().map(|b| (b.as_slice(), None)))
            .unwrap();
    }
    assert_eq!(db.index_info().kind, "exact");
    let all: Vec<(ImageId, Vec<f32>)> = db
        .ids()
        .into_iter()
        .map(|id| (id, db.embedding(id).unwrap()))
        .collect();
    assert_eq!(all.len(), 3000);
    for (n, (id, v)) in all.iter().step_by(150).enumerate() {
        let k = 1 + n * 3;
        assert_same(
            &db.nearest_to(*id, k).unwrap(),
            &brute_force(&all, v, k, Some(*id)),
            &all,
            v,
        );
    }
    for seed in 0..10u64 {
        let q = class_png((seed % 4) as u32, 100_000 + seed);
        let qv = db.embed(&[&q]).unwrap().remove(0);
        assert_same(
            &db.nearest(&q, 25).unwrap(),
            &brute_force(&all, &qv, 25, None),
            &all,
            &qv,
        );
    }
}

#[test]
fn hnsw_recall_is_high_on_small_sets() {
    let dir = tempdir();
    let db = open(
        dir.path(),
        relaxed().index(IndexKind::Hnsw {
            m: 32,
            ef_search: 64,
        }),
    );
    let images: Vec<Vec<u8>> = (0..2000u64).map(|i| class_png((i % 4) as u32, i)).collect();
    db.insert_images(images.iter().map(|b| (b.as_slice(), None)))
        .unwrap();
    let all: Vec<(ImageId, Vec<f32>)> = db
        .ids()
        .into_iter()
        .map(|id| (id, db.embedding(id).unwrap()))
        .collect();
    let (mut found, mut total) = (0, 0);
    for seed in 0..20u64 {
        let q = class_png((seed % 4) as u32, 200_000 + seed);
        let qv = db.embed(&[&q]).unwrap().remove(0);
        let want: Vec<ImageId> = brute_force(&all, &qv, 10, None)
            .into_iter()
            .map(|x| x.0)
            .collect();
        let got = db.nearest(&q, 10).unwrap();
        found += got.iter().filter(|h| want.contains(&h.id)).count();
        total += 10;
    }
    let recall = found as f64 / total as f64;
    assert!(recall >= 0.9, "recall@10 {recall}");
}
