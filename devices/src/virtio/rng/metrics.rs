//! virtio-rng counters, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the virtio-rng device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Chains the guest posted that the device answered with entropy.
    pub requests: AtomicU64,
    /// Random bytes written into guest buffers.
    pub bytes: AtomicU64,
    /// Chains that were not a list of device-writable buffers in guest memory (a readable
    /// descriptor, a buffer outside guest memory, a loop or a dangling `next`, too many
    /// descriptors): answered with 0 bytes.
    pub bad_chains: AtomicU64,
    /// Requests answered with 0 bytes because the host's `getrandom(2)` failed (its entropy
    /// pool not initialized yet, or an error).
    pub entropy_errors: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// Times the driver broke the queue's rings (an avail index more than a queue size
    /// ahead, rings that cannot be read): once per breakage, however often the driver kicks
    /// the queue afterwards, since the device serves nothing more until the driver resets it.
    pub broken_queues: AtomicU64,
}

impl RngMetrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
