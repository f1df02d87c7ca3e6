//! The SR lock: multi-step operations (create, snapshot, clone, destroy...) of one SR
//! run one at a time across every host of the pool, since xapi runs calls concurrently
//! and with no timeout.
//!
//! The lock is a key of the SR's store, taken with a conditional write: `NODE PID
//! START EXPIRES`. A holder that died is noticed at once on its own node (its process
//! is gone), elsewhere when its lease expires.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_api::{KvCondition, NodeName, StoreName};

use crate::error::{Kind, XapiError};
use crate::meta::LOCK_KEY;
use crate::tandem::Tandem;

/// How long a holder may keep the lock before others may take it over: longer than a
/// call may run at all, so a holder alive is never taken over.
const LEASE: Duration = Duration::from_secs(crate::CALL_DEADLINE.as_secs() + 5 * 60);
/// How long a call waits for the lock before it gives up.
const WAIT: Duration = Duration::from_secs(300);
/// Between looks at a held lock: short, as most operations take tens of milliseconds.
const POLL: Duration = Duration::from_millis(20);

pub struct SrLock<'a> {
    tandem: &'a Tandem,
    store: StoreName,
    value: String,
}

#[derive(Debug, PartialEq, Eq)]
struct Holder {
    node: String,
    pid: u32,
    start: u64,
    expires_ms: u64,
}

impl Holder {
    fn parse(s: &str) -> Option<Holder> {
        let mut words = s.split(' ');
        let holder = Holder {
            node: words.next()?.to_owned(),
            pid: words.next()?.parse().ok()?,
            start: words.next()?.parse().ok()?,
            expires_ms: words.next()?.parse().ok()?,
        };
        words.next().is_none().then_some(holder)
    }

    /// Whether another call may take the lock from this holder.
    fn gone(&self, here: &NodeName, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
            || self.node == here.as_str() && start_time(self.pid) != Some(self.start)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When process `pid` started (clock ticks since boot), if it runs: a pid reused by
/// another process does not pass for the holder.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

impl<'a> SrLock<'a> {
    pub fn acquire(
        tandem: &'a Tandem,
        store: &StoreName,
        here: &NodeName,
    ) -> Result<SrLock<'a>, XapiError> {
        let pid = std::process::id();
        // Without it, the holder would look dead to the other calls of this node.
        let start = start_time(pid)
            .ok_or_else(|| XapiError::backend("cannot read this process's start time in /proc"))?;
        let deadline = Instant::now() + WAIT;
        loop {
            let value = format!(
                "{here} {pid} {start} {}",
                now_ms() + LEASE.as_millis() as u64
            );
            let condition = match tandem.kv_get(store, LOCK_KEY)? {
                None => Some(KvCondition::Absent),
                Some(old) => match Holder::parse(&old) {
                    Some(h) if !h.gone(here, now_ms()) => None,
                    // Dead, expired, or unreadable: taken over only if unchanged since read.
                    _ => Some(KvCondition::Value(old)),
                },
            };
            if let Some(condition) = condition
                && tandem.kv_set(store, LOCK_KEY, &value, Some(condition))?
            {
                return Ok(SrLock {
                    tandem,
                    store: store.clone(),
                    value,
                });
            }
            if Instant::now() >= deadline {
                let holder = tandem.kv_get(store, LOCK_KEY)?.unwrap_or_default();
                return Err(XapiError::new(
                    Kind::SrBusy,
                    [format!(
                        "another operation has held the SR for over {} s (holder: node, pid, start, lease end: {holder})",
                        WAIT.as_secs()
                    )],
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for SrLock<'_> {
    fn drop(&mut self) {
        // Only if still ours; a failure leaves the lease to expire.
        let _ = self
            .tandem
            .kv_delete(&self.store, LOCK_KEY, Some(&self.value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_parse_and_die() {
        let here: NodeName = "n1".parse().unwrap();
        let me = std::process::id();
        let start = start_time(me).unwrap();
        let alive = Holder::parse(&format!("n1 {me} {start} {}", now_ms() + 10_000)).unwrap();
        assert!(!alive.gone(&here, now_ms()));
        // The same pid with another start time is another process: the holder is gone.
        let reused = Holder {
            start: start + 1,
            ..Holder::parse(&format!("n1 {me} {start} {}", now_ms() + 10_000)).unwrap()
        };
        assert!(reused.gone(&here, now_ms()));
        // On another node only the lease tells.
        let remote = Holder::parse(&format!("n2 1 1 {}", now_ms() + 10_000)).unwrap();
        assert!(!remote.gone(&here, now_ms()));
        assert!(remote.gone(&here, now_ms() + 10_001));
        for bad in ["", "n1 x 1 1", "n1 1 1", "n1 1 1 1 1"] {
            assert_eq!(Holder::parse(bad), None, "{bad:?}");
        }
    }
}
