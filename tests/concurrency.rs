//! One handle shared by many threads; a second process gets `Error::Locked` promptly.

use std::process::Command;
use std::time::{Duration, Instant};

use lookalike::Options;

use crate::common::*;

#[test]
fn many_threads_insert_and_query() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    db.insert_image(&class_png(0, 0), Some("seed")).unwrap();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..25u64 {
                    let seed = t * 1000 + i;
                    if t % 2 == 0 {
                        mine.push(
                            db.insert_image(&class_png((seed % 4) as u32, seed), Some("t"))
                                .unwrap(),
                        );
                    } else {
                        let hits = db.nearest(&class_png((seed % 4) as u32, seed), 5).unwrap();
                        assert!(!hits.is_empty());
                        for w in hits.windows(2) {
                            assert!(w[0].distance <= w[1].distance);
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut inserted = Vec::new();
    for t in threads {
        inserted.extend(t.join().expect("thread panicked"));
    }
    assert_eq!(inserted.len(), 75);
    inserted.sort();
    inserted.dedup();
    assert_eq!(inserted.len(), 75, "ids are unique");
    assert_eq!(db.len(), 76);
    assert_eq!(db.index_info().len, 76);
    assert_eq!(db.labels().get("t"), Some(&75));
}

#[test]
fn second_process_gets_locked_promptly() {
    let dir = tempdir();
    let db = open(dir.path(), Options::default());
    db.insert_image(&class_png(0, 0), None).unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .arg("stats")
        .arg(dir.path().join("db"))
        .output()
        .expect("run the CLI");
    let waited = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked"), "stderr: {stderr}");
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
    drop(db);
    let out = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .arg("stats")
        .arg(dir.path().join("db"))
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
