//! Replays the `nbd_option` and `nbd_request` fuzz corpora and every crash input found
//! (`fuzz/corpus/`, `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI
//! keeps each finding fixed: every option payload parses or gets an error reply, every
//! request is served or refused, never a panic.

#[test]
fn the_handshake_option_corpus_parses_or_is_refused_without_panicking() {
    tandem_lab::replay_fuzz_corpus("nbd_option", 10, tandem_nbd::fuzz_option);
}

#[test]
fn the_request_corpus_is_served_or_refused_without_panicking() {
    tandem_lab::replay_fuzz_corpus("nbd_request", 8, tandem_nbd::fuzz_request);
}

/// What the request checks decide, through the fuzz entry point: session terms byte,
/// export size, header.
#[test]
fn requests_are_checked_against_their_session() {
    let gib = (1u64 << 30).to_be_bytes();
    let simple = |terms: u8, flags: u16, kind: u16, offset: u64, len: u32| {
        let mut d = vec![terms];
        d.extend_from_slice(&gib);
        d.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d.extend_from_slice(&kind.to_be_bytes());
        d.extend_from_slice(&7u64.to_be_bytes());
        d.extend_from_slice(&offset.to_be_bytes());
        d.extend_from_slice(&len.to_be_bytes());
        tandem_nbd::fuzz_request(&d)
    };
    let (read, write, flush, block_status) = (0, 1, 3, 7);
    assert!(simple(0, 0, read, 0, 4096).is_ok());
    // Read-only (terms bit 0x04): a write is refused with EPERM, a read served.
    assert!(
        simple(1 | 4, 0, write, 0, 4096)
            .unwrap_err()
            .starts_with("Perm")
    );
    assert!(simple(1 | 4, 0, read, 0, 4096).is_ok());
    // Past the end, and an offset that overflows: refused, no panic.
    assert!(
        simple(1, 0, write, (1 << 30) - 512, 4096)
            .unwrap_err()
            .starts_with("NoSpc")
    );
    assert!(
        simple(1, 0, read, u64::MAX, 2)
            .unwrap_err()
            .contains("past the end")
    );
    // DF only with structured replies; FLUSH with a length; BLOCK_STATUS without a context.
    assert!(
        simple(0, 4, read, 0, 512)
            .unwrap_err()
            .contains("DF needs structured")
    );
    assert!(simple(1, 4, read, 0, 512).is_ok());
    assert!(
        simple(1, 0, flush, 0, 1)
            .unwrap_err()
            .contains("FLUSH takes no")
    );
    assert!(
        simple(1, 0, block_status, 0, 4096)
            .unwrap_err()
            .contains("meta context")
    );
    assert!(simple(1 | 16, 0, block_status, 0, 4096).is_ok());
    assert!(
        simple(1, 0, 42, 0, 0)
            .unwrap_err()
            .contains("unknown command 42")
    );
}
