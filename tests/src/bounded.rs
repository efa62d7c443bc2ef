//! Waits a test makes itself, bounded by the harness's [`run_timeout`]: past it, the test
//! fails as a hang ([`HANG`]), which tests/sandbox/cargo-runner may run once more.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::{run_timeout, thread_report, wait_with_timeout, HANG};

/// Joins `handle` (a helper thread of a test: a server the guest talks to, a fake
/// destination) within [`run_timeout`]; a thread still running then fails the test as a
/// hang. A thread's panic goes on as the test's.
pub fn join_within<T>(handle: std::thread::JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + run_timeout();
    while !handle.is_finished() {
        if Instant::now() > deadline {
            panic!("{HANG} {what} did not finish within {:?}", run_timeout());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    handle
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Waits for `child` (a podvm, or a `podvm console` client) within [`run_timeout`]; one
/// still running then is killed and fails the test as a hang, with its threads.
pub fn wait_within(child: &mut Child, what: &str) -> ExitStatus {
    let never = AtomicBool::new(true);
    if let Some(status) = wait_with_timeout(child, run_timeout(), &never) {
        return status;
    }
    let threads = thread_report(child.id() as i32);
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "{HANG} {what} did not exit within {:?}; killed. Its threads (name, state, kernel \
         wait, system call, kernel stack):\n{threads}",
        run_timeout()
    );
}

/// Reads from `pipe` (a child's stdout or stderr) into `buf`, waiting up to [`run_timeout`]
/// for something to read; nothing by then fails the test as a hang. Returns what `read`
/// returned (0: the end).
pub fn read_within(
    pipe: &mut (impl Read + std::os::fd::AsRawFd),
    buf: &mut [u8],
    what: &str,
) -> std::io::Result<usize> {
    let mut fds = [libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let millis = libc::c_int::try_from(run_timeout().as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is one valid pollfd for the duration of the call, and the length passed
    // is its length; poll only writes its revents.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, millis) };
    if ready < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if ready == 0 {
        panic!("{HANG} nothing from {what} within {:?}", run_timeout());
    }
    pipe.read(buf)
}
