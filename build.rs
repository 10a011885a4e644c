//! Compiles `src/index/hnsw.cpp` (lookalike's one-query HNSW search, distance kernels and
//! growth) and `src/index/mapped.cpp` (snapshots read with their vectors mapped) against the
//! FAISS that faiss-sys builds (its headers; the code links with faiss-sys's libfaiss).
//!
//! faiss-sys installs FAISS's headers in its own build folder and does not announce where, so
//! they are looked for beside this package's build folder (`target/<profile>/build/faiss-sys-*/
//! out/include`), the newest first. `LOOKALIKE_FAISS_INCLUDE` names the folder instead (one
//! that holds `faiss/IndexHNSW.h` of FAISS 1.12.0). The C++ file checks the FAISS version.

use std::path::{Path, PathBuf};

const SOURCES: [&str; 2] = ["src/index/hnsw.cpp", "src/index/mapped.cpp"];

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LOOKALIKE_FAISS_INCLUDE");
    let include = match std::env::var_os("LOOKALIKE_FAISS_INCLUDE") {
        Some(dir) => PathBuf::from(dir),
        None => match faiss_sys_include() {
            Some(dir) => dir,
            None => {
                eprintln!(
                    "lookalike's build did not find the FAISS headers that faiss-sys installs \
                     (looked for build/faiss-sys-*/out/include/faiss/IndexHNSW.h near {}). \
                     Set LOOKALIKE_FAISS_INCLUDE to that include folder.",
                    std::env::var("OUT_DIR").unwrap_or_default()
                );
                std::process::exit(1);
            }
        },
    };
    println!(
        "cargo:rerun-if-changed={}",
        include.join("faiss/IndexHNSW.h").display()
    );
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(&include)
        .files(SOURCES)
        .opt_level(3)
        .warnings(false)
        .compile("lookalike_hnsw");
}

/// The include folder of faiss-sys's FAISS build in this target folder: the build folder that
/// holds this package's `OUT_DIR` is searched for `faiss-sys-*/out/include`, newest first.
fn faiss_sys_include() -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?);
    // OUT_DIR is <build>/lookalike-<hash>/out.
    let build = out.parent()?.parent()?;
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(build).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("faiss-sys-") {
            continue;
        }
        let include = entry.path().join("out").join("include");
        if let Some(time) = modified(&include.join("faiss").join("IndexHNSW.h")) {
            found.push((time, include));
        }
    }
    found.sort();
    found.pop().map(|(_, dir)| dir)
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}
