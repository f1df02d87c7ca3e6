//! A rate limit for log lines about floods: one line a second at most, however many
//! events call for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub struct OncePerSecond {
    started: Instant,
    /// The second (since `started`) of the last line; `u64::MAX` before any.
    last: AtomicU64,
}

impl Default for OncePerSecond {
    fn default() -> Self {
        OncePerSecond {
            started: Instant::now(),
            last: AtomicU64::new(u64::MAX),
        }
    }
}

impl OncePerSecond {
    /// Whether a line may go out now (and none other this second).
    pub fn due(&self) -> bool {
        let now = self.started.elapsed().as_secs();
        self.last.swap(now, Ordering::Relaxed) != now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second() {
        let limit = OncePerSecond::default();
        assert!(limit.due());
        assert!(!limit.due());
        assert!(!limit.due());
    }
}
