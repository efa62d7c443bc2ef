//! Pausing, resuming and stopping the vCPU threads from another thread.
//!
//! A vCPU thread checks one atomic flag ("attention") before every `KVM_RUN`; only when it is
//! set does it take the lock and look at what is asked. To reach a thread that is inside
//! `KVM_RUN`, the controller kicks it with the kick signal until it has answered (a kick that
//! lands just before the thread enters `KVM_RUN` is lost, hence the repeat).
//!
//! While paused, the KVM clock is frozen too: it is read when the last vCPU parks and written
//! back on resume, so the guest's monotonic clock does not jump by the time spent paused
//! (wall-clock time is the guest's NTP's business, as after a host suspend).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;

/// The VM's KVM clock, which a pause freezes: read as the vCPUs park, written back as they
/// resume. `VmFd` in podvm; a fake in the unit tests, which have no VM.
trait VmClock {
    fn get_clock(&self) -> Result<kvm_clock_data, kvm_ioctls::Error>;
    fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error>;
}

impl VmClock for VmFd {
    fn get_clock(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
        VmFd::get_clock(self)
    }

    fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
        VmFd::set_clock(self, clock)
    }
}

/// How often a vCPU that has not answered yet is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// How long pausing waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VM's vCPUs are doing, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// Pausing failed; the VM is left running.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("{parked} of {total} vCPUs parked within {timeout_s} s; the VM was left running")]
    Timeout {
        parked: usize,
        total: usize,
        timeout_s: u64,
    },
}

#[derive(Debug, Default)]
struct State {
    stop: bool,
    pause: bool,
    /// vCPU threads waiting in [`VcpuControl::checkpoint`].
    parked: usize,
    /// Threads that have ended (a vCPU that failed, or the guest asked to end).
    ended: usize,
    /// The KVM clock when the VM paused.
    clock: Option<kvm_clock_data>,
    paused_at: Option<Instant>,
    paused_total: Duration,
    /// Work for every parked vCPU thread to do on its own vCPU (migration saves state this
    /// way: KVM wants a vCPU's ioctls from its own thread), and which threads still owe it.
    task: Option<Task>,
    task_pending: Vec<bool>,
}

/// A [`VcpuTask`] in the state (which is `Debug`).
#[derive(Clone)]
struct Task(VcpuTask);

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Task")
    }
}

/// Work a parked vCPU thread runs on its vCPU: `(vCPU id, its fd)`.
pub type VcpuTask = std::sync::Arc<dyn Fn(u8, &kvm_ioctls::VcpuFd) + Send + Sync>;

/// Running a task on the parked vCPUs failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the vCPUs are not paused")]
    NotPaused,
    #[error("a vCPU thread has ended")]
    Ended,
    #[error("{pending} vCPUs did not run the task within {timeout_s} s")]
    Timeout { pending: usize, timeout_s: u64 },
}

/// Shared by the vCPU threads and whoever pauses, resumes or stops them.
pub struct VcpuControl {
    attention: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    /// Thread handles to kick; filled in once the threads exist.
    threads: Mutex<Vec<libc::pthread_t>>,
    count: usize,
    /// Exits of each vCPU to podvm, by kind.
    exits: Vec<ExitCounts>,
}

/// Why a vCPU came back from `KVM_RUN` to podvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O (the serial console, ACPI PM, i8042...).
    Io = 0,
    /// MMIO (virtio-mmio registers, queue notifications without ioeventfd).
    Mmio = 1,
    /// HLT (spurious with the in-kernel LAPIC).
    Hlt = 2,
    /// A signal (a kick: pause, stop, migration) interrupted `KVM_RUN`.
    Interrupted = 3,
    /// Anything else (system events, errors).
    Other = 4,
}

impl ExitKind {
    pub const ALL: [(ExitKind, &'static str); 5] = [
        (ExitKind::Io, "io"),
        (ExitKind::Mmio, "mmio"),
        (ExitKind::Hlt, "hlt"),
        (ExitKind::Interrupted, "interrupted"),
        (ExitKind::Other, "other"),
    ];
}

/// One vCPU's exit counters.
#[derive(Debug, Default)]
pub struct ExitCounts([std::sync::atomic::AtomicU64; 5]);

impl ExitCounts {
    pub fn count(&self, kind: ExitKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: ExitKind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }
}

/// What a vCPU thread should do after a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Run,
    Exit,
}

impl VcpuControl {
    /// Control for `count` vCPUs, running.
    pub fn new(count: usize) -> Self {
        Self {
            attention: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            count,
            exits: (0..count).map(|_| ExitCounts::default()).collect(),
        }
    }

    /// vCPU `id`'s exit counters.
    pub fn exits(&self, id: u8) -> &ExitCounts {
        &self.exits[usize::from(id)]
    }

