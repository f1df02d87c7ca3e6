//! The short chaos run (see `tandem_lab::chaos`): 60 s of seed 34, whose schedule has
//! every kind of fault: a Primary killed under its writer (which moves to another
//! node), another node killed, a cable pulled, a node frozen, a link throttled, a
//! pool's file system shut down and one filled up; writes of 4 KiB to 4 MiB at depth
//! and control-plane changes go on meanwhile. Nothing acknowledged may be lost, the
//! replicas must verify identical, nothing stuck, nothing crashed.

use std::time::Duration;

#[test]
fn a_short_chaos_run_loses_nothing_and_leaves_nothing_stuck() {
    let log = tandem_lab::scratch("chaos-test").join("events.log");
    let cfg = tandem_lab::chaos::Config {
        seed: 34,
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
        events.contains("writer moves"),
        "a Primary was killed under its writer: {events}"
    );
    for kind in ["kill-primary", "kill", "cut", "freeze", "throttle"] {
        assert!(summary.faults.contains_key(kind), "no {kind}: {events}");
    }
    // Disk faults need pools on xfs (loop devices, mkfs.xfs): the CI machine has them.
    if !events.contains("no xfs here") {
        for kind in ["disk-dies", "disk-full"] {
            assert!(summary.faults.contains_key(kind), "no {kind}: {events}");
        }
    }
    assert!(summary.acknowledged > 1000, "{summary}");
    assert!(summary.changes > 10, "{summary}");
}
