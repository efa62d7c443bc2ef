//! virtio-blk: the device (config space, features, queue processing), the request parser, the
//! storage backend, the event-loop glue and the counters, one file each.

pub mod backend;
pub mod device;
pub mod event_handler;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod metrics;
pub mod request;
pub mod uring;

pub use backend::{Disk, DiskOptions, OpenError};
pub use device::{Block, BlockConfig, IoEngine};
pub use metrics::BlockMetrics;
