//! Acknowledgements in windows: which `basic.ack` frames a RabbitMQ consumer sends for the
//! deliveries it finished, given the ones still in hand (decision 51).
//!
//! Deliveries are handled concurrently and finish out of order, and an ack with `multiple`
//! settles every unacknowledged delivery tag up to its own. So at each flush [`AckWindow`]
//! answers:
//! - **one ack with `multiple`** for all the finished tags below the oldest tag still in hand:
//!   nothing still being handled is below it, so nothing unfinished is settled (the common case:
//!   one frame for many deliveries);
//! - **a single ack** for each finished tag above the oldest in hand that already waited through
//!   one flush: a slow delivery never holds back the others' acks, and the prefetch slots they
//!   occupy, for more than two flush intervals;
//! - nothing for a tag still in hand. A delivery that could not be settled (its return to the
//!   queue failed, its task panicked) stays in hand for good: no `multiple` ever covers it, and
//!   the broker delivers it again when the channel closes.
//!
//! A frame always names a tag that is itself unacknowledged: RabbitMQ closes the channel on an
//! unknown tag, `multiple` or not. Tags settled otherwise (returned to the queue with a `nack`,
//! or acknowledged singly before) may lie below a `multiple`: the broker no longer holds them,
//! and skips them.
//!
//! Pure bookkeeping, no IO: the consumer sends the frames (`rabbit.rs`).

use std::collections::{BTreeMap, BTreeSet};

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckFrame {
    /// The delivery tag the frame names.
    pub tag: u64,
    /// Whether it also settles every earlier unacknowledged tag.
    pub multiple: bool,
    /// How many finished deliveries it acknowledges.
    pub count: usize,
}

/// The deliveries of one channel between their arrival and their ack (module documentation).
#[derive(Debug, Default)]
pub struct AckWindow {
    /// Delivered and not finished, or never to be acknowledged by us.
    in_hand: BTreeSet<u64>,
    /// Finished, their ack not sent yet: tag → the flush generation they finished in.
    finished: BTreeMap<u64, u64>,
    generation: u64,
}

impl AckWindow {
    /// A delivery handed to its handler.
    pub fn delivered(&mut self, tag: u64) {
        self.in_hand.insert(tag);
    }

    /// A delivery whose effect is durable: its ack is due.
    pub fn finished(&mut self, tag: u64) {
        if self.in_hand.remove(&tag) {
            self.finished.insert(tag, self.generation);
        }
    }

    /// A delivery settled without an ack from the window (returned to its queue with a `nack`
    /// already sent).
    pub fn settled(&mut self, tag: u64) {
        self.in_hand.remove(&tag);
    }

    /// Finished deliveries whose ack is not sent yet.
    pub fn waiting(&self) -> usize {
        self.finished.len()
    }

    /// The frames to send now: a `multiple` below the oldest delivery in hand, and single acks
    /// for deliveries that waited through one flush already.
    pub fn flush(&mut self) -> Vec<AckFrame> {
        let mut frames = Vec::new();
        let covered: Vec<u64> = match self.in_hand.first() {
            Some(&oldest) => self.finished.range(..oldest).map(|(tag, _)| *tag).collect(),
            None => self.finished.keys().copied().collect(),
        };
        if let Some(&last) = covered.last() {
            for tag in &covered {
                self.finished.remove(tag);
            }
            frames.push(AckFrame {
                tag: last,
                multiple: covered.len() > 1,
                count: covered.len(),
            });
        }
        let generation = self.generation;
        let aged: Vec<u64> = self
            .finished
            .iter()
            .filter(|(_, finished_in)| **finished_in < generation)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in aged {
            self.finished.remove(&tag);
            frames.push(AckFrame {
                tag,
                multiple: false,
                count: 1,
            });
        }
        self.generation += 1;
        frames
    }

