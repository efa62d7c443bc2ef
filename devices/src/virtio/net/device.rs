//! The virtio-net device: features, configuration space, and moving frames between the
//! guest's RX/TX queues and a [`NetBackend`].

use std::io::Read;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::header::{rx_header, TxHeader, F_DATA_VALID, HDR_LEN};
use super::metrics::NetMetrics as M;
use crate::virtio::{
    ActivateError, Interrupt, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// virtio device ID of a network card.
pub const TYPE_NET: u32 = 1;
/// Size of the RX and of the TX queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue, then the transmit queue.
pub const RX: usize = 0;
pub const TX: usize = 1;
/// Most TX frames one pass sends before the event loop turns (a queue's worth).
pub const TX_PASS_FRAMES: usize = QUEUE_SIZE as usize;
/// Largest Ethernet frame podvm moves: a 65535-byte IP packet, the Ethernet header and a
/// VLAN tag.
pub const MAX_FRAME: usize = 65_535 + 14 + 4;

/// Per-device settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU the device advertises (VIRTIO_NET_F_MTU).
    pub mtu: u16,
    /// Whether frames for the guest carry valid checksums (offered as DATA_VALID when the
    /// guest accepts GUEST_CSUM, so it does not check them again).
    pub rx_checksums_valid: bool,
    /// Let vhost-net move the frames when the backend is a tap and /dev/vhost-net opens.
    pub vhost: bool,
}

/// Virtio-net configuration space (virtio 1.x §5.1.4).
mod cfg {
    pub const MAC: usize = 0;
    pub const STATUS: usize = 6;
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    pub const MTU: usize = 10;
    pub const LEN: usize = 12;
}

pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub interrupt: Arc<Interrupt>,
}

/// One virtio-net device.
pub struct Net {
    config: NetConfig,
    config_space: [u8; cfg::LEN],
    avail_features: u64,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    pub(crate) activate_event: EventFd,
    pub(crate) active: Option<Active>,
    pub(crate) queues_watched: bool,
    pub(crate) backend: Box<dyn NetBackend>,
    pub(crate) vhost: Option<super::vhost::VhostDatapath>,
    /// The vhost-net instance opened at build time ([`Net::open_vhost`]), if any.
    vhost_handle: Option<super::vhost::VhostHandle>,
    /// A reset took the queues from vhost-net: the event loop has the backend watch the
    /// tap again.
    pub(crate) backend_rewatch: bool,
    /// Receive buffers taken from the ring, waiting for a frame.
    rx_held: std::collections::VecDeque<RxBuf>,
    /// Frozen for a migration: neither queue is served.
    pub(crate) frozen: bool,
    /// Queues (RX, TX) whose rings were found broken: logged and counted once, not served
    /// until the driver resets the device; frames for a broken RX queue are dropped, as on a
    /// link that is down. Not carried by a migration (a destination finds them broken again).
    broken: [bool; 2],
    /// The broken-queue line (a guest can break a queue again after every reset).
    broken_log: crate::log_limit::LogLimit,
    /// A migration is under way: podvm moves the frames itself (vhost-net's writes into
    /// guest memory would escape the dirty log).
    pub(crate) vhost_held: bool,
    tx_buf: Vec<u8>,
    metrics: Arc<M>,
}

