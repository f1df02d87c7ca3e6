//! Replays the `api_body` fuzz corpus and every crash input found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI keeps each finding
//! fixed: every body decodes or is refused, never panics.

#[test]
fn the_api_body_corpus_decodes_or_is_refused_without_panicking() {
    let files = tandem_lab::fuzz_inputs("api_body");
    assert!(files.len() >= 9, "the corpus is missing: {files:?}");
    let (mut decoded, mut refused) = (0, 0);
    for path in &files {
        match tandem_api::fuzz_body(&std::fs::read(path).unwrap()) {
            Ok(_) => decoded += 1,
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
        decoded > 0 && refused > 0,
        "{decoded} decoded, {refused} refused"
    );
}
