#![no_main]
//! Fuzz target: see `lookalike::fuzzing::weights`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lookalike::fuzzing::weights(data));
