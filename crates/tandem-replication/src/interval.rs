//! Serialises overlapping writes on the Primary: a write waits until no write in flight
//! overlaps it, so every replica applies overlapping writes in the same order.

use crate::locks::Locked;
use std::sync::{Arc, Condvar, Mutex};

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
        let overlaps = |s: &State| s.held.iter().any(|&(a, b)| a < range.1 && range.0 < b);
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
