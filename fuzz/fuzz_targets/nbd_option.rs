//! NBD handshake options: any bytes as an `NBD_OPT_INFO`/`GO` or a
//! `NBD_OPT_LIST`/`SET_META_CONTEXT` payload (see `tandem_nbd::fuzz_option`) parse to
//! a request or an error reply, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_nbd::fuzz_option(data);
});
