//! virtio-net: the device (features, config space, RX and TX queues), the virtio-net header
//! and checksum helpers, the backend trait, the event-loop glue and the counters, one file
//! each; `user` is the userspace masquerade NAT backend.

pub mod backend;
pub mod device;
pub mod event_handler;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod header;
pub mod metrics;
pub mod tap;
pub mod user;
pub mod vhost;

pub use backend::NetBackend;
pub use device::{Net, NetConfig};
pub use metrics::NetMetrics;
