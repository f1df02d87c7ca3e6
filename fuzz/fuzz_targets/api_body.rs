//! API request bodies: any bytes as the JSON of one of the node or cluster API's
//! bodies (see `tandem_api::fuzz_body`), decoded (a volume spec also checked) or
//! refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tandem_api::fuzz_body(data);
});
