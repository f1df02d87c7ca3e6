//! Replays the `config_file` fuzz corpus and every crash input found (`fuzz/corpus/`,
//! `fuzz/artifacts/`, see `fuzz/run`) on the stable toolchain, so CI keeps each finding
//! fixed: every config file gives settings or a reason, never a panic.

#[test]
fn the_config_file_corpus_settles_or_is_refused_without_panicking() {
    tandem_lab::replay_fuzz_corpus("config_file", 11, tandemd::config::fuzz_config);
}
