//! Brief polling before a thread sleeps, where what it waits for usually comes soon.
//!
//! A thread that sleeps and is woken tens of microseconds later pays for the wake-up:
//! on an idle CPU, above all a virtual one that halted and must be scheduled again by
//! its host, that costs some 20-30 µs, a third of a 4 KiB write to the disk. A
//! replicated write at queue depth 1 meets such hand-offs in a row (the NBD
//! connection's next request, the secondary's receiver taking the write, the
//! Primary's receiver its answer), so where the next event is due shortly the thread
//! first polls for it, for a bounded time, yielding the CPU at each turn to any thread
//! that can run, and sleeps only when it has not come.
//!
//! The cost is bounded: a thread polls only right after traffic (see [`Cadence`]), for
//! at most its budget, and at most [`max_pollers`] threads of the process poll at once
//! (the others sleep at once), so an idle node polls never and a busy one spends at
//! most that many CPUs on it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Threads polling right now.
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// How many threads may poll at once: half the CPUs, at least two (a replicated
/// stream at queue depth 1 has two hand-offs on its Primary: the client's next request
/// and the peer's answer).
pub fn max_pollers() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| (n.get() / 2).max(2)))
}

/// Polls `ready` until it holds or `budget` has passed, yielding the CPU between
/// checks; whether it holds. Returns at once (with `ready()`) when `budget` is zero or
/// enough other threads are polling already.
pub fn poll_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let max = max_pollers();
    if POLLING
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_err()
    {
        return false;
    }
    let until = Instant::now() + budget;
    let found = loop {
        std::thread::yield_now();
        if ready() {
            break true;
        }
        if Instant::now() >= until {
            break false;
        }
    };
    POLLING.fetch_sub(1, Ordering::AcqRel);
    found
}

/// Whether a stream's messages follow each other closely, learnt from how long its
/// reader slept for the last one: while they do (the stream is hot), the reader polls
/// for the next message before it sleeps.
#[derive(Debug)]
pub struct Cadence {
    budget: Duration,
    hot: bool,
}

impl Cadence {
    /// A stream is hot while its messages come less than `budget` apart; a hot reader
    /// polls for up to `budget`.
    pub fn new(budget: Duration) -> Cadence {
        Cadence { budget, hot: false }
    }

    pub fn is_hot(&self) -> bool {
        self.hot
    }

    /// Polls `ready` if the stream is hot (see [`poll_until`]); whether it holds.
    pub fn poll(&self, ready: impl FnMut() -> bool) -> bool {
        self.hot && poll_until(self.budget, ready)
    }

    /// Runs `read`, the blocking read of the stream's next message, and learns from
    /// the time it took whether the stream is hot.
    pub fn sleep<T>(&mut self, read: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = read();
        self.hot = start.elapsed() < self.budget;
        result
    }

    /// The stream is not hot (its last message was not part of a stream of work).
    pub fn cool(&mut self) {
        self.hot = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn polls_until_ready_or_out_of_budget() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            f.store(true, Ordering::Release);
        });
        assert!(poll_until(Duration::from_secs(5), || flag.load(Ordering::Acquire)));
        t.join().unwrap();
        let start = Instant::now();
        assert!(!poll_until(Duration::from_millis(2), || false));
        assert!(start.elapsed() >= Duration::from_millis(2));
        assert!(!poll_until(Duration::ZERO, || false));
    }

    #[test]
    fn a_stream_is_hot_while_its_reads_are_quick() {
        let mut c = Cadence::new(Duration::from_millis(50));
        assert!(
            !c.is_hot() && !c.poll(|| true),
            "a new stream is not polled for"
        );
        assert_eq!(c.sleep(|| 7), 7);
        assert!(c.is_hot());
        assert!(c.poll(|| true));
        c.sleep(|| std::thread::sleep(Duration::from_millis(60)));
        assert!(!c.is_hot());
        c.sleep(|| ());
        c.cool();
        assert!(!c.is_hot());
    }
}
