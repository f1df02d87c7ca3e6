//! Fault points for tests: with `TANDEM_XAPI_FAULT=NAME` in its environment, a plugin
//! call dies at the point NAME as a killed process would (no cleanup, locks held), so
//! tests can check that the next call completes or undoes the operation.

/// The environment variable naming the point to die at.
pub const VAR: &str = "TANDEM_XAPI_FAULT";

pub fn point(name: &str) {
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        eprintln!("tandem xapi: dying at fault point {name} ({VAR})");
        // SAFETY: _exit only ends the process; skipping every destructor is the point.
        unsafe { libc::_exit(137) };
    }
}
