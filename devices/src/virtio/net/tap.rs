//! The `tap` backend: an existing tap device, opened by name, for a node agent or CNI plugin
//! that has the privileges to create it. podvm only opens it: a tap made for podvm's user
//! (`ip tuntap add dev NAME mode tap user UID`) opens without any capability, and podvm never
//! changes its MTU or link flags (which would need CAP_NET_ADMIN).
//!
//! Frames cross the tap with the virtio-net header in front (IFF_VNET_HDR, 12 bytes), so
//! checksum and segmentation offloads pass straight between the guest and the host kernel.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use super::backend::NetBackend;
use super::device::MAX_FRAME;
use super::header::HDR_LEN;
use super::metrics::NetMetrics as M;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

/// Frames read from the tap and not yet taken by the guest, at most.
const RX_QUEUE: usize = 256;

/// Opening the tap failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {name}: no such tap device; a privileged agent must create it first, for example `ip tuntap add dev {name} mode tap user $(id -u)` (podvm only opens it)")]
    Missing { name: String },
    #[error("tap {name}: the name is longer than 15 bytes; use the device's real name")]
    Name { name: String },
    #[error(
        "tap {name}: cannot open /dev/net/tun: {source}; the pod needs the device /dev/net/tun"
    )]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: cannot attach: {source}; the tap must belong to podvm's user (`ip tuntap add dev {name} mode tap user UID`) and not be in use")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
pub struct Tap {
    name: String,
    file: File,
    epoll: Epoll,
    rx: VecDeque<Vec<u8>>,
    /// The tap may hold frames not yet read (the queue was full).
    more: bool,
    metrics: Arc<M>,
}

