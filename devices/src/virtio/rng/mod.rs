//! virtio-rng (entropy device, virtio 1.x §5.4): the device (one request queue filled from the
//! host's `getrandom(2)`), the event-loop glue and the counters, one file each. It gives the
//! guest entropy from its first boot seconds (KubeVirt's `spec.domain.devices.rng`).

pub mod device;
pub mod event_handler;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod metrics;

pub use device::{Rng, MAX_REQUEST_BYTES};
pub use metrics::RngMetrics;
