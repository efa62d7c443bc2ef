//! Per-disk counters, shared with whoever reports them (the API, later).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-blk device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_requests: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_requests: AtomicU64,
    pub discard_requests: AtomicU64,
    pub write_zeroes_requests: AtomicU64,
    pub get_id_requests: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported_requests: AtomicU64,
    /// Chains that were not valid requests (answered IOERR where possible).
    pub invalid_requests: AtomicU64,
    /// Requests that failed in the backend (answered IOERR).
    pub io_errors: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// Writes to a read-only disk (answered IOERR).
    pub read_only_violations: AtomicU64,
    /// Times the rings were found broken (each then unserved until the driver resets).
    pub broken_queues: AtomicU64,
    /// Passes over the queue that ended on their budget of synchronous work with requests
    /// left (served on the next turn of the event loop).
    pub budget_spent: AtomicU64,
    /// fdatasyncs podvm made after a write, discard or write-zeroes because the driver did
    /// not negotiate FLUSH (it then expects each write durable on completion).
    pub write_through_syncs: AtomicU64,
}

impl BlockMetrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
