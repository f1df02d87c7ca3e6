//! The short chaos run (see `tandem_lab::chaos`): 60 s of seed 3, whose schedule kills
//! the node both writers (and so both volumes' Primaries) run through, and cuts,
//! freezes and throttles the others. Nothing acknowledged may be lost, the replicas
//! must verify identical, nothing stuck, nothing crashed.

use std::time::Duration;

#[test]
fn a_short_chaos_run_loses_nothing_and_leaves_nothing_stuck() {
    let log = tandem_lab::scratch("chaos-test").join("events.log");
    let cfg = tandem_lab::chaos::Config {
        seed: 3,
        duration: Duration::from_secs(60),
        log: log.clone(),
    };
    let Some(summary) = tandem_lab::chaos::run(&cfg) else {
        eprintln!("skipped: network namespaces need root");
        return;
    };
    let events = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("{summary}");
    assert!(summary.clean(), "{summary:#?}\n{events}");
    assert!(
        summary.faults.get("kill").copied().unwrap_or(0) >= 1,
        "{events}"
    );
    assert!(
        events.contains("writer moves"),
        "a Primary was killed under its writer: {events}"
    );
    assert!(summary.acknowledged > 1000, "{summary}");
}
