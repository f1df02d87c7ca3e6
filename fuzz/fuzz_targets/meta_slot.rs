//! A replica's metadata superblock slot: any bytes, sealed into a slot with a correct
//! checksum (see `tandem_pool::meta::fuzz_slot`), decode to a superblock or a
//! refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_pool::meta::fuzz_slot(data);
});
