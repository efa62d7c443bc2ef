//! virtio-rng on the event loop: the activation eventfd is watched from the start; the queue
//! eventfd only once the driver has activated the device. A pass that spent its budget
//! signals the queue eventfd itself, so the loop serves the other devices before the rest.
//! Once the queue is broken, kicks are read and ignored until the driver resets the device.

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
            // `process_queue` logged and counted the breakage when it found it; every kick
            // until the driver resets the device ends here, with nothing served or logged.
            QueueStatus::Broken => {}
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::irq::IrqTrigger;
    use crate::virtio::rng::RngMetrics as M;
    use crate::virtio::{Interrupt, F_VERSION_1};
    use crate::GuestMemoryMmap;

    /// A subscriber that only counts the warnings (and worse) logged on the thread that
    /// installed it.
    struct CountWarnings(Arc<AtomicUsize>);

    impl tracing::Subscriber for CountWarnings {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            if *event.metadata().level() <= Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    /// The warnings `f` logs.
    fn warnings(f: impl FnOnce()) -> usize {
        let count = Arc::new(AtomicUsize::new(0));
        tracing::subscriber::with_default(CountWarnings(count.clone()), f);
        count.load(Ordering::Relaxed)
    }

    #[test]
    fn rng_broken_queue_is_logged_once_however_often_the_driver_kicks_or_resets() {
        const SIZE: u16 = 16;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        // An avail index more than a queue size ahead of the device: the rings are broken.
        vq.avail().idx().store(SIZE + 1);
        let interrupt = Arc::new(Interrupt::new(IrqTrigger::new().unwrap()));
        let mut rng = Rng::new().unwrap();
        let activate = |rng: &mut Rng| {
            rng.set_acked_features(F_VERSION_1);
            let queue: Queue = vq.create_queue().unwrap();
            rng.activate(mem.clone(), interrupt.clone(), vec![queue])
                .unwrap();
        };
        activate(&mut rng);
        let metrics = rng.metrics();
        // A guest kicking the broken queue over and over: one warning, one breakage.
        assert_eq!(warnings(|| (0..100).for_each(|_| rng.serve_queue())), 1);
        assert_eq!(M::get(&metrics.broken_queues), 1);
        // Breaking the queue again after a reset is a new breakage, counted; its line is
        // rate-limited (a guest can reset and break the queue in a loop), so within a minute
        // of the first it is left out of the log.
        for round in 2..=50 {
            rng.reset();
            activate(&mut rng);
            assert_eq!(warnings(|| (0..10).for_each(|_| rng.serve_queue())), 0);
            assert_eq!(M::get(&metrics.broken_queues), round);
        }
    }
}
