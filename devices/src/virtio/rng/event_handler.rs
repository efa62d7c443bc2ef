//! virtio-rng on the event loop: the activation eventfd is watched from the start; the queue
//! eventfd only once the driver has activated the device. A pass that spent its budget
//! signals the queue eventfd itself, so the loop serves the other devices before the rest.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{QueueStatus, Rng};
use crate::virtio::VirtioDevice;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;

impl Rng {
    fn watch_queue(&mut self, ops: &mut EventOps) {
        if self.queue_watched {
            return;
        }
        let evt = &self.queue_events()[0];
        match ops.add(Events::with_data(evt, TOKEN_QUEUE, EventSet::IN)) {
            Ok(()) => self.queue_watched = true,
            Err(e) => tracing::error!(error = ?e, "cannot watch the virtio-rng queue"),
        }
    }

    fn serve_queue(&mut self) {
        match self.process_queue() {
            QueueStatus::Drained => {}
            QueueStatus::BudgetSpent => {
                if let Err(e) = self.queue_events()[0].write(1) {
                    tracing::error!(error = %e, "cannot reschedule the virtio-rng queue");
                }
            }
            QueueStatus::Broken => {
                tracing::warn!("virtio-rng queue is broken; waiting for the driver to reset")
            }
        }
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_event,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "cannot watch the virtio-rng activation event");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_event.read();
                self.watch_queue(ops);
                // Requests the driver queued before the loop started watching.
                self.serve_queue();
            }
            TOKEN_QUEUE => {
                let _ = self.queue_events()[0].read();
                self.serve_queue();
            }
            other => tracing::warn!(token = other, "unexpected virtio-rng event"),
        }
    }
}
