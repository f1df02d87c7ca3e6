//! `tandem-chaos [SEED] [SECONDS]`: a chaos run (see `tandem_lab::chaos`), its event log
//! in `target/lab/chaos-SEED.log`; prints a one-line summary and exits 1 when it found
//! a lost write, differing replicas, a stuck volume or a crash.

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args
        .next()
        .map_or(1, |s| s.parse().expect("SEED: a number"));
    let seconds: u64 = args
        .next()
        .map_or(120, |s| s.parse().expect("SECONDS: a number"));
    let log = tandem_lab::bin_dir()
        .parent()
        .expect("target")
        .join("lab")
        .join(format!("chaos-{seed}.log"));
    std::fs::create_dir_all(log.parent().unwrap()).expect("target/lab");
    let cfg = tandem_lab::chaos::Config {
        seed,
        duration: Duration::from_secs(seconds),
        log: log.clone(),
    };
    let Some(summary) = tandem_lab::chaos::run(&cfg) else {
        eprintln!("tandem-chaos: needs root (network namespaces)");
        std::process::exit(2);
    };
    println!("{summary}");
    println!("event log: {}", log.display());
    for problem in (summary.lost.iter())
        .chain(&summary.differing)
        .chain(&summary.stuck)
        .chain(&summary.crashes)
    {
        println!("  {problem}");
    }
    std::process::exit(if summary.clean() { 0 } else { 1 });
}
