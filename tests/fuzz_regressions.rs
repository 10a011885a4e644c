//! The fuzz targets' seed corpora (`fuzz/corpus/TARGET/`) and every input a fuzz run found to
//! crash or hang (`tests/fixtures/fuzz/TARGET/`, fixed since), run through the same entry
//! points as `cargo fuzz` (`lookalike::fuzzing`) on stable: each must return.

use std::path::Path;

fn run_dir(root: &Path) -> usize {
    let mut ran = 0;
    let Ok(targets) = std::fs::read_dir(root) else {
        return 0;
    };
    for target in targets {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_str().unwrap().to_string();
        let entry: fn(&[u8]) = match name.as_str() {
            "image" => lookalike::fuzzing::image,
            "record" => lookalike::fuzzing::record,
            "weights" => lookalike::fuzzing::weights,
            "checkpoint" => lookalike::fuzzing::checkpoint,
            "snapshot" => lookalike::fuzzing::snapshot,
            other => panic!("{}: no fuzz target {other}", root.display()),
        };
        for input in std::fs::read_dir(&target).unwrap() {
            let path = input.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            eprintln!("{}", path.display());
            entry(&bytes);
            ran += 1;
        }
    }
    ran
}

#[test]
fn fuzz_seeds_and_found_inputs_return() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = run_dir(&root.join("fuzz/corpus"));
    assert!(seeds >= 5, "only {seeds} seed inputs found");
    run_dir(&root.join("tests/fixtures/fuzz"));
}
