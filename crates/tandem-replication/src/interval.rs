//! Serialises overlapping writes on the Primary: a write waits until no write in flight
//! overlaps it, so every replica applies overlapping writes in the same order. A drain
//! (for a snapshot) holds every new range back until the ranges held are released: a
//! point in the write order with every earlier write complete.

use crate::locks::Locked;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct IntervalLock {
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Default)]
struct State {
    held: Vec<(u64, u64)>,
    /// Lockers waiting for a range: only then does a release wake anyone.
    waiting: usize,
    /// A drain is in progress or holds the lock: no range is given out.
    drained: bool,
}

/// A range taken, until dropped (on whichever thread finishes the write).
pub(crate) struct Held {
    lock: Arc<IntervalLock>,
    range: (u64, u64),
}

impl IntervalLock {
    /// Takes `[offset, offset + len)`, waiting while an overlapping range is held.
    pub fn lock(self: &Arc<Self>, offset: u64, len: u64) -> Held {
        let range = (offset, offset + len.max(1));
        let overlaps =
            |s: &State| s.drained || s.held.iter().any(|&(a, b)| a < range.1 && range.0 < b);
        let mut state = self.state.locked();
        if overlaps(&state) {
            state.waiting += 1;
            state = crate::locks::wait_while(&self.released, state, |s| overlaps(s));
            state.waiting -= 1;
        }
        state.held.push(range);
        Held {
            lock: self.clone(),
            range,
        }
    }

    /// Holds every new range back and waits until no range is held, at most `patience`;
    /// `None` (and ranges given out again) if some range is still held by then. One
    /// drain at a time: a second waits for the first to end.
    pub fn drain(self: &Arc<Self>, patience: Duration) -> Option<Drained> {
        let deadline = Instant::now() + patience;
        let mut state = self.state.locked();
        state.waiting += 1;
        let waited = |state, until: fn(&State) -> bool| {
            let left = deadline.saturating_duration_since(Instant::now());
            let (state, _) =
                crate::locks::wait_timeout_while(&self.released, state, left, |s| !until(s));
            state
        };
        state = waited(state, |s| !s.drained);
        let ours = !state.drained;
        if ours {
            state.drained = true;
            state = waited(state, |s| s.held.is_empty());
        }
        state.waiting -= 1;
        if ours && state.held.is_empty() {
            return Some(Drained { lock: self.clone() });
        }
        if ours {
            state.drained = false;
            self.released.notify_all();
        }
        None
    }
}

/// Ranges are held back until this is dropped.
pub(crate) struct Drained {
    lock: Arc<IntervalLock>,
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.lock.state.locked().drained = false;
        self.lock.released.notify_all();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = self.lock.state.locked();
        if let Some(i) = state.held.iter().position(|r| *r == self.range) {
            state.held.swap_remove(i);
        }
        if state.waiting > 0 {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_drain_waits_for_held_ranges_and_holds_new_ones_back() {
        let lock = Arc::new(IntervalLock::default());
        let in_flight = lock.lock(0, 4096);
        // Patience runs out while a range is held: nothing is held back after that.
        assert!(lock.drain(Duration::from_millis(20)).is_none());
        drop(lock.lock(8192, 4096));

        let l = lock.clone();
        let drainer = std::thread::spawn(move || {
            l.drain(Duration::from_secs(10))
                .map(|d| (d, std::time::Instant::now()))
        });
        std::thread::sleep(Duration::from_millis(50));
        let entered = Arc::new(AtomicBool::new(false));
        let (l, e) = (lock.clone(), entered.clone());
        let later = std::thread::spawn(move || {
            let _g = l.lock(1 << 20, 4096);
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "a disjoint range waits for the drain"
        );
        let released = std::time::Instant::now();
        drop(in_flight);
        let (drained, at) = drainer
            .join()
            .unwrap()
            .expect("drained once the range was released");
        assert!(at >= released);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "held back while drained");
        drop(drained);
        later.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(IntervalLock::default());
        let first = lock.lock(0, 4096);
        let _disjoint = lock.lock(4096, 4096);
        let entered = Arc::new(AtomicBool::new(false));
        let (l, e) = (lock.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _g = l.lock(100, 10);
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst));
        drop(first);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
