//! The `lookalike` binary end to end: add a folder with folder labels, query, stats, remove;
//! train, models, use.

use std::process::Command;

use crate::common::*;

fn cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .args(args)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn add_query_stats_remove() {
    let dir = tempdir();
    let photos = dir.path().join("photos");
    for (class, name) in [(0, "stripes"), (2, "discs")] {
        std::fs::create_dir_all(photos.join(name)).unwrap();
        for i in 0..5u64 {
            std::fs::write(
                photos.join(name).join(format!("{i}.png")),
                class_png(class, i),
            )
            .unwrap();
        }
    }
    std::fs::write(photos.join("stripes/broken.png"), b"not a png").unwrap();
    let db = dir.path().join("db");
    let (ok, out, err) = cli(&[
        "add".as_ref(),
        db.as_os_str(),
        photos.as_os_str(),
        "--folder-labels".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("added 10"), "{out}");
    assert!(
        err.contains("broken.png"),
        "the bad file is reported: {err}"
    );

    let q = dir.path().join("q.png");
    std::fs::write(&q, class_png(2, 77)).unwrap();
    let (ok, out, err) = cli(&[
        "query".as_ref(),
        db.as_os_str(),
        q.as_os_str(),
        "-k".as_ref(),
        "3".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(ok, "{err}");
    let hits: serde_json::Value = serde_json::from_str(&out).unwrap();
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h["label"] == "discs"), "{out}");
    let first = hits[0]["id"].as_u64().unwrap().to_string();

    let (ok, out, _) = cli(&["stats".as_ref(), db.as_os_str(), "--json".as_ref()]);
    assert!(ok);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["images"], 10);
    assert_eq!(stats["labels"]["stripes"], 5);

    let (ok, _, err) = cli(&["remove".as_ref(), db.as_os_str(), first.as_ref()]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["remove".as_ref(), db.as_os_str(), first.as_ref()]);
    assert!(!ok);
    assert!(err.contains("no image with id"), "{err}");
    let (ok, _, err) = cli(&[
        "query".as_ref(),
        dir.path().join("nope").as_os_str(),
        q.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("not a lookalike database"), "{err}");
}

#[test]
fn train_models_use() {
    let dir = tempdir();
    let db = dir.path().join("db");
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist-sample");
    let (ok, _, err) = cli(&[
        "add".as_ref(),
        db.as_os_str(),
        sample.as_os_str(),
        "--folder-labels".as_ref(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&[
        "train".as_ref(),
        db.as_os_str(),
        "simnet".as_ref(),
        "--epochs".as_ref(),
        "1".as_ref(),
        "--seed".as_ref(),
        "3".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("model v2 (simnet") && out.contains("now active"),
        "{out}"
    );
    assert!(out.contains("held-out accuracy@1"), "{out}");
    let (ok, out, _) = cli(&["models".as_ref(), db.as_os_str()]);
    assert!(ok);
    assert!(
        out.contains("* v2 simnet") && out.contains("  v1 classic"),
        "{out}"
    );
    let (ok, out, _) = cli(&["use".as_ref(), db.as_os_str(), "1".as_ref()]);
    assert!(ok && out.contains("v1 is active"), "{out}");
    // Bad requests fail with a message, not a panic.
    let (ok, _, err) = cli(&["train".as_ref(), db.as_os_str(), "classic".as_ref()]);
    assert!(!ok && err.contains("cannot be trained"), "{err}");
    let (ok, _, err) = cli(&[
        "train".as_ref(),
        db.as_os_str(),
        "simnet".as_ref(),
        "--miner".as_ref(),
        "x".as_ref(),
    ]);
    assert!(!ok && err.contains("unknown miner"), "{err}");
}
