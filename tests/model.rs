//! Model-based test: random sequences of Insert | Remove | SetLabel | Nearest | Reopen checked
//! against a brute-force in-memory model of the database.

use std::collections::BTreeMap;

use lookalike::{Db, ImageId, IndexKind, Options, Query};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::common::*;

struct Model {
    /// id -> (embedding, label)
    images: BTreeMap<ImageId, (Vec<f32>, Option<String>)>,
}

impl Model {
    fn nearest(&self, q: &[f32], k: usize, label: Option<&str>) -> Vec<(ImageId, f32)> {
        let mut v: Vec<(ImageId, f32)> = self
            .images
            .iter()
            .filter(|(_, (_, l))| label.is_none() || l.as_deref() == label)
            .map(|(id, (e, _))| (*id, 1.0 - e.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v.truncate(k);
        v
    }
}

fn run(seed: u64, kind: IndexKind) {
    let dir = tempdir();
    let path = dir.path().join("db");
    let opts = || Options::default().index(kind.clone());
    let mut db = Some(Db::open_with(&path, opts()).unwrap());
    let mut model = Model {
        images: BTreeMap::new(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let labels = [None, Some("a"), Some("b"), Some("c")];
    for step in 0..120 {
        let d = db.as_ref().unwrap();
        match rng.random_range(0..10) {
            0..=3 => {
                let bytes = class_png(rng.random_range(0..4), rng.random());
                let label = labels[rng.random_range(0..4)];
                let id = d.insert_image(&bytes, label).unwrap();
                let e = d.embedding(id).unwrap();
                model.images.insert(id, (e, label.map(str::to_string)));
            }
            4 if !model.images.is_empty() => {
                let i = rng.random_range(0..model.images.len());
                let id = *model.images.keys().nth(i).unwrap();
                d.remove(id).unwrap();
                model.images.remove(&id);
            }
            5 if !model.images.is_empty() => {
                let i = rng.random_range(0..model.images.len());
                let id = *model.images.keys().nth(i).unwrap();
                let label = labels[rng.random_range(0..4)];
                d.set_label(id, label).unwrap();
                model.images.get_mut(&id).unwrap().1 = label.map(str::to_string);
            }
            6 => {
                drop(db.take());
                db = Some(Db::open_with(&path, opts()).unwrap());
            }
            _ => {
                let q = class_png(rng.random_range(0..4), rng.random());
                let qv = d.embed(&[&q]).unwrap().remove(0);
                let k = rng.random_range(1..8);
                let label = labels[rng.random_range(0..4)];
                let query = match label {
                    Some(l) => Query::k(k).labels([l]),
                    None => Query::k(k),
                };
                let want = model.nearest(&qv, k, label);
                match d.nearest_with(&q, &query) {
                    Ok(got) => {
                        assert_eq!(got.len(), want.len(), "step {step}: hit count");
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g.distance - w.1).abs() < 1e-4, "step {step}: distance");
                            assert_eq!(g.label, model.images[&g.id].1, "step {step}: label");
                        }
                    }
                    Err(lookalike::Error::Empty { .. }) => assert!(want.is_empty(), "step {step}"),
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
        }
        let d = db.as_ref().unwrap();
        assert_eq!(d.len(), model.images.len(), "step {step}: len");
    }
}

#[test]
fn model_based_exact() {
    for seed in 0..3 {
        run(seed, IndexKind::Exact);
    }
}

#[test]
fn model_based_hnsw() {
    // Small sets: HNSW with a wide search is exact in practice, and the fallback scan covers
    // filtered queries.
    for seed in 10..13 {
        run(
            seed,
            IndexKind::Hnsw {
                m: 16,
                ef_search: 200,
            },
        );
    }
}
