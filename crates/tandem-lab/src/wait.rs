//! Waiting for something to happen: [`poll`] gives up quietly, [`wait_for`] panics with
//! what it waited for, what it saw instead, and the logs of the nodes concerned.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::{Node, logs};

/// How often conditions are checked.
const EVERY: Duration = Duration::from_millis(50);

/// Calls `f` every 50 ms until it returns `Some`, for at most `timeout` (at least once).
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(EVERY);
    }
}

/// What a check of [`wait_for`] returns: whether the condition holds (with a value), and
/// if not, what was seen instead.
pub trait Condition {
    type Value;
    /// `Ok` when the condition holds; `Err` with what was seen otherwise.
    fn met(self) -> Result<Self::Value, String>;
}

impl Condition for bool {
    type Value = ();
    fn met(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Condition for Option<T> {
    type Value = T;
    fn met(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Condition for Result<T, String> {
    type Value = T;
    fn met(self) -> Result<T, String> {
        self
    }
}

/// Checks every 50 ms until `check` holds, for at most `timeout`, and returns its value.
/// On timeout it panics, saying `what` was awaited, what the last check saw instead, and
/// the logs of `nodes`.
pub fn wait_for<C: Condition>(
    what: &str,
    timeout: Duration,
    nodes: &[&Node],
    mut check: impl FnMut() -> C,
) -> C::Value {
    let mut seen = String::new();
    let value = poll(timeout, || check().met().map_err(|s| seen = s).ok());
    value.unwrap_or_else(|| {
        panic!(
            "timed out after {timeout:?} waiting until {what}\n{seen}\n{}",
            logs(nodes)
        )
    })
}

/// Waits up to `limit` for a child process to exit; `None` if it is still running.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    poll(limit, || {
        child.try_wait().expect("wait for a child process")
    })
}
