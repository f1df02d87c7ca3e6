//! Replays the `meta_slot` fuzz corpus and every crash input found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI keeps each
//! finding fixed: every input decodes or is refused, never panics.

#[test]
fn the_metadata_slot_corpus_decodes_or_is_refused_without_panicking() {
    let files = tandem_lab::fuzz_inputs("meta_slot");
    assert!(files.len() > 10, "the corpus is missing: {files:?}");
    // The first finding: an activity-log offset near 2^64 made the layout check
    // overflow (a panic) instead of refusing the slot.
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("crash-6547ba1d75c5106d52b721e9e6f6bca3ca8bfb19")),
        "the overflow's crash input is kept"
    );
    let (mut valid, mut refused) = (0, 0);
    for path in &files {
        match tandem_pool::meta::fuzz_slot(&std::fs::read(path).unwrap()) {
            Ok(_) => valid += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        valid > 0 && refused > 0,
        "{valid} decoded, {refused} refused"
    );
}
