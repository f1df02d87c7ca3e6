//! Replays the `nbd_option` fuzz corpus and every crash input found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI keeps each
//! finding fixed: every option payload parses or gets an error reply, never a panic.

#[test]
fn the_handshake_option_corpus_parses_or_is_refused_without_panicking() {
    let files = tandem_lab::fuzz_inputs("nbd_option");
    assert!(files.len() > 10, "the corpus is missing: {files:?}");
    let (mut parsed, mut refused) = (0, 0);
    for path in &files {
        match tandem_nbd::fuzz_option(&std::fs::read(path).unwrap()) {
            Ok(_) => parsed += 1,
            Err(why) => {
                assert!(
                    !why.is_empty(),
                    "{}: an error without a message",
                    path.display()
                );
                refused += 1;
            }
        }
    }
    assert!(
        parsed > 0 && refused > 0,
        "{parsed} parsed, {refused} refused"
    );
}
