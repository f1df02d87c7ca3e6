//! NBD requests: any bytes as the terms of a session (reply mode, read-only, meta
//! contexts, export size) and a request header (see `tandem_nbd::fuzz_request`),
//! decoded and checked as a connection does: served or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_nbd::fuzz_request(data);
});
