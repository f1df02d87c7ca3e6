//! Telling the node that a volume's state changed, as it happens: role, disk state, a
//! peer's connection, disk or replication state, quorum, resync progress (at most
//! once a second). The node turns these into events (`GET /v1/node/events`); nothing
//! needs to poll for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_api::VolumeName;

/// Called with a volume's name each time its state changes; must not block.
pub type OnChange = Arc<dyn Fn(&VolumeName) + Send + Sync>;

/// One volume's line to the node's [`OnChange`].
#[derive(Clone)]
pub(crate) struct Notify {
    volume: VolumeName,
    on_change: OnChange,
}

impl Notify {
    pub fn new(volume: VolumeName, on_change: OnChange) -> Notify {
        Notify { volume, on_change }
    }

    pub fn fire(&self) {
        (self.on_change)(&self.volume);
    }
}

/// How often progress (resync, verify) is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Reports progress at most every [`PROGRESS_EVERY`].
pub(crate) struct Progress {
    started: Instant,
    /// When progress was last reported, in ms since `started`.
    last: AtomicU64,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Fires `notify` if the last report is old enough.
    pub fn tick(&self, notify: &Notify) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PROGRESS_EVERY.as_millis() as u64
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            notify.fire();
        }
    }
}
