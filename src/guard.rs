//! Running third-party code that may panic on unusual graphs (tract) and turning a panic into
//! an error message, so that kdgraph itself never ends in a panic.

use std::panic::{self, AssertUnwindSafe};

/// Runs `work`; a panic inside it becomes `Err` with the panic's message. The default panic
/// message is not printed meanwhile (kdgraph is single-threaded while it does this).
pub fn catch_panic<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(AssertUnwindSafe(work));
    panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catch_panic(|| 3), Ok(3));
        let v: Vec<u8> = Vec::new();
        let caught = catch_panic(|| v[1]);
        assert!(caught.unwrap_err().contains("index out of bounds"));
    }
}
