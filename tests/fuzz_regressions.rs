//! Every input the fuzzer ever crashed kdgraph with (tests/fuzz_regressions/*.bin), replayed.

use std::fs;
use std::path::Path;

#[test]
fn no_recorded_crash_comes_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut count = 0;
    for entry in fs::read_dir(&dir).expect("the regression folder exists") {
        let path = entry.expect("a readable entry").path();
        let bytes = fs::read(&path).expect("a readable regression input");
        let result = std::panic::catch_unwind(|| kdgraph::exercise::exercise(&bytes));
        assert!(result.is_ok(), "{} panics again", path.display());
        count += 1;
    }
    assert!(count > 0, "no regression inputs in {}", dir.display());
}
