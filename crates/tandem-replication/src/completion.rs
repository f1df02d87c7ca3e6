//! A request waiting for the answers of several peers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tandem_api::NodeId;

use crate::locks::Locked;
use crate::wire::Buffer;
use tandem_io::poll;

#[derive(Default)]
pub(crate) struct Outcome {
    /// Peers whose connection dropped before they answered.
    pub lost: Vec<NodeId>,
    /// Peers that answered with an errno.
    pub failed: Vec<(NodeId, u32)>,
    /// Data a peer answered a read with.
    pub data: Option<Buffer>,
}

/// What runs once every answer is in, instead of a waiting thread (see
/// [`Completion::then`]).
type Then = Box<dyn FnOnce(Outcome) + Send>;

struct State {
    outcome: Outcome,
    /// The waiter sleeps on the condition variable (rather than polling).
    sleeping: bool,
    then: Option<Then>,
}

pub(crate) struct Completion {
    /// Answers still awaited; changed under the lock, read without it by a polling
    /// waiter.
    left: AtomicUsize,
    state: Mutex<State>,
    done: Condvar,
}

impl Completion {
    pub fn new(waiting_for: usize) -> Completion {
        Completion {
            left: AtomicUsize::new(waiting_for),
            state: Mutex::new(State {
                outcome: Outcome::default(),
                sleeping: false,
                then: None,
            }),
            done: Condvar::new(),
        }
    }

    fn settle(&self, record: impl FnOnce(&mut Outcome)) {
        let mut s = self.state.locked();
        record(&mut s.outcome);
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(then) = s.then.take() {
            let outcome = std::mem::take(&mut s.outcome);
            drop(s);
            then(outcome);
        } else if s.sleeping {
            self.done.notify_all();
        }
    }

    pub fn answered(&self, peer: NodeId, status: u32, data: Option<Buffer>) {
        self.settle(|o| {
            if status != 0 {
                o.failed.push((peer, status));
            } else if data.is_some() {
                o.data = data;
            }
        });
    }

    pub fn lost(&self, peer: NodeId) {
        self.settle(|o| o.lost.push(peer));
    }

    /// Runs `then` with the outcome once every peer answered or was lost: at once on
    /// this thread if they have, else on the thread that settles the last one (a peer
    /// link's receiver, or the one that finds the link lost). Instead of a wait.
    pub fn then(&self, then: impl FnOnce(Outcome) + Send + 'static) {
        let mut s = self.state.locked();
        if self.left.load(Ordering::Acquire) == 0 {
            let outcome = std::mem::take(&mut s.outcome);
            drop(s);
            then(outcome);
        } else {
            s.then = Some(Box::new(then));
        }
    }

    /// Waits until every peer answered or was lost.
    pub fn wait(&self) -> Outcome {
        self.wait_polling(Duration::ZERO)
    }

    /// Like [`Completion::wait`], polling for the answers for up to `budget` before
    /// sleeping (see [`poll`]): for requests whose answers are due within about that.
    pub fn wait_polling(&self, budget: Duration) -> Outcome {
        poll::poll_until(budget, || self.left.load(Ordering::Acquire) == 0);
        let mut s = self.state.locked();
        s.sleeping = true;
        let mut s =
            crate::locks::wait_while(&self.done, s, |_| self.left.load(Ordering::Acquire) > 0);
        std::mem::take(&mut s.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waits_for_every_peer() {
        for budget in [Duration::ZERO, Duration::from_millis(1)] {
            let c = Arc::new(Completion::new(2));
            let c2 = c.clone();
            let t = std::thread::spawn(move || c2.wait_polling(budget));
            c.answered(NodeId::new(1).unwrap(), 0, None);
            std::thread::sleep(Duration::from_millis(5));
            c.lost(NodeId::new(2).unwrap());
            let o = t.join().unwrap();
            assert_eq!(o.lost, [NodeId::new(2).unwrap()]);
            assert!(o.failed.is_empty());
        }
    }

    #[test]
    fn then_runs_once_with_the_last_answer() {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = Completion::new(2);
        let t = tx.clone();
        c.then(move |o| t.send(o.failed).unwrap());
        c.answered(NodeId::new(1).unwrap(), 0, None);
        assert!(rx.try_recv().is_err(), "one answer is still due");
        c.answered(NodeId::new(2).unwrap(), 5, None);
        assert_eq!(rx.try_recv().unwrap(), [(NodeId::new(2).unwrap(), 5)]);
        // Every answer in before: it runs at once.
        let c = Completion::new(1);
        c.lost(NodeId::new(3).unwrap());
        c.then(move |o| tx.send(o.failed).unwrap());
        assert!(rx.try_recv().unwrap().is_empty());
    }
}
