//! `tandemd`'s config file: any bytes as the TOML file (see
//! `tandemd::config::fuzz_config`) give settings or a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandemd::config::fuzz_config(data);
});