    /// Every vCPU's exits, by kind name.
    pub fn exit_counts(&self) -> Vec<Vec<(&'static str, u64)>> {
        self.exits
            .iter()
            .map(|c| {
                ExitKind::ALL
                    .iter()
                    .map(|&(k, name)| (name, c.get(k)))
                    .collect()
            })
            .collect()
    }

    /// CPU time of each running vCPU thread, in seconds (empty before they start and
    /// after they stop).
    pub fn cpu_seconds(&self) -> Vec<f64> {
        // The lock is held while reading: a thread leaves the list before it is joined.
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads
            .iter()
            .map(|&thread| {
                let mut clock: libc::clockid_t = 0;
                // SAFETY: `thread` is a live vCPU thread (see above); `clock` is a valid
                // out-pointer.
                if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
                    return 0.0;
                }
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid out-pointer; the clock id came from glibc.
                if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
                    return 0.0;
                }
                ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the vCPU threads, so they can be kicked.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
    }

    /// Whether a vCPU thread has something to do at its next checkpoint (pause or stop).
    pub fn wants_attention(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// Called by vCPU thread `id` before each `KVM_RUN`: parks it while the VM is paused
    /// (running the tasks given meanwhile on `fd`) and says whether it should stop.
    pub fn checkpoint(&self, id: u8, fd: Option<&kvm_ioctls::VcpuFd>) -> Next {
        if !self.attention.load(Ordering::Acquire) {
            return Next::Run;
        }
        let mut state = self.lock();
        if state.pause && !state.stop {
            state.parked += 1;
            self.changed.notify_all();
            while state.pause && !state.stop {
                let mine = state.task_pending.get(usize::from(id)).copied() == Some(true);
                if let (true, Some(Task(task)), Some(fd)) = (mine, state.task.clone(), fd) {
                    drop(state);
                    task(id, fd);
                    state = self.lock();
                    state.task_pending[usize::from(id)] = false;
                    self.changed.notify_all();
                    continue;
                }
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.parked -= 1;
            self.changed.notify_all();
        }
        if state.stop {
            Next::Exit
        } else {
            Next::Run
        }
    }

    /// Called by a vCPU thread as it ends for its own reasons.
    pub fn thread_ended(&self) {
        self.lock().ended += 1;
        self.changed.notify_all();
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for &thread in threads.iter() {
            // SAFETY: the handles are of live or unjoined vCPU threads: `Vm::run` forgets
            // them (`set_threads(vec![])`) before it joins any, so each is still valid; the
            // kick signal has a handler that does nothing.
            unsafe { libc::pthread_kill(thread, super::kick_signal()) };
        }
    }

    /// The vCPUs' state.
    pub fn run_state(&self) -> RunState {
        if self.lock().pause {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Time spent paused so far (including a pause in progress).
    pub fn paused_total(&self) -> Duration {
        let state = self.lock();
        state.paused_total + state.paused_at.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Parks every vCPU and freezes the KVM clock; returns once all are out of the guest.
    /// Pausing a paused VM does nothing.
    pub fn pause(&self, vm: &VmFd) -> Result<(), PauseError> {
        self.pause_with(vm)
    }

    /// [`VcpuControl::pause`] with any [`VmClock`] (unit tests have no VM).
    fn pause_with(&self, vm: &dyn VmClock) -> Result<(), PauseError> {
        let mut state = self.lock();
        if state.stop {
            return Err(PauseError::Stopping);
        }
        if state.pause {
            return Ok(());
        }
        state.pause = true;
        self.attention.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while state.parked + state.ended < self.count && !state.stop {
            let now = Instant::now();
            if now >= deadline {
                let parked = state.parked;
                state.pause = false;
                self.attention.store(state.stop, Ordering::Release);
                self.changed.notify_all();
                return Err(PauseError::Timeout {
                    parked,
                    total: self.count,
                    timeout_s: PAUSE_TIMEOUT.as_secs(),
                });
            }
            drop(state);
            self.kick_all();
            state = self.lock();
            if state.parked + state.ended < self.count {
                state = self
                    .changed
                    .wait_timeout(state, KICK_INTERVAL.min(deadline - now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if state.stop {
            state.pause = false;
            return Err(PauseError::Stopping);
        }
        match vm.get_clock() {
            Ok(clock) => state.clock = Some(clock),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the KVM clock; the guest's clock will jump on resume")
            }
        }
        state.paused_at = Some(Instant::now());
        Ok(())
    }

    /// The KVM clock as the VM paused (None when running).
    pub fn paused_clock(&self) -> Option<kvm_clock_data> {
        self.lock().clock
    }

    /// Has every parked vCPU thread run `task` on its vCPU; returns when all have.
    pub fn run_parked(&self, task: VcpuTask) -> Result<(), TaskError> {
        let mut state = self.lock();
        if !state.pause || state.stop {
            return Err(TaskError::NotPaused);
        }
        if state.ended > 0 {
            return Err(TaskError::Ended);
        }
        state.task = Some(Task(task));
        state.task_pending = vec![true; self.count];
        self.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let pending = state.task_pending.iter().filter(|p| **p).count();
            if pending == 0 {
                state.task = None;
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || state.stop || state.ended > 0 {
                state.task = None;
                state.task_pending.clear();
                return Err(if state.ended > 0 {
                    TaskError::Ended
                } else {
                    TaskError::Timeout {
                        pending,
                        timeout_s: PAUSE_TIMEOUT.as_secs(),
                    }
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Restores the KVM clock and lets the vCPUs run again. Resuming a running VM does
    /// nothing.
    pub fn resume(&self, vm: &VmFd) {
        self.resume_with(vm)
    }

    /// [`VcpuControl::resume`] with any [`VmClock`] (unit tests have no VM).
    fn resume_with(&self, vm: &dyn VmClock) {
        let mut state = self.lock();
        if !state.pause {
            return;
        }
        if let Some(mut clock) = state.clock.take() {
            // Only the value goes back: with KVM_CLOCK_REALTIME KVM would advance it by the
            // time spent paused, which is what freezing it avoids.
            clock.flags = 0;
            if let Err(e) = vm.set_clock(&clock) {
                tracing::warn!(error = %e, "cannot restore the KVM clock; the guest's clock jumps");
            }
        }
        if let Some(at) = state.paused_at.take() {
            state.paused_total += at.elapsed();
        }
        state.pause = false;
        self.attention.store(state.stop, Ordering::Release);
        self.changed.notify_all();
    }

    /// Tells every vCPU thread to end (paused ones too) and kicks them out of the guest.
    pub fn request_stop(&self) {
        let mut state = self.lock();
        state.stop = true;
        self.attention.store(true, Ordering::Release);
        self.changed.notify_all();
        drop(state);
        self.kick_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads that spin on checkpoints like vCPUs, counting their turns.
    fn spinners(
        control: &Arc<VcpuControl>,
        n: usize,
    ) -> (
        Vec<std::thread::JoinHandle<()>>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        let turns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handles = (0..n)
            .map(|_| {
                let control = control.clone();
                let turns = turns.clone();
                std::thread::spawn(move || {
                    while control.checkpoint(0, None) == Next::Run {
                        turns.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        (handles, turns)
    }

    /// A KVM clock without a VM: it reads a fixed value with KVM_CLOCK_REALTIME set (as
    /// KVM reports it) and records every value written back.
    #[derive(Default)]
    struct FakeClock {
        reads: std::sync::atomic::AtomicU64,
        writes: std::sync::Mutex<Vec<kvm_clock_data>>,
    }

    const FROZEN_NS: u64 = 123_456_789;

    impl VmClock for FakeClock {
        fn get_clock(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(kvm_clock_data {
                clock: FROZEN_NS,
                flags: kvm_bindings::KVM_CLOCK_REALTIME,
                ..Default::default()
            })
        }

        fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
            self.writes.lock().unwrap().push(*clock);
            Ok(())
        }
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let control = Arc::new(VcpuControl::new(2));
        let clock = FakeClock::default();
        let (handles, turns) = spinners(&control, 2);

        // The real pause: it returns once every thread is parked, and freezes the clock then.
        control.pause_with(&clock).unwrap();
        assert_eq!(control.run_state(), RunState::Paused);
        assert_eq!(control.lock().parked, 2, "pause returned before all parked");
        assert_eq!(clock.reads.load(Ordering::Relaxed), 1);
        assert_eq!(control.paused_clock().map(|c| c.clock), Some(FROZEN_NS));
        // Pausing again changes nothing.
        control.pause_with(&clock).unwrap();
        assert_eq!(clock.reads.load(Ordering::Relaxed), 1);
        let before = turns.load(Ordering::Relaxed);

        // The real resume: the clock goes back as it was read, without KVM_CLOCK_REALTIME
        // (which would make KVM add the time spent paused), and the threads run again.
        control.resume_with(&clock);
        assert_eq!(control.run_state(), RunState::Running);
        let writes = clock.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!((writes[0].clock, writes[0].flags), (FROZEN_NS, 0));
        assert_eq!(control.paused_clock(), None);
        while turns.load(Ordering::Relaxed) == before {
            std::thread::yield_now();
        }
        // Resuming a running VM changes nothing.
        control.resume_with(&clock);
        assert_eq!(clock.writes.lock().unwrap().len(), 1);
        control.request_stop();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn stop_releases_parked_threads() {
        let control = Arc::new(VcpuControl::new(1));
        let (handles, _) = spinners(&control, 1);
        control.pause_with(&FakeClock::default()).unwrap();
        control.request_stop();
        for h in handles {
            h.join().unwrap();
        }
        assert!(control.lock().stop);
        assert_eq!(control.lock().parked, 0);
    }
}
