//! virtio-blk on the event loop: the activation eventfd is watched from the start; the queue
//! eventfd only once the driver has activated the device. Once the queue is broken, kicks are
//! read and ignored until the driver resets the device.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;
const TOKEN_COMPLETION: u32 = 2;

impl Block {
    fn watch_queue(&mut self, ops: &mut EventOps) {
        if self.queue_watched {
            return;
        }
        let evt = &self.queue_events_ref()[0];
        match ops.add(Events::with_data(evt, TOKEN_QUEUE, EventSet::IN)) {
            Ok(()) => self.queue_watched = true,
            Err(e) => tracing::error!(error = ?e, "cannot watch the virtio-blk queue"),
        }
    }

    fn queue_events_ref(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        crate::virtio::VirtioDevice::queue_events(self)
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_event,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "cannot watch the virtio-blk activation event");
        }
        if let Some(engine) = &self.engine {
            if let Err(e) = ops.add(Events::with_data(
                engine.eventfd(),
                TOKEN_COMPLETION,
                EventSet::IN,
            )) {
                tracing::error!(error = ?e, "cannot watch the virtio-blk completions");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_event.read();
                self.watch_queue(ops);
                // Requests the driver queued before the loop started watching.
                self.process_queue();
            }
            TOKEN_QUEUE => {
                let _ = self.queue_events_ref()[0].read();
                // A broken queue was logged and counted once, when it broke.
                self.process_queue();
            }
            TOKEN_COMPLETION => self.process_completions(),
            other => tracing::warn!(token = other, "unexpected virtio-blk event"),
        }
    }
}
