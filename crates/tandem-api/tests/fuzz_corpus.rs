//! Replays the `api_body` fuzz corpus and every crash input found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI keeps each finding
//! fixed: every body decodes or is refused, never panics.

#[test]
fn the_api_body_corpus_decodes_or_is_refused_without_panicking() {
    tandem_lab::replay_fuzz_corpus("api_body", 9, tandem_api::fuzz_body);
}
