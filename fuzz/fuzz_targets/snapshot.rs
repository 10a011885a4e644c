#![no_main]
//! Fuzz target: see `lookalike::fuzzing::snapshot`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lookalike::fuzzing::snapshot(data));
