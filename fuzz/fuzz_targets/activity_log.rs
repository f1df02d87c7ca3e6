//! A replica's activity log as a restart reads it: a volume size and log blocks,
//! each sealed with a correct checksum (see `tandem_replication::fuzz_activity_log`),
//! give the extents to resync, all inside the volume, or nothing; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_replication::fuzz_activity_log(data);
});
