//! Fuzz target: any bytes as a model through load, validation, analysis, planning for every
//! method and the assembly of every stage graph. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kdgraph::exercise::exercise(data);
});
