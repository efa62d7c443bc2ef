//! virtio-net on the event loop: the activation eventfd and the backend's descriptor are
//! watched from the start; the queue eventfds once the driver has activated the device.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Net, RX, TX};

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_BACKEND: u32 = 3;
const TOKEN_VHOST_RX: u32 = 4;
const TOKEN_VHOST_TX: u32 = 5;

impl Net {
    fn queue_event(&self, index: usize) -> &EventFd {
        &crate::virtio::VirtioDevice::queue_events(self)[index]
    }

    fn watch_queues(&mut self, ops: &mut EventOps) {
        if self.queues_watched {
            return;
        }
        let rx = Events::with_data(self.queue_event(RX), TOKEN_RX, EventSet::IN);
        let tx = Events::with_data(self.queue_event(TX), TOKEN_TX, EventSet::IN);
        match ops.add(rx).and_then(|()| ops.add(tx)) {
            Ok(()) => self.queues_watched = true,
            Err(e) => tracing::error!(error = ?e, "cannot watch the virtio-net queues"),
        }
    }
}

impl Net {
    fn unwatch_queues(&mut self, ops: &mut EventOps) {
        if self.queues_watched {
            let _ = ops.remove(Events::empty(self.queue_event(RX)));
            let _ = ops.remove(Events::empty(self.queue_event(TX)));
            self.queues_watched = false;
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_event,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "cannot watch the virtio-net activation event");
        }
        let fd = self.backend.event_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, TOKEN_BACKEND, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the network backend");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_event.read();
                if std::mem::take(&mut self.backend_rewatch) {
                    self.backend.set_external_datapath(false);
                    if self.active.is_none() {
                        return;
                    }
                }
                if self.vhost_held {
                    if let Some(v) = &self.vhost {
                        let _ = ops.remove(Events::empty(&v.calls[RX]));
                        let _ = ops.remove(Events::empty(&v.calls[TX]));
                    }
                    if !self.take_back_from_vhost() {
                        return;
                    }
                } else if self.vhost.is_none() && self.active.is_some() && self.config().vhost {
                    // A migration that failed gives the queues back to vhost-net: podvm lets
                    // go of them first (buffers it holds go back to the ring).
                    self.unwatch_queues(ops);
                    self.return_rx_buffers();
                }
                if self.start_vhost() {
                    // The kernel serves the queues; the loop only relays its interrupts.
                    if let Some(v) = &self.vhost {
                        let rx = Events::with_data(&v.calls[RX], TOKEN_VHOST_RX, EventSet::IN);
                        let tx = Events::with_data(&v.calls[TX], TOKEN_VHOST_TX, EventSet::IN);
                        if let Err(e) = ops.add(rx).and_then(|()| ops.add(tx)) {
                            tracing::error!(error = ?e, "cannot watch vhost-net's interrupts");
                        }
                    }
                    return;
                }
                self.watch_queues(ops);
                // Frames and buffers the driver queued before the loop started watching.
                self.process_tx();
                self.deliver_rx();
            }
            TOKEN_RX => {
                let _ = self.queue_event(RX).read();
                self.deliver_rx();
            }
            TOKEN_TX => {
                let _ = self.queue_event(TX).read();
                // A broken queue was logged and counted once, when it broke.
                self.process_tx();
            }
            TOKEN_BACKEND => {
                self.backend.process();
                if self.frozen {
                    // Frames arriving while a migration holds the device are lost, as on a
                    // link that is down (and the backend's descriptor must not stay ready).
                    self.drop_rx_frames();
                }
                self.deliver_rx();
            }
            TOKEN_VHOST_RX => self.vhost_used(RX),
            TOKEN_VHOST_TX => self.vhost_used(TX),
            other => tracing::warn!(token = other, "unexpected virtio-net event"),
        }
    }
}
