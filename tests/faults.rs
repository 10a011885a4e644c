//! Faults under the store, injected with `tests/faults/eio.c` (an `LD_PRELOAD` layer over
//! fsync, fdatasync, write and pwrite64) into the release `lookalike` binary: a disk that
//! returns EIO while the pack files, sled's log or sled's other files are written. Skipped
//! with a message where no C compiler is found.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Builds the fault layer into `dir`; `None` without a C compiler.
fn build_layer(dir: &Path) -> Option<std::path::PathBuf> {
    let out = dir.join("eio.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/eio.c");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(out)
}

fn lookalike(args: &[&std::ffi::OsStr], fault: Option<(&Path, &str)>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lookalike"));
    cmd.args(args);
    if let Some((layer, path)) = fault {
        cmd.env("LD_PRELOAD", layer)
            .env("EIO_PATH", path)
            .env("EIO_AFTER", "0");
    }
    let out = cmd.output().expect("run lookalike");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn eio_while_writing_is_an_error_and_loses_nothing() {
    let dir = tempdir();
    let Some(layer) = build_layer(dir.path()) else {
        eprintln!("no C compiler (cc): eio_while_writing_is_an_error_and_loses_nothing not run");
        return;
    };
    let (first, second) = (dir.path().join("a"), dir.path().join("b"));
    for (folder, seed) in [(&first, 0), (&second, 100)] {
        std::fs::create_dir_all(folder).unwrap();
        for i in 0..3 {
            // 120 x 120 noise: about 43 KB, stored in a pack file.
            std::fs::write(folder.join(format!("{i}.png")), noise_png(seed + i, 120)).unwrap();
            std::fs::write(
                folder.join(format!("s{i}.png")),
                class_png(i as u32, seed + i),
            )
            .unwrap();
        }
    }
    for target in ["/images/", "/store/db", "/store/"] {
        let db = dir.path().join(format!("db{}", target.replace('/', "_")));
        let (code, out) = lookalike(&["add".as_ref(), db.as_os_str(), first.as_os_str()], None);
        assert_eq!(code, Some(0), "{out}");
        // The disk fails while the second folder is written: a storage error, exit code 2.
        let (code, out) = lookalike(
            &["add".as_ref(), db.as_os_str(), second.as_os_str()],
            Some((&layer, target)),
        );
        assert_eq!(code, Some(2), "EIO on {target}: {out}");
        assert!(out.contains("Input/output error"), "EIO on {target}: {out}");
        // Without the fault: what was acknowledged is there, and writes work again.
        let (code, out) = lookalike(&["stats".as_ref(), db.as_os_str()], None);
        assert_eq!(code, Some(0), "{out}");
        let images: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("images"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            images >= 6,
            "EIO on {target}: {images} images after the fault\n{out}"
        );
        let (code, out) = lookalike(&["add".as_ref(), db.as_os_str(), second.as_os_str()], None);
        assert_eq!(code, Some(0), "after EIO on {target}: {out}");
    }
}
