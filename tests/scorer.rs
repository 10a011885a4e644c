//! Re-ranking with a pair scorer and `Db::same`.

use std::sync::Arc;

use lookalike::lookalike_plugin::candle_core::{Device, Tensor};
use lookalike::lookalike_plugin::nn::Optimiser;
use lookalike::mlp_diff::MlpDiffTrainable;
use lookalike::{Error, Query};

use crate::common::*;

#[test]
fn rerank_and_same_with_a_trained_scorer() {
    let dir = tempdir();
    let db = open(dir.path(), relaxed());
    let labels = ["h", "v", "disc", "diag"];
    let imgs: Vec<Vec<u8>> = (0..80u64).map(|i| class_png((i % 4) as u32, i)).collect();
    let ids = db
        .insert_images(
            imgs.iter()
                .enumerate()
                .map(|(i, b)| (b.as_slice(), Some(labels[i % 4]))),
        )
        .unwrap();
    let dim = db.active_model().dim;

    // Train a scorer on pairs of stored embeddings (same class = 1).
    let emb: Vec<Vec<f32>> = ids.iter().map(|id| db.embedding(*id).unwrap()).collect();
    let (mut a, mut b, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..80 {
        for j in [i + 4, i + 1] {
            let j = j % 80;
            a.extend_from_slice(&emb[i]);
            b.extend_from_slice(&emb[j]);
            y.push(u32::from(i % 4 == j % 4));
        }
    }
    let n = y.len();
    let a = Tensor::from_vec(a, (n, dim), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(b, (n, dim), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(y, n, &Device::Cpu).unwrap();
    let t = MlpDiffTrainable::new(dim, "", None).unwrap();
    let mut opt = t.optimizer(0.02);
    for _ in 0..40 {
        opt.backward_step(&t.loss(&a, &b, &y).unwrap()).unwrap();
    }
    let scorer = Arc::new(t.freeze().unwrap());

    let same = db.same(ids[0], ids[4], scorer.as_ref()).unwrap();
    let diff = db.same(ids[0], ids[1], scorer.as_ref()).unwrap();
    assert!(same > diff, "same class {same} vs different {diff}");

    let hits = db
        .nearest_with(&class_png(2, 4242), &Query::k(5).rerank(scorer.clone(), 20))
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.score.is_some()));
    for w in hits.windows(2) {
        assert!(w[0].score >= w[1].score, "ordered by P(same)");
    }
    assert!(
        hits.iter()
            .filter(|h| h.label.as_deref() == Some("disc"))
            .count()
            >= 4
    );

    // A scorer for another dimension is a typed error.
    let wrong = Arc::new(
        MlpDiffTrainable::new(dim + 1, "", None)
            .unwrap()
            .freeze()
            .unwrap(),
    );
    let err = db
        .nearest_with(&class_png(2, 1), &Query::k(3).rerank(wrong.clone(), 10))
        .unwrap_err();
    assert!(matches!(err, Error::DimensionMismatch { .. }), "{err}");
    assert!(matches!(
        db.same(ids[0], ids[1], wrong.as_ref()),
        Err(Error::DimensionMismatch { .. })
    ));
    assert!(matches!(
        db.same(ids[0], lookalike::ImageId(99_999), scorer.as_ref()),
        Err(Error::UnknownImage(_))
    ));
}
