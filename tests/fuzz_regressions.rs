//! Every input the fuzzer ever crashed kdgraph with (tests/fuzz_regressions/*.bin), replayed:
//! each must be refused with the error that names its fault, within a memory bound.

use std::fs;
use std::path::Path;

/// What each recorded input must be refused with: a fragment every error contains, and how many
/// errors (1 where the model itself is refused; else one per refused method and stage).
const EXPECTED: &[(&str, &str, usize)] = &[
    (
        "batchnorm_on_a_vector.bin",
        "reads `fc.b` of rank 1, but needs rank 2 or more",
        1,
    ),
    // The model is fine; the init stage of each of the 11 methods without one is refused.
    (
        "empty_init_stage.bin",
        "no chosen method has an init stage (ab, ft, fsp)",
        11,
    ),
    (
        "empty_tensor_with_huge_dims.bin",
        "initializer `stem.b` declares dims [4, 268435455, 0,",
        1,
    ),
    (
        "tensor_smaller_than_dims.bin",
        "initializer `stem.b` declares dims [4, 43980465111039, 124,",
        1,
    ),
];

/// The peak resident memory of this process so far (Linux), in bytes.
fn peak_memory() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in kB");
    kib * 1024
}

/// The most memory replaying all of them may take (the empty-tensor case once ran out of memory).
const MAX_PEAK_BYTES: u64 = 1 << 30;

#[test]
fn every_recorded_crash_is_refused_with_its_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut count = 0;
    for entry in fs::read_dir(&dir).expect("the regression folder exists") {
        let path = entry.expect("a readable entry").path();
        let bytes = fs::read(&path).expect("a readable regression input");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let &(_, fragment, expected) = EXPECTED
            .iter()
            .find(|(file, _, _)| *file == name)
            .unwrap_or_else(|| panic!("{name}: add its expected error to EXPECTED"));
        let errors = kdgraph::exercise::exercise(&bytes);
        assert_eq!(errors.len(), expected, "{name}: {errors:?}");
        assert!(
            errors.iter().all(|e| e.contains(fragment)),
            "{name}: expected `{fragment}` in every error, got {errors:?}"
        );
        count += 1;
    }
    assert_eq!(count, EXPECTED.len(), "inputs in {}", dir.display());
    let peak = peak_memory();
    assert!(
        peak < MAX_PEAK_BYTES,
        "replaying the regressions peaked at {peak} bytes (bound {MAX_PEAK_BYTES})"
    );
}
