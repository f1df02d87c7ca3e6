//! The SR lock: multi-step operations (create, snapshot, clone, destroy...) of one SR
//! run one at a time across every host of the pool, since xapi runs calls concurrently
//! and with no timeout.
//!
//! The lock is a key of the SR's store, taken with a conditional write: `NODE PID
//! START EXPIRES`. Its holder renews the lease while it works; a holder that died is
//! noticed at once on its own node (its process is gone), elsewhere when its lease
//! runs out. A holder that finds its lock taken over, or cannot renew it in time, stops
//! at once ([`crate::fatal`]): what it left half done is the next holder's to settle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_api::{KvCondition, NodeName, StoreName};

use crate::error::{Kind, XapiError};
use crate::meta::LOCK_KEY;
use crate::tandem::Tandem;

/// How long a lease lasts: a host that dies holding the lock holds it this long.
const LEASE: Duration = Duration::from_secs(30);
/// How often a holder renews its lease: several tries before it runs out.
const RENEW: Duration = Duration::from_secs(5);
/// How long a call waits for the lock before it gives up.
const WAIT: Duration = Duration::from_secs(300);
/// Between looks at a held lock: short, as most operations take tens of milliseconds.
const POLL: Duration = Duration::from_millis(20);

pub struct SrLock<'a> {
    tandem: &'a Tandem,
    store: StoreName,
    /// What the key holds now (the renewals change it).
    value: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    renewal: Option<JoinHandle<()>>,
}

/// The lock's value: who holds it, until when.
fn lease_value(here: &NodeName, pid: u32, start: u64) -> String {
    format!(
        "{here} {pid} {start} {}",
        now_ms() + LEASE.as_millis() as u64
    )
}

/// Renews the lease every [`RENEW`] until stopped; stops the call if the lock is taken
/// over or the lease would run out unrenewed.
fn renew(
    tandem: Tandem,
    store: StoreName,
    value: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    here: NodeName,
    pid: u32,
    start: u64,
) {
    let mut renewed = Instant::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(RENEW);
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut current = value.lock().unwrap();
        let next = lease_value(&here, pid, start);
        let outcome = tandem.kv_set(
            &store,
            LOCK_KEY,
            &next,
            Some(KvCondition::Value(current.clone())),
        );
        match outcome {
            Ok(true) => {
                *current = next;
                renewed = Instant::now();
            }
            Ok(false) => crate::fatal(XapiError::new(
                Kind::SrBusy,
                ["the SR's lock was taken over while this call held it: it stops here; the next operation settles what it left".to_owned()],
            )),
            Err(e) if renewed.elapsed() + RENEW >= LEASE => crate::fatal(XapiError::new(
                e.kind,
                [format!("cannot renew the SR's lock before its lease ends: {e}")],
            )),
            Err(_) => {}
        }
    }
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
            let value = lease_value(here, pid, start);
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
                let value = Arc::new(Mutex::new(value));
                let stop = Arc::new(AtomicBool::new(false));
                let renewal = {
                    let (t, s, v, f, h) = (
                        tandem.clone(),
                        store.clone(),
                        value.clone(),
                        stop.clone(),
                        here.clone(),
                    );
                    std::thread::Builder::new()
                        .name("sr-lock".into())
                        .spawn(move || renew(t, s, v, f, h, pid, start))
                        .map_err(|e| {
                            XapiError::backend(format!("cannot start the lease's renewal: {e}"))
                        })?
                };
                return Ok(SrLock {
                    tandem,
                    store: store.clone(),
                    value,
                    stop,
                    renewal: Some(renewal),
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
        self.stop.store(true, Ordering::Release);
        if let Some(r) = self.renewal.take() {
            r.thread().unpark();
            let _ = r.join();
        }
        // Only if still ours; a failure leaves the lease to run out.
        let value = self.value.lock().unwrap().clone();
        let _ = self.tandem.kv_delete(&self.store, LOCK_KEY, Some(&value));
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