impl Tap {
    /// Opens the existing tap `name` with virtio-net headers.
    pub fn open(name: &str, metrics: Arc<M>) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(TapError::Name { name: name.into() });
        }
        // Attaching to a name that does not exist would create a tap (with privileges) or
        // fail obscurely (without): look first. Asked of the kernel, not of /sys, which may
        // show another network namespace.
        if interface_query(name, libc::SIOCGIFINDEX).is_err() {
            return Err(TapError::Missing { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open /dev/net/tun; TUNSETIFF reads and writes back (the name
        // the kernel chose) an ifreq, and `req` is a correctly sized ifreq, borrowed mutably
        // so the write is no write through a shared reference, that outlives the call.
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `hdr_len` is, for the duration of the call.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if rc < 0 {
            return Err(TapError::Setup {
                name: name.into(),
                what: "cannot set the virtio-net header size",
                source: io::Error::last_os_error(),
            });
        }
        let epoll = Epoll::new().map_err(|source| TapError::Setup {
            name: name.into(),
            what: "cannot create an epoll",
            source,
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                file.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
            )
            .map_err(|source| TapError::Setup {
                name: name.into(),
                what: "cannot watch the tap",
                source,
            })?;
        let tap = Self {
            name: name.into(),
            file,
            epoll,
            rx: VecDeque::new(),
            more: true,
            metrics,
        };
        tap.set_offload(0).map_err(|source| TapError::Setup {
            name: name.into(),
            what: "cannot set offloads",
            source,
        })?;
        Ok(tap)
    }

    /// The tap's MTU as the host configured it (read, never set).
    pub fn mtu(&self) -> u16 {
        interface_query(&self.name, libc::SIOCGIFMTU)
            .ok()
            .and_then(|mtu| u16::try_from(mtu).ok())
            .unwrap_or(1500)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an attached tap.
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags.into()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads what the tap has, up to the queue's size.
    fn fill(&mut self) {
        while self.rx.len() < RX_QUEUE {
            let mut buf = vec![0u8; HDR_LEN + MAX_FRAME];
            match (&self.file).read(&mut buf) {
                Ok(n) if n > HDR_LEN => {
                    buf.truncate(n);
                    self.rx.push_back(buf);
                }
                Ok(_) => M::inc(&self.metrics.rx_dropped),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.more = false;
                    return;
                }
            }
        }
        self.more = true;
    }
}

/// Asks the kernel about interface `name` in this network namespace: its index
/// (SIOCGIFINDEX) or MTU (SIOCGIFMTU), both an int after the name in the ifreq.
/// The pauses before each announcement frame, in milliseconds.
const ANNOUNCE_DELAYS_MS: [u64; 5] = [0, 50, 100, 150, 200];

/// A RARP "request reverse" broadcast from `mac` about itself (RFC 903), padded to the
/// Ethernet minimum: the frame hypervisors send so that switches relearn a moved MAC.
pub fn rarp_announcement(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    f[22..28].copy_from_slice(&mac); // sender hardware address; sender IP stays 0
    f[32..38].copy_from_slice(&mac); // target hardware address; target IP stays 0
    f
}

fn interface_query(name: &str, request: libc::c_ulong) -> io::Result<i32> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a zeroed 40-byte ifreq holding a NUL-terminated name shorter than 16
    // bytes; both requests write one int inside it; the socket is open for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, req.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from_ne_bytes([req[16], req[17], req[18], req[19]]))
}

impl NetBackend for Tap {
    fn vnet_hdr(&self) -> bool {
        true
    }

    fn tap_for_vhost(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn set_external_datapath(&mut self, on: bool) {
        let (op, event) = if on {
            (ControlOperation::Delete, EpollEvent::default())
        } else {
            (
                ControlOperation::Add,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
            )
        };
        if let Err(e) = self.epoll.ctl(op, self.file.as_raw_fd(), event) {
            tracing::warn!(tap = %self.name, error = %e, "cannot change the tap's watch");
        }
        self.rx.clear();
        self.more = !on;
    }

    fn set_guest_features(&mut self, acked: u64) {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        if let Err(e) = self.set_offload(flags) {
            tracing::warn!(tap = %self.name, error = %e, "cannot set the tap's offloads");
        }
    }

    fn send(&mut self, frame: &[u8]) {
        // A tap takes a frame whole or not at all.
        match (&self.file).write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(_) => M::inc(&self.metrics.tx_dropped),
            Err(e) => {
                // A full tap queue or a header the kernel refuses: dropped, as a NIC would.
                tracing::trace!(error = %e, "tap write failed");
                M::inc(&self.metrics.tx_dropped);
            }
        }
    }

    fn announce(&mut self, mac: [u8; 6]) {
        let file = match self.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(tap = %self.name, error = %e, "cannot announce the guest's MAC");
                return;
            }
        };
        let mut frame = vec![0u8; HDR_LEN];
        frame.extend_from_slice(&rarp_announcement(mac));
        let metrics = self.metrics.clone();
        let name = self.name.clone();
        // Five frames over about half a second, like QEMU's self-announce: a switch or
        // bridge that missed the first learns from a later one. Off the event loop, which
        // must not sleep.
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Announce);
                for delay_ms in ANNOUNCE_DELAYS_MS {
                    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                    match (&file).write(&frame) {
                        Ok(n) if n == frame.len() => M::inc(&metrics.announcements),
                        Ok(_) => M::inc(&metrics.tx_dropped),
                        Err(e) => {
                            tracing::debug!(tap = %name, error = %e, "announcement not sent");
                            M::inc(&metrics.tx_dropped);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(tap = %self.name, error = %e, "cannot announce the guest's MAC");
        }
    }

    fn rx_peek(&mut self) -> Option<&[u8]> {
        if self.rx.is_empty() && self.more {
            self.fill();
        }
        self.rx.front().map(Vec::as_slice)
    }

    fn rx_pop(&mut self) {
        self.rx.pop_front();
    }

    fn rx_room(&mut self) {
        if self.more {
            self.fill();
        }
    }

    fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let _ = self.epoll.wait(0, &mut events);
        self.more = true;
        self.fill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_announcement_is_a_broadcast_request_reverse_about_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_announcement(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