    /// The frames for every finished delivery, however recent: at the end of a session.
    pub fn flush_all(&mut self) -> Vec<AckFrame> {
        self.generation += 1;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// A single ack of `tag`.
    fn single(tag: u64) -> AckFrame {
        AckFrame {
            tag,
            multiple: false,
            count: 1,
        }
    }

    /// One ack with `multiple` up to `tag`, settling `count` finished deliveries.
    fn up_to(tag: u64, count: usize) -> AckFrame {
        AckFrame {
            tag,
            multiple: true,
            count,
        }
    }

    fn window(delivered: impl IntoIterator<Item = u64>) -> AckWindow {
        let mut window = AckWindow::default();
        for tag in delivered {
            window.delivered(tag);
        }
        window
    }

    #[test]
    fn deliveries_finished_in_order_take_one_frame() {
        let mut window = window(1..=5);
        for tag in 1..=5 {
            window.finished(tag);
        }
        assert_eq!(window.flush(), vec![up_to(5, 5)]);
        assert_eq!(window.waiting(), 0);
        assert_eq!(window.flush(), vec![]);
    }

    #[test]
    fn one_finished_delivery_is_acked_singly() {
        let mut window = window([7]);
        window.finished(7);
        assert_eq!(window.flush(), vec![single(7)]);
    }

    #[test]
    fn a_multiple_stops_below_the_oldest_delivery_in_hand() {
        let mut window = window(1..=6);
        for tag in [1, 2, 4, 5] {
            window.finished(tag);
        }
        assert_eq!(
            window.flush(),
            vec![up_to(2, 2)],
            "3 is in hand: 4 and 5 must wait"
        );
        window.finished(3);
        assert_eq!(window.flush(), vec![up_to(5, 3)]);
    }

    #[test]
    fn a_slow_delivery_holds_the_others_for_one_flush_only() {
        let mut window = window(1..=4);
        for tag in [2, 3] {
            window.finished(tag);
        }
        assert_eq!(window.flush(), vec![], "they wait one flush for 1");
        window.finished(4);
        assert_eq!(
            window.flush(),
            vec![single(2), single(3)],
            "1 is still in hand: 2 and 3 go singly, 4 waits its flush"
        );
        window.finished(1);
        assert_eq!(
            window.flush(),
            vec![up_to(4, 2)],
            "the multiple names 4 and skips 2 and 3, already acked"
        );
    }

    #[test]
    fn a_delivery_that_could_not_be_settled_is_never_covered() {
        let mut window = window(1..=3);
        // 2 was never settled (its task panicked): it stays in hand.
        window.finished(1);
        window.finished(3);
        assert_eq!(window.flush_all(), vec![single(1), single(3)]);
    }

    #[test]
    fn a_returned_delivery_does_not_hold_the_window() {
        let mut window = window(1..=3);
        window.finished(1);
        window.settled(2);
        window.finished(3);
        assert_eq!(window.flush(), vec![up_to(3, 2)]);
    }

    #[test]
    fn finishing_twice_or_an_unknown_tag_changes_nothing() {
        let mut window = window([1]);
        window.finished(1);
        window.finished(1);
        window.finished(9);
        assert_eq!(window.waiting(), 1);
    }

    /// What happens to one delivery in a generated run.
    #[derive(Debug, Clone, Copy)]
    enum Fate {
        Acked,
        Returned,
        Stuck,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![
            8 => Just(Fate::Acked),
            1 => Just(Fate::Returned),
            1 => Just(Fate::Stuck),
        ]
    }

    proptest! {
        /// Whatever the order deliveries finish in and however flushes interleave, the frames
        /// never settle a delivery in hand or a stuck one, never name a tag the broker no longer
        /// holds, settle every finished delivery exactly once, and leave none waiting longer
        /// than two flushes.
        #[test]
        fn frames_settle_exactly_the_finished_deliveries(
            fates in prop::collection::vec(fate(), 1..60),
            order in prop::collection::vec(any::<prop::sample::Index>(), 60),
            flushes in prop::collection::vec(any::<bool>(), 60),
        ) {
            let tags: Vec<u64> = (1..=fates.len() as u64).collect();
            let mut window = window(tags.iter().copied());
            // The broker's view: unacknowledged tags.
            let mut unacked: BTreeSet<u64> = tags.iter().copied().collect();
            let mut pending: Vec<u64> = tags.clone();
            let mut acked_by_us: BTreeSet<u64> = BTreeSet::new();
            let mut finished_at: BTreeMap<u64, usize> = BTreeMap::new();
            let mut flush_count = 0usize;
            let mut step = 0usize;
            let apply = |frames: Vec<AckFrame>,
                             unacked: &mut BTreeSet<u64>,
                             acked_by_us: &mut BTreeSet<u64>,
                             finished_at: &BTreeMap<u64, usize>|
             -> Result<(), TestCaseError> {
                for frame in frames {
                    prop_assert!(unacked.contains(&frame.tag), "names a settled tag {}", frame.tag);
                    let settled: Vec<u64> = if frame.multiple {
                        unacked.range(..=frame.tag).copied().collect()
                    } else {
                        vec![frame.tag]
                    };
                    prop_assert_eq!(settled.len(), frame.count);
                    for tag in settled {
                        prop_assert!(finished_at.contains_key(&tag), "settles {} before it finished", tag);
                        prop_assert!(acked_by_us.insert(tag));
                        unacked.remove(&tag);
                    }
                }
                Ok(())
            };
            while !pending.is_empty() {
                let index = order[step % order.len()].index(pending.len());
                let tag = pending.remove(index);
                match fates[(tag - 1) as usize] {
                    Fate::Acked => {
                        window.finished(tag);
                        finished_at.insert(tag, flush_count);
                    }
                    Fate::Returned => {
                        window.settled(tag);
                        unacked.remove(&tag);
                    }
                    Fate::Stuck => {}
                }
                if flushes[step % flushes.len()] {
                    let frames = window.flush();
                    flush_count += 1;
                    apply(frames, &mut unacked, &mut acked_by_us, &finished_at)?;
                    for (tag, at) in &finished_at {
                        if flush_count >= at + 2 {
                            prop_assert!(acked_by_us.contains(tag), "{} waited more than two flushes", tag);
                        }
                    }
                }
                step += 1;
            }
            let frames = window.flush_all();
            apply(frames, &mut unacked, &mut acked_by_us, &finished_at)?;
            let finished: BTreeSet<u64> = finished_at.keys().copied().collect();
            prop_assert_eq!(acked_by_us, finished);
            prop_assert_eq!(window.waiting(), 0);
        }
    }
}
