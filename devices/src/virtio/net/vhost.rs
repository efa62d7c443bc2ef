//! vhost-net: the host kernel moves frames between the guest's rings and the tap, without
//! podvm on the data path. Used for the tap backend where `/dev/vhost-net` can be opened.
//!
//! podvm hands the kernel the guest memory table, each ring's addresses and position, the
//! queue notification eventfds (the same KVM ioeventfds) and an eventfd per queue that the
//! kernel signals when it used buffers; the event loop turns those into the device's
//! interrupt (virtio-mmio has an interrupt status register, so the signal passes through
//! podvm rather than straight to KVM).

use std::fs::File;
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net as KernNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Starting vhost-net failed; the device then moves frames itself.
#[derive(Debug, thiserror::Error)]
#[error("vhost-net: {what}: {source}")]
pub struct VhostError {
    what: &'static str,
    #[source]
    source: vhost::Error,
}

fn step<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostError> {
    r.map_err(|source| VhostError { what, source })
}

type Instance = Arc<KernNet<Arc<GuestMemoryMmap>>>;

/// An open vhost-net instance owned by this process, not yet serving any queue. It is
/// opened while the VM is built, on the main thread: the threads that later start and stop
/// the datapath run under seccomp filters that allow the vhost ioctls but no `open`.
pub struct VhostHandle(Instance);

impl VhostHandle {
    /// Opens /dev/vhost-net for guest memory `mem` and makes this process its owner.
    pub fn open(mem: &GuestMemoryMmap) -> Result<Self, VhostError> {
        let net = step("open /dev/vhost-net", KernNet::new(Arc::new(mem.clone())))?;
        step("set owner", net.set_owner())?;
        Ok(Self(Arc::new(net)))
    }
}

/// The vhost-net instance serving the device's two queues.
pub struct VhostDatapath {
    net: Instance,
    /// Signalled by the kernel when it used buffers of queue 0 (RX) and 1 (TX).
    pub calls: [EventFd; 2],
}

impl VhostDatapath {
    /// Starts the instance `handle` on `queues` (RX, TX) with the `tap`, `kicks` being the
    /// queues' notification eventfds. `acked` are the features the driver accepted. The
    /// instance may have served the queues before (stopped for a migration or a reset):
    /// every ring setting is given again.
    pub fn start(
        handle: &VhostHandle,
        mem: &GuestMemoryMmap,
        acked: u64,
        queues: [&Queue; 2],
        kicks: &[EventFd],
        tap: &File,
    ) -> Result<Self, VhostError> {
        let net = handle.0.clone();
        let supported = step("get features", net.get_features())?;
        step("set features", net.set_features(acked & supported))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        step("set memory table", net.set_mem_table(&regions))?;
        let calls = [
            step(
                "eventfd",
                EventFd::new(libc::EFD_NONBLOCK).map_err(vhost::Error::IOError),
            )?,
            step(
                "eventfd",
                EventFd::new(libc::EFD_NONBLOCK).map_err(vhost::Error::IOError),
            )?,
        ];
        for (index, queue) in queues.iter().enumerate() {
            step("set ring size", net.set_vring_num(index, queue.size()))?;
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: queue.desc_table(),
                used_ring_addr: queue.used_ring(),
                avail_ring_addr: queue.avail_ring(),
                log_addr: None,
            };
            step("set ring addresses", net.set_vring_addr(index, &config))?;
            step(
                "set ring position",
                net.set_vring_base(index, queue.next_avail()),
            )?;
            step("set call eventfd", net.set_vring_call(index, &calls[index]))?;
            step("set kick eventfd", net.set_vring_kick(index, &kicks[index]))?;
        }
        for index in 0..2 {
            step("attach the tap", net.set_backend(index, Some(tap)))?;
        }
        Ok(Self { net, calls })
    }

    /// Stops both rings and returns where the kernel stopped in each (the next available
    /// index it would have taken), so that podvm can go on serving them from there.
    pub fn stop_and_report(mut self) -> [Result<u16, VhostError>; 2] {
        self.stop();
        [0, 1].map(|index| {
            step("get ring position", self.net.get_vring_base(index)).map(|base| base as u16)
        })
    }

    /// Detaches the tap from both queues (the driver reset the device).
    pub fn stop(&mut self) {
        for index in 0..2 {
            if let Err(e) = self.net.set_backend(index, None) {
                tracing::warn!(error = %e, "vhost-net: cannot detach the tap");
            }
        }
    }
}

impl Drop for VhostDatapath {
    fn drop(&mut self) {
        self.stop();
    }
}
