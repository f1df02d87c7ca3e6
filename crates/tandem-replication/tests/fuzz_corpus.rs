//! Replays the fuzz corpora and every crash input the fuzzers found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) through the same parsers on the stable
//! toolchain, so CI keeps each finding fixed: every input gives a message or an error,
//! never a panic.

use tandem_replication::wire::{self, Parsed};

#[test]
fn the_peer_protocol_corpus_parses_or_is_refused_without_panicking() {
    let files = tandem_lab::fuzz_inputs("peer_wire");
    assert!(files.len() >= 6, "the corpus is missing: {files:?}");
    let (mut parsed, mut refused) = (0, 0);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        match wire::parse(&data) {
            Ok((header, body)) => {
                parsed += 1;
                assert_eq!(
                    &header.encode()[..],
                    &data[..wire::HEADER_LEN],
                    "{}",
                    path.display()
                );
                if let Parsed::Ranges(r) = body {
                    assert!(r.len() <= wire::MAX_RANGES);
                }
            }
            Err(_) => refused += 1,
        }
    }
    // The seeds hold valid messages and refused ones alike.
    assert!(
        parsed > 0 && refused > 0,
        "{parsed} parsed, {refused} refused"
    );
}

#[test]
fn the_activity_log_corpus_recovers_or_is_refused_without_panicking() {
    tandem_lab::replay_fuzz_corpus("activity_log", 6, tandem_replication::fuzz_activity_log);
}
