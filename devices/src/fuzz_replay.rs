//! Replaying a committed fuzz corpus as a unit test: every input runs without a panic and
//! within a time limit, and the corpus is not empty (a test that counted the files it
//! expected would pass a corpus that lost its finds, or fail one that gained some). One
//! helper for every crate with fuzz targets (devices, vmm, launcher), so each replay checks
//! the same thing.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Per-input time limit when replaying (a debug build serves any input in milliseconds):
/// past it, the input is reported as a hang.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f` on a thread; panics, naming `what`, if `f` panics or is still running after
/// [`REPLAY_TIMEOUT`].
pub fn within_time_limit(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(REPLAY_TIMEOUT) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            panic!("{what}: panicked");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {REPLAY_TIMEOUT:?} (hang)")
        }
    }
}

/// Runs `f` over every file in `dir` (in name order), each within the time limit; panics if
/// `dir` holds no file. Returns how many inputs ran.
pub fn replay_dir(dir: &Path, f: fn(&[u8])) -> usize {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        within_time_limit(&path.display().to_string(), move || f(&data));
    }
    files.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_dir_names_the_input_that_panics() {
        let dir = std::env::temp_dir().join(format!("podvm-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("fine"), b"ok").unwrap();
        std::fs::write(dir.join("bad"), b"boom").unwrap();
        let outcome = std::panic::catch_unwind(|| {
            replay_dir(&dir, |data| assert_ne!(data, b"boom"));
        });
        let message = outcome
            .unwrap_err()
            .downcast::<String>()
            .map(|s| *s)
            .unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(message.ends_with("bad: panicked"), "{message}");
    }

    #[test]
    fn replay_dir_refuses_an_empty_corpus() {
        let dir = std::env::temp_dir().join(format!("podvm-replay-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let outcome = std::panic::catch_unwind(|| replay_dir(&dir, |_| {}));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(outcome.is_err());
    }
}
