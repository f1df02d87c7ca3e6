//! The peer protocol: any bytes as one message (header, payload), as a receiver takes
//! it. Whatever comes in, parsing returns a message or an error, never panics; a
//! header that parses encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_replication::wire::{self, HEADER_LEN, Header};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, _)) = wire::parse(data) {
        let head: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        assert_eq!(Header::decode(head).unwrap(), header);
        assert_eq!(&header.encode(), head);
    }
});