impl Net {
    /// A device whose frames go to and come from `backend`.
    pub fn new(
        config: NetConfig,
        backend: Box<dyn NetBackend>,
        metrics: Arc<M>,
    ) -> std::io::Result<Self> {
        let mut avail_features = F_VERSION_1
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM;
        if backend.vnet_hdr() {
            // The backend takes and gives segments up to 64 KiB with partial checksums.
            avail_features |= 1 << VIRTIO_NET_F_HOST_TSO4
                | 1 << VIRTIO_NET_F_HOST_TSO6
                | 1 << VIRTIO_NET_F_HOST_ECN
                | 1 << VIRTIO_NET_F_GUEST_TSO4
                | 1 << VIRTIO_NET_F_GUEST_TSO6
                | 1 << VIRTIO_NET_F_GUEST_ECN;
        }
        let mut space = [0u8; cfg::LEN];
        space[cfg::MAC..cfg::MAC + 6].copy_from_slice(&config.mac);
        space[cfg::STATUS..cfg::STATUS + 2]
            .copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        space[cfg::MAX_VIRTQUEUE_PAIRS..cfg::MAX_VIRTQUEUE_PAIRS + 2]
            .copy_from_slice(&1u16.to_le_bytes());
        space[cfg::MTU..cfg::MTU + 2].copy_from_slice(&config.mtu.to_le_bytes());
        Ok(Self {
            config,
            config_space: space,
            avail_features,
            acked_features: 0,
            queue_events: vec![
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            activate_event: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            queues_watched: false,
            backend,
            vhost: None,
            vhost_handle: None,
            backend_rewatch: false,
            rx_held: std::collections::VecDeque::new(),
            frozen: false,
            broken: [false; 2],
            broken_log: Default::default(),
            vhost_held: false,
            tx_buf: Vec::with_capacity(HDR_LEN + MAX_FRAME),
            metrics,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<M> {
        self.metrics.clone()
    }

    /// The device's settings.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Opens the vhost-net instance this device will hand its queues to, if it is set to use
    /// vhost-net and its backend can. Called while the VM is built (before any thread is
    /// filtered); where /dev/vhost-net cannot be opened the device moves frames itself.
    pub fn open_vhost(&mut self, mem: &GuestMemoryMmap) {
        if !self.config.vhost || self.backend.tap_for_vhost().is_none() {
            return;
        }
        match super::vhost::VhostHandle::open(mem) {
            Ok(handle) => self.vhost_handle = Some(handle),
            Err(e) => tracing::warn!(error = %e, "vhost-net unavailable; podvm moves the frames"),
        }
    }

    /// Hands the queues to vhost-net when the backend allows it; false if the device moves
    /// the frames itself.
    pub(crate) fn start_vhost(&mut self) -> bool {
        if self.vhost_held || self.vhost.is_some() {
            return self.vhost.is_some();
        }
        let (Some(handle), Some(active), Some(tap)) = (
            self.vhost_handle.as_ref(),
            self.active.as_ref(),
            self.backend.tap_for_vhost(),
        ) else {
            return false;
        };
        match super::vhost::VhostDatapath::start(
            handle,
            &active.mem,
            self.acked_features,
            [&active.rx, &active.tx],
            &self.queue_events,
            tap,
        ) {
            Ok(datapath) => {
                self.vhost = Some(datapath);
                self.backend.set_external_datapath(true);
                M::set(&self.metrics.vhost_active, 1);
                tracing::info!("vhost-net moves this NIC's frames");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "vhost-net unavailable; podvm moves the frames");
                false
            }
        }
    }

    /// Takes the queues back from vhost-net: podvm serves them from where the kernel
    /// stopped (its next available index; the used index is the ring's own). Returns false
    /// if the kernel could not say where it stopped (the device then waits for a reset, as
    /// with a broken queue).
    pub(crate) fn take_back_from_vhost(&mut self) -> bool {
        let Some(vhost) = self.vhost.take() else {
            return true;
        };
        self.backend.set_external_datapath(false);
        M::set(&self.metrics.vhost_active, 0);
        let positions = vhost.stop_and_report();
        let Some(active) = self.active.as_mut() else {
            return true;
        };
        let mut ok = true;
        for (queue, position) in [&mut active.rx, &mut active.tx].into_iter().zip(positions) {
            match position {
                Ok(next_avail) => queue.set_next_avail(next_avail),
                Err(e) => {
                    tracing::error!(error = %e, "vhost-net did not say where it stopped");
                    ok = false;
                }
            }
            match queue.used_idx(&active.mem, std::sync::atomic::Ordering::Acquire) {
                Ok(used) => queue.set_next_used(used.0),
                Err(e) => {
                    tracing::error!(error = ?e, "cannot read the used index vhost-net left");
                    ok = false;
                }
            }
        }
        if !ok {
            self.active = None;
            return false;
        }
        tracing::info!("podvm moves this NIC's frames again (vhost-net stopped for a migration)");
        // What vhost-net used last may not have been signalled yet.
        if let Err(e) = active.interrupt.signal_used_queue() {
            tracing::warn!(error = %e, "virtio-net interrupt failed");
        }
        true
    }

    /// Buffers taken from the RX ring and not used go back to it.
    pub(crate) fn return_rx_buffers(&mut self) {
        if let Some(active) = self.active.as_mut() {
            for _ in self.rx_held.drain(..) {
                active.rx.go_to_previous_position();
            }
        }
    }

    /// vhost-net used buffers of `queue`: interrupt the guest.
    pub(crate) fn vhost_used(&mut self, queue: usize) {
        if let Some(v) = &self.vhost {
            let _ = v.calls[queue].read();
        }
        if let Some(active) = &self.active {
            M::inc(&self.metrics.interrupts);
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-net interrupt failed");
            }
        }
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Marks queue `q` broken: one warning and one count until the driver resets the device.
    fn break_queue(&mut self, q: usize) {
        if !self.broken[q] {
            self.broken[q] = true;
            M::inc(&self.metrics.broken_queues);
            crate::warn_limited!(
                self.broken_log,
                queue = if q == RX { "RX" } else { "TX" },
                "virtio-net queue is broken; it is not served until the driver resets the device"
            );
        }
    }

    /// Sends the frames the guest queued to the backend, at most [`TX_PASS_FRAMES`] a pass:
    /// a guest that keeps the ring full from another vCPU would otherwise hold the event
    /// loop here for ever. A pass that spent its budget leaves notifications off and kicks
    /// the TX queue's eventfd itself, so the loop serves everything else before the rest.
    /// Returns false if the queue is broken (logged and counted once; the queue then waits
    /// for a reset).
    pub(crate) fn process_tx(&mut self) -> bool {
        if self.broken[TX] {
            return false;
        }
        if self.frozen {
            return true;
        }
        let Some(mut active) = self.active.take() else {
            return true;
        };
        let mut used_any = false;
        let mut empty_passes = 0;
        let mut budget = TX_PASS_FRAMES;
        let healthy = loop {
            if active.tx.disable_notification(&active.mem).is_err() {
                break false;
            }
            let mut popped = false;
            let raw = self.backend.vnet_hdr();
            while budget > 0 {
                let Some(chain) = active.tx.pop_descriptor_chain(&active.mem) else {
                    break;
                };
                budget -= 1;
                popped = true;
                let head = chain.head_index();
                match read_chain(&active.mem, chain, &mut self.tx_buf, raw) {
                    Ok(()) => {
                        M::inc(&self.metrics.tx_frames);
                        M::add(&self.metrics.tx_bytes, (self.tx_buf.len() - HDR_LEN) as u64);
                        if raw {
                            self.backend.send(&self.tx_buf);
                        } else {
                            self.backend.send(&self.tx_buf[HDR_LEN..]);
                        }
                    }
                    Err(e) => {
                        M::inc(&self.metrics.tx_invalid);
                        tracing::debug!(error = %e, "invalid virtio-net TX chain");
                    }
                }
                if active.tx.add_used(&active.mem, head, 0).is_err() {
                    M::inc(&self.metrics.tx_invalid);
                }
                used_any = true;
            }
            if budget == 0 {
                // Notifications stay off; the eventfd brings the loop back for the rest.
                M::inc(&self.metrics.tx_budget_spent);
                if let Err(e) = self.queue_events[TX].write(1) {
                    tracing::error!(error = %e, "cannot reschedule the virtio-net TX queue");
                }
                break true;
            }
            match active.tx.enable_notification(&active.mem) {
                Ok(true) => {
                    // See virtio-blk: two empty passes in a row mean a ring that lies.
                    empty_passes = if popped { 0 } else { empty_passes + 1 };
                    if empty_passes == 2 {
                        break false;
                    }
                }
                Ok(false) => break true,
                Err(_) => break false,
            }
        };
        self.active = Some(active);
        if !healthy {
            self.break_queue(TX);
        }
        // The backend answers what it was given (an ARP reply, a SYN-ACK, a loopback
        // connection's data) before the guest hears of it: the TX queue's used buffers and
        // the answers then cost the guest one interrupt, not two (each is an injection, a
        // status read and an acknowledgement, all exits).
        self.backend.flush();
        let delivered = self.fill_rx();
        self.notify(used_any, delivered);
        healthy
    }

    /// Hands the guest the frames the backend has for it, as long as the guest has buffers.
    pub(crate) fn deliver_rx(&mut self) {
        let delivered = self.fill_rx();
        self.notify(false, delivered);
    }

    /// Writes what the backend has into receive buffers; true if the RX queue has new used
    /// buffers (the driver is not told here).
    fn fill_rx(&mut self) -> bool {
        if self.frozen {
            return false;
        }
        if self.broken[RX] && self.active.is_some() {
            self.drop_rx_frames();
            self.backend.rx_room();
            return false;
        }
        let Some(mut active) = self.active.take() else {
            return false;
        };
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let flags = if self.config.rx_checksums_valid && self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            F_DATA_VALID
        } else {
            0
        };
        let raw = self.backend.vnet_hdr();
        let mut delivered = false;
        let mut broken = false;
        // Where the last wait for buffers found the ring: a second wait at the same place,
        // with the driver still claiming more, is a ring that lies (an avail index far ahead:
        // nothing can be popped, and asking again would spin here for ever).
        let mut last_wait = None;
        while let Some(buf) = self.backend.rx_peek() {
            let (header, frame) = if raw {
                // The backend's own header (offloads), num_buffers set below.
                let mut h = [0u8; HDR_LEN];
                h.copy_from_slice(&buf[..HDR_LEN]);
                (h, &buf[HDR_LEN..])
            } else {
                (rx_header(flags, 1), buf)
            };
            match write_frame(&mut active, &mut self.rx_held, header, frame, mergeable) {
                Delivery::Done(n) => {
                    M::inc(&self.metrics.rx_frames);
                    M::add(&self.metrics.rx_bytes, n as u64);
                    self.backend.rx_pop();
                    delivered = true;
                }
                Delivery::Dropped => {
                    M::inc(&self.metrics.rx_dropped);
                    self.backend.rx_pop();
                    delivered = true;
                }
                Delivery::NoBuffers => {
                    // Wait for the driver to post buffers; it notifies us if it adds any
                    // after this (a race re-checked here, once per ring position).
                    match active.rx.enable_notification(&active.mem) {
                        Ok(true) => {
                            let at = active.rx.next_avail();
                            if last_wait == Some(at) {
                                broken = true;
                                break;
                            }
                            last_wait = Some(at);
                        }
                        Ok(false) => break,
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
            }
        }
        self.active = Some(active);
        if broken {
            self.break_queue(RX);
            self.drop_rx_frames();
        }
        if broken || delivered {
            self.backend.rx_room();
        }
        delivered
    }

    /// A link that is down (a broken RX queue, a migration holding the device): what the
    /// backend has for the guest is lost, and counted.
    pub(crate) fn drop_rx_frames(&mut self) {
        while self.backend.rx_peek().is_some() {
            M::inc(&self.metrics.rx_dropped);
            self.backend.rx_pop();
        }
    }

    /// Tells the driver of new used buffers in the TX queue (`tx`), the RX queue (`rx`) or
    /// both, with one interrupt where both want one (the transport's interrupt status does not
    /// say which queue; the driver looks at both).
    fn notify(&mut self, tx: bool, rx: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // Both are asked (with EVENT_IDX the question records what the driver was told).
        let tx = tx && active.tx.needs_notification(&active.mem).unwrap_or(true);
        let rx = rx && active.rx.needs_notification(&active.mem).unwrap_or(true);
        if tx || rx {
            M::inc(&self.metrics.interrupts);
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-net interrupt failed");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("bad descriptor chain")]
    Chain,
    #[error("{0}-byte chain is larger than a frame")]
    TooLarge(usize),
    #[error("frame shorter than an Ethernet header")]
    TooShort,
    #[error(transparent)]
    Header(#[from] super::header::HeaderError),
}

/// Reads one TX chain (virtio-net header + frame) into `buf`; unless the backend takes the
/// header (`raw`), finishes the frame (completes its checksum, refuses segmentation).
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
    raw: bool,
) -> Result<(), TxError> {
    let mut reader = chain.reader(mem).map_err(|_| TxError::Chain)?;
    let len = reader.available_bytes();
    if len > HDR_LEN + MAX_FRAME {
        return Err(TxError::TooLarge(len));
    }
    if len < HDR_LEN + 14 {
        return Err(TxError::TooShort);
    }
    buf.clear();
    buf.resize(len, 0);
    reader.read_exact(buf).map_err(|_| TxError::Chain)?;
    let header = TxHeader::parse(buf)?;
    if !raw {
        header.finish(&mut buf[HDR_LEN..])?;
    }
    Ok(())
}

enum Delivery {
    Done(usize),
    Dropped,
    NoBuffers,
}

/// A receive buffer taken from the ring and not used yet: its chain's head and the guest
/// memory it lends, checked to be guest RAM. Buffers are held across deliveries, so a frame
/// that needs more merged buffers than the guest has posted waits for more without handing
/// any back (which would leave the ring's notification index behind the driver).
pub(crate) struct RxBuf {
    head: u16,
    regions: Vec<(GuestAddress, usize)>,
    len: usize,
}

/// Takes the next receive chain; `Err(head)` for a chain that lends no valid memory.
fn take_rx_buffer(active: &mut Active) -> Option<Result<RxBuf, u16>> {
    let chain = active.rx.pop_descriptor_chain(&active.mem)?;
    let head = chain.head_index();
    let mem = &active.mem;
    let mut regions = Vec::new();
    let mut len = 0usize;
    for desc in chain.writable() {
        let n = desc.len() as usize;
        if n == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), n) || len + n > 2 * (HDR_LEN + MAX_FRAME) {
            return Some(Err(head));
        }
        regions.push((desc.addr(), n));
        len += n;
    }
    Some(Ok(RxBuf { head, regions, len }))
}

/// Writes `pieces` one after the other into `buf`'s memory; returns the bytes written.
fn fill_buffer(mem: &GuestMemoryMmap, buf: &RxBuf, pieces: &mut [&[u8]; 2]) -> usize {
    let mut written = 0;
    for &(addr, len) in &buf.regions {
        let mut off = 0;
        while off < len {
            let Some(piece) = pieces.iter_mut().find(|p| !p.is_empty()) else {
                return written;
            };
            let n = piece.len().min(len - off);
            if mem
                .write_slice(&piece[..n], addr.unchecked_add(off as u64))
                .is_err()
            {
                return written;
            }
            *piece = &piece[n..];
            off += n;
            written += n;
        }
    }
    written
}

/// Writes `frame` behind `header` (its num_buffers filled in here) into as many receive
/// buffers as it needs (one unless MRG_RXBUF was negotiated), taking buffers from the ring
/// into `held` as needed.
fn write_frame(
    active: &mut Active,
    held: &mut std::collections::VecDeque<RxBuf>,
    mut header: [u8; HDR_LEN],
    frame: &[u8],
    mergeable: bool,
) -> Delivery {
    let total = HDR_LEN + frame.len();
    loop {
        let have: usize = if mergeable {
            held.iter().map(|b| b.len).sum()
        } else {
            held.front().map_or(0, |b| b.len.max(1))
        };
        if (mergeable && have >= total) || (!mergeable && have > 0) {
            break;
        }
        match take_rx_buffer(active) {
            None => return Delivery::NoBuffers,
            Some(Ok(buf)) if buf.len >= HDR_LEN => held.push_back(buf),
            // No frame fits a buffer without room for the header, or one lending bad
            // memory: it goes back unused, so a broken driver cannot wedge delivery.
            Some(Ok(buf)) => {
                let _ = active.rx.add_used(&active.mem, buf.head, 0);
            }
            Some(Err(head)) => {
                let _ = active.rx.add_used(&active.mem, head, 0);
            }
        }
    }
    // How many held buffers this frame takes.
    let count = if mergeable {
        let mut sum = 0;
        held.iter()
            .take_while(|b| {
                let more = sum < total;
                sum += b.len;
                more
            })
            .count()
    } else {
        1
    };
    header[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    let mut pieces: [&[u8]; 2] = [&header, frame];
    let mut used = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(buf) = held.pop_front() else { break };
        let written = fill_buffer(&active.mem, &buf, &mut pieces);
        used.push((buf.head, written as u32));
    }
    for (head, len) in used {
        let _ = active.rx.add_used(&active.mem, head, len);
    }
    if pieces.iter().any(|p| !p.is_empty()) {
        return Delivery::Dropped; // a single buffer too small, or a failed write
    }
    Delivery::Done(frame.len())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.backend.set_guest_features(self.acked_features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only here (no VIRTIO_NET_F_CTRL_MAC_ADDR).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        self.activate_event.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        if self.vhost.take().is_some() {
            // Detached from vhost-net (dropping it); the backend watches the tap again from
            // the event loop, whose watches a vCPU thread does not change.
            M::set(&self.metrics.vhost_active, 0);
            self.backend_rewatch = true;
            if let Err(e) = self.activate_event.write(1) {
                tracing::error!(error = %e, "cannot hand the tap back to the event loop");
            }
        }
        self.active = None;
        self.rx_held.clear();
        self.broken = [false; 2];
        self.acked_features = 0;
    }

    fn freeze(&mut self) {
        self.frozen = true;
        // The destination's device takes them again from the ring.
        self.return_rx_buffers();
    }

    fn thaw(&mut self) {
        self.frozen = false;
        // The event loop moves what queued up meanwhile (its thread, with its filter, owns
        // the backend's sockets; the migration thread that thaws may not open them).
        if let Err(e) = self.activate_event.write(1) {
            tracing::error!(error = %e, "cannot wake the virtio-net event handler");
        }
    }

    fn announce(&mut self) {
        self.backend.announce(self.config.mac);
    }

    fn hold_for_migration(&mut self, held: bool) {
        if self.vhost_held != held {
            self.vhost_held = held;
            // The event loop moves the queues to or from vhost-net (it owns the watches).
            if let Err(e) = self.activate_event.write(1) {
                tracing::error!(error = %e, "cannot wake the virtio-net event handler");
            }
        }
    }

    fn held_for_migration(&self) -> bool {
        self.vhost.is_none()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| [a.rx.state(), a.tx.state()])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqTrigger;
    use crate::GuestMemoryMmap as Mem;
    use std::collections::VecDeque;

    /// A backend holding frames for the guest; with `echo`, it answers every frame at once
    /// with the same frame.
    struct Frames {
        rx: VecDeque<Vec<u8>>,
        echo: bool,
    }

    impl NetBackend for Frames {
        fn send(&mut self, frame: &[u8]) {
            if self.echo {
                self.rx.push_back(frame.to_vec());
            }
        }
        fn rx_peek(&mut self) -> Option<&[u8]> {
            self.rx.front().map(Vec::as_slice)
        }
        fn rx_pop(&mut self) {
            self.rx.pop_front();
        }
        fn event_fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn process(&mut self) {}
    }

    const SIZE: u16 = 16;
    const RX_DESC: u64 = 0x1000;
    const RX_AVAIL: u64 = 0x2000;
    const RX_USED: u64 = 0x3000;
    const TX_DESC: u64 = 0x4000;
    const TX_AVAIL: u64 = 0x5000;
    const TX_USED: u64 = 0x6000;
    const BUFS: u64 = 0x10000;

    fn queue(desc: u64, avail: u64, used: u64) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_ready(true);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(true);
        q
    }

    /// Posts receive buffers `from..to` (1024 bytes each, one descriptor per chain).
    fn post(mem: &Mem, from: u16, to: u16) {
        for i in from..to {
            let d = RX_DESC + 16 * u64::from(i);
            mem.write_obj(BUFS + 1024 * u64::from(i), GuestAddress(d))
                .unwrap();
            mem.write_obj(1024u32, GuestAddress(d + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
            mem.write_obj(i, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(i % SIZE)))
                .unwrap();
        }
        mem.write_obj(to, GuestAddress(RX_AVAIL + 2)).unwrap();
    }

    fn used_idx(mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(RX_USED + 2)).unwrap()
    }

    #[test]
    fn net_rx_frame_waits_for_enough_merged_buffers_and_asks_to_be_told() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let frame: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut net = active_net(&mem, vec![frame.clone()]);

        // Two 1 KiB buffers cannot take 3012 bytes: the frame waits, nothing is used, and the
        // device asks to be notified when the driver posts past what it has seen.
        post(&mem, 0, 2);
        net.deliver_rx();
        assert_eq!(used_idx(&mem), 0);
        let avail_event: u16 = mem
            .read_obj(GuestAddress(RX_USED + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(avail_event, 2);

        // Two more: the frame goes out over three buffers, header first.
        post(&mem, 2, 4);
        net.deliver_rx();
        assert_eq!(used_idx(&mem), 3);
        let num_buffers: u16 = mem.read_obj(GuestAddress(BUFS + 10)).unwrap();
        assert_eq!(num_buffers, 3);
        let mut got = vec![0u8; 3000];
        mem.read_slice(&mut got, GuestAddress(BUFS + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frame);
        assert_eq!(M::get(&net.metrics.rx_frames), 1);
    }

    /// A device with `frames` waiting for the guest, its queues at the test addresses.
    fn active_net(mem: &Mem, frames: Vec<Vec<u8>>) -> Net {
        let config = NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
            rx_checksums_valid: false,
            vhost: false,
        };
        let backend = Box::new(Frames {
            rx: VecDeque::from(frames),
            echo: false,
        });
        let mut net = Net::new(config, backend, Arc::new(M::default())).unwrap();
        net.set_acked_features(F_VERSION_1 | F_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF);
        let interrupt = Arc::new(Interrupt::new(IrqTrigger::new().unwrap()));
        let queues = vec![
            queue(RX_DESC, RX_AVAIL, RX_USED),
            queue(TX_DESC, TX_AVAIL, TX_USED),
        ];
        net.activate(mem.clone(), interrupt, queues).unwrap();
        net
    }

    /// Regression: an RX avail index more than a queue size ahead (nothing can be popped, the
    /// driver claims more) spun deliver_rx, and the event loop with it, for ever.
    #[test]
    fn net_rx_ring_that_lies_is_broken_once_its_frames_dropped_until_a_reset() {
        crate::virtio::fuzz_util::testing::within_time_limit("lying RX ring", || {
            let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut net = active_net(&mem, vec![vec![0xab; 60], vec![0xcd; 60]]);
            mem.write_obj(SIZE + 1, GuestAddress(RX_AVAIL + 2)).unwrap();
            net.deliver_rx();
            assert_eq!(M::get(&net.metrics.broken_queues), 1);
            assert_eq!(M::get(&net.metrics.rx_dropped), 2, "the frames are dropped");
            assert_eq!(used_idx(&mem), 0);
            // Kicks and more frames while broken: no second count, nothing used.
            for _ in 0..3 {
                net.deliver_rx();
            }
            assert_eq!(M::get(&net.metrics.broken_queues), 1);
            assert!(!net.broken[TX], "TX is not broken by RX");
            // A reset makes the queue servable again.
            net.reset();
            assert!(!net.broken[RX]);
        });
    }

    /// A frame the backend answers at once (a SYN-ACK, an ARP reply) costs the guest one
    /// interrupt for both queues, not one for the sent frame and one for the answer.
    #[test]
    fn net_tx_frame_and_its_immediate_answer_share_one_interrupt() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut net = active_net(&mem, Vec::new());
        net.backend = Box::new(Frames {
            rx: VecDeque::new(),
            echo: true,
        });
        post(&mem, 0, 4);
        // One TX chain: a zeroed virtio-net header and a 60-byte frame, one descriptor.
        let frame: Vec<u8> = (0..60u8).collect();
        let at = BUFS + 0x8000;
        mem.write_slice(&frame, GuestAddress(at + HDR_LEN as u64))
            .unwrap();
        mem.write_obj(at, GuestAddress(TX_DESC)).unwrap();
        mem.write_obj((HDR_LEN + frame.len()) as u32, GuestAddress(TX_DESC + 8))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(TX_AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(TX_AVAIL + 2)).unwrap();

        assert!(net.process_tx());
        let tx_used: u16 = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap();
        assert_eq!((tx_used, used_idx(&mem)), (1, 1), "sent and answered");
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(BUFS + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frame);
        assert_eq!(M::get(&net.metrics.interrupts), 1);
        let active = net.active.as_ref().unwrap();
        assert_eq!(active.interrupt.status(), 1, "the used-ring bit");
    }

    /// A guest on another vCPU that puts each TX chain back in the ring as soon as the
    /// device took it: the ring is never empty.
    struct Refiller {
        mem: Mem,
        avail_idx: u16,
    }

    impl NetBackend for Refiller {
        fn send(&mut self, _frame: &[u8]) {
            self.avail_idx = self.avail_idx.wrapping_add(1);
            let slot = TX_AVAIL + 4 + 2 * u64::from(self.avail_idx.wrapping_sub(1) % SIZE);
            self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
            self.mem
                .write_obj(self.avail_idx, GuestAddress(TX_AVAIL + 2))
                .unwrap();
        }
        fn rx_peek(&mut self) -> Option<&[u8]> {
            None
        }
        fn rx_pop(&mut self) {}
        fn event_fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn process(&mut self) {}
    }

    #[test]
    fn net_tx_pass_ends_on_its_budget_when_the_guest_never_stops_sending() {
        crate::virtio::fuzz_util::testing::within_time_limit("endless TX ring", || {
            let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut net = active_net(&mem, Vec::new());
            // One 60-byte frame in descriptor 0, made available once; the backend puts it
            // back after each send.
            let at = BUFS + 0x8000;
            mem.write_obj(at, GuestAddress(TX_DESC)).unwrap();
            mem.write_obj((HDR_LEN + 60) as u32, GuestAddress(TX_DESC + 8))
                .unwrap();
            mem.write_obj(0u16, GuestAddress(TX_AVAIL + 4)).unwrap();
            mem.write_obj(1u16, GuestAddress(TX_AVAIL + 2)).unwrap();
            net.backend = Box::new(Refiller {
                mem: mem.clone(),
                avail_idx: 1,
            });
            assert!(net.process_tx(), "a busy ring is not a broken one");
            assert_eq!(M::get(&net.metrics.tx_frames), TX_PASS_FRAMES as u64);
            assert_eq!(M::get(&net.metrics.tx_budget_spent), 1);
            // The pass asked the event loop to come back, and the next pass goes on.
            assert_eq!(net.queue_events[TX].read().unwrap(), 1);
            assert!(net.process_tx());
            assert_eq!(M::get(&net.metrics.tx_frames), 2 * TX_PASS_FRAMES as u64);
        });
    }

    #[test]
    fn net_tx_ring_that_lies_is_broken_and_counted_once() {
        crate::virtio::fuzz_util::testing::within_time_limit("lying TX ring", || {
            let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut net = active_net(&mem, Vec::new());
            mem.write_obj(SIZE + 5, GuestAddress(TX_AVAIL + 2)).unwrap();
            for _ in 0..4 {
                assert!(!net.process_tx());
            }
            assert_eq!(M::get(&net.metrics.broken_queues), 1);
            assert_eq!(M::get(&net.metrics.tx_frames), 0);
        });
    }
}
