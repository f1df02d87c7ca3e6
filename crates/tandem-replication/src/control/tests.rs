use super::*;
use crate::wire::history;

#[test]
fn resync_state_changes_follow_the_table() {
    let (src, vfy) = (Sync::Source { total: 8 }, Sync::Verifying { done: 4 });
    let (idle, target) = (Sync::Idle, Sync::Target);
    let allowed = [
        (idle, idle),
        (idle, src),
        (idle, target),
        (idle, vfy),
        (src, idle),
        (src, Sync::Source { total: 2 }),
        (target, idle),
        (vfy, Sync::Verifying { done: 8 }),
        (vfy, idle),
    ];
    let refused = [
        (src, target),
        (src, vfy),
        (target, src),
        (target, target),
        (target, vfy),
        (vfy, src),
        (vfy, target),
    ];
    for (from, to) in allowed {
        assert!(from.allows(to), "{from:?} -> {to:?} must be allowed");
    }
    for (from, to) in refused {
        assert!(!from.allows(to), "{from:?} -> {to:?} must be refused");
    }
}

const G1: u64 = 0x11;
const G2: u64 = 0x22;
const G3: u64 = 0x33;

fn id(n: u8) -> NodeId {
    NodeId::new(n).unwrap()
}

fn gens(current: u64) -> Generations {
    Generations {
        current: GenerationId(current),
        ..Generations::default()
    }
}

/// Node 1 with a replica at `disk`/`generation`; node 2 diskful, node 3 tiebreaker,
/// both down.
fn node(disk: DiskState, generation: u64) -> Control {
    Control {
        me: id(1),
        replica: true,
        writers: 0,
        promoting: false,
        two_primaries: false,
        disk,
        gens: gens(generation),
        confirmed: generation,
        whole_at: if disk == DiskState::UpToDate {
            generation
        } else {
            0
        },
        peers: vec![
            PeerControl::new(id(2), ParticipantKind::Diskful, 0),
            PeerControl::new(id(3), ParticipantKind::Tiebreaker, 0),
        ],
    }
}

fn state(role: Role, disk: DiskState, generation: u64) -> State {
    State {
        role,
        disk,
        generation,
    }
}

fn connect(c: &Control, peer: u8, s: State, their_mark: u64, dirty: (bool, bool)) -> Stepped {
    let theirs = if dirty.1 { vec![(0, 4096)] } else { vec![] };
    step(
        c,
        &Event::Connected {
            peer: id(peer),
            epoch: 7,
            state: s,
            their_mark,
            their_history: history(&[]),
            their_confirmed: s.generation,
            my_dirty: dirty.0,
            theirs,
        },
    )
    .expect("connects")
}

fn with_peer(mut c: Control, peer: u8, f: impl FnOnce(&mut PeerControl)) -> Control {
    f(c.peers.iter_mut().find(|p| p.id == id(peer)).unwrap());
    c
}

fn up(c: Control, peer: u8, s: State) -> Control {
    with_peer(c, peer, |p| {
        p.link = Link::Up { epoch: 7 };
        p.remote = Some(s);
    })
}

#[test]
fn the_handshake_decides_the_resync_from_generations() {
    use DiskState::*;
    let secondary = |disk, g| state(Role::Secondary, disk, g);
    // (this replica, its mark for the peer, the peer's state, its mark, dirty (mine,
    // theirs)) -> (sync with the peer, disk here afterwards, whether all is marked)
    let cases = [
        // Same generation, nobody knows of a difference: in sync.
        (
            (UpToDate, G1, 0),
            secondary(UpToDate, G1),
            0,
            (false, false),
            (Sync::Idle, UpToDate, false),
        ),
        // Same generation, this side knows of ranges the peer lacks.
        (
            (UpToDate, G1, 0),
            secondary(UpToDate, G1),
            0,
            (true, false),
            (Sync::Source { total: 0 }, UpToDate, false),
        ),
        // The peer knows of ranges this side lacks.
        (
            (UpToDate, G1, 0),
            secondary(UpToDate, G1),
            0,
            (false, true),
            (Sync::Target, Inconsistent, false),
        ),
        // The peer is at the generation this side recorded when it left: behind by the bitmap.
        (
            (UpToDate, G2, G1),
            secondary(UpToDate, G1),
            0,
            (true, false),
            (Sync::Source { total: 0 }, UpToDate, false),
        ),
        // This side is at the generation the peer recorded: this side is behind.
        (
            (UpToDate, G1, 0),
            secondary(UpToDate, G2),
            G1,
            (false, true),
            (Sync::Target, Inconsistent, false),
        ),
        // A fresh peer, holding nothing: full resync.
        (
            (UpToDate, G2, 0),
            secondary(Inconsistent, 0),
            0,
            (false, false),
            (Sync::Source { total: 0 }, UpToDate, true),
        ),
        // An Outdated peer this side tracked: only the bitmap.
        (
            (UpToDate, G2, G1),
            secondary(Outdated, G1),
            0,
            (false, false),
            (Sync::Source { total: 0 }, UpToDate, false),
        ),
        // An Inconsistent one: everything (only its source knew what it lacks).
        (
            (UpToDate, G2, G1),
            secondary(Inconsistent, G1),
            0,
            (false, false),
            (Sync::Source { total: 0 }, UpToDate, true),
        ),
        // This side holds nothing, the peer is whole.
        (
            (Inconsistent, 0, 0),
            secondary(UpToDate, G2),
            0,
            (false, false),
            (Sync::Target, Inconsistent, false),
        ),
        // Neither is whole: connected, waiting.
        (
            (Outdated, G1, 0),
            secondary(Inconsistent, G2),
            0,
            (false, false),
            (Sync::Idle, Outdated, false),
        ),
        // A peer without a replica yet gets nothing.
        (
            (UpToDate, G1, 0),
            secondary(Diskless, 0),
            0,
            (false, false),
            (Sync::Idle, UpToDate, false),
        ),
    ];
    for ((disk, g, mark), theirs, their_mark, dirty, (sync, disk_after, full)) in cases {
        let c = with_peer(node(disk, g), 2, |p| p.mark = mark);
        let (n, actions) = connect(&c, 2, theirs, their_mark, dirty);
        let p = n.peer(id(2)).unwrap();
        let case =
            format!("{disk:?} {g:x} mark {mark:x} vs {theirs:?} mark {their_mark:x} {dirty:?}");
        assert_eq!(p.link, Link::Up { epoch: 7 }, "{case}");
        assert_eq!(p.remote, Some(theirs), "{case}");
        assert_eq!(p.sync, sync, "{case}");
        assert_eq!(n.disk, disk_after, "{case}");
        assert_eq!(actions.contains(&Action::MarkAll(id(2))), full, "{case}");
        let resyncs = actions.contains(&Action::StartResync {
            peer: id(2),
            epoch: 7,
        });
        assert_eq!(resyncs, matches!(sync, Sync::Source { .. }), "{case}");
        let receives = actions.contains(&Action::ResyncFrom(id(2)));
        assert_eq!(receives, sync == Sync::Target, "{case}");
        assert_eq!(
            receives,
            actions.contains(&Action::ClearAll(id(2))),
            "{case}"
        );
        if dirty.1 && resyncs && !full {
            assert!(
                actions.contains(&Action::Mark {
                    peer: id(2),
                    ranges: vec![(0, 4096)]
                }),
                "{case}"
            );
        }
    }
}

#[test]
fn diverged_replicas_are_refused_and_keep_their_data() {
    let c = node(DiskState::UpToDate, G1);
    let (n, actions) = connect(
        &c,
        2,
        state(Role::Primary, DiskState::UpToDate, G2),
        0,
        (false, false),
    );
    let p = n.peer(id(2)).unwrap();
    assert!(matches!(&p.link, Link::Refused(why) if why.contains("split brain")));
    assert_eq!(p.remote, None);
    assert_eq!((n.disk, n.gens), (DiskState::UpToDate, gens(G1)));
    assert!(actions.contains(&Action::Disconnect(id(2))));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::PrimaryAppeared(_)))
    );
    // A refused peer stays refused until an operator reconnects it.
    let again = step(
        &n,
        &Event::Connected {
            peer: id(2),
            epoch: 8,
            state: state(Role::Secondary, DiskState::UpToDate, G2),
            their_mark: 0,
            their_history: history(&[]),
            their_confirmed: 0,
            my_dirty: false,
            theirs: vec![],
        },
    );
    assert!(again.is_err());
    let (n, actions) = step(&n, &Event::Reconnect).unwrap();
    assert_eq!(n.peer(id(2)).unwrap().link, Link::Down);
    assert!(actions.contains(&Action::Disconnect(id(2))));
}

#[test]
fn a_tiebreaker_that_saw_a_newer_generation_outdates_this_replica() {
    let c = node(DiskState::UpToDate, G1);
    let (n, actions) = connect(
        &c,
        3,
        state(Role::Secondary, DiskState::Diskless, G2),
        0,
        (false, false),
    );
    assert_eq!(n.disk, DiskState::Outdated);
    assert!(actions.contains(&Action::LeftBehind {
        peer: id(3),
        generation: G2
    }));
    // One it knows (its own history) changes nothing.
    let mut known = node(DiskState::UpToDate, G2);
    known.gens.history[0] = GenerationId(G1);
    let (n, _) = connect(
        &known,
        3,
        state(Role::Secondary, DiskState::Diskless, G1),
        0,
        (false, false),
    );
    assert_eq!(n.disk, DiskState::UpToDate);
}

#[test]
fn a_diskless_node_learns_the_primarys_generation() {
    let mut c = node(DiskState::Diskless, 0);
    c.replica = false;
    let (n, _) = connect(
        &c,
        2,
        state(Role::Primary, DiskState::UpToDate, G2),
        0,
        (false, false),
    );
    assert_eq!(n.gens.current.0, G2);
    let (n, _) = step(
        &n,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Primary, DiskState::UpToDate, G3),
        },
    )
    .unwrap();
    assert_eq!(n.state().generation, G3);
}

/// A replica whose disk failed repeats the Primary's new generation, as a node without
/// data does: it still counts among the voters agreeing with the Primary, which goes on
/// writing with a two-replica volume.
#[test]
fn a_replica_whose_disk_failed_follows_the_primarys_generation() {
    let c = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Primary, DiskState::UpToDate, G1),
    );
    let (failed, _) = step(&c, &Event::LocalIoError { next: G3 }).unwrap();
    let (n, actions) = step(
        &failed,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Primary, DiskState::UpToDate, G2),
        },
    )
    .unwrap();
    assert_eq!(n.state().generation, G2);
    assert_eq!(n.disk, DiskState::Failed);
    assert!(actions.contains(&Action::Announce));
    // The Primary's side: the peer's disk failed; all of the volume is resynced to it
    // once it is back (writes it had acknowledged may be lost with its disk).
    let primary = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Secondary, DiskState::UpToDate, G1),
    );
    let (after, actions) = step(
        &primary,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::Failed, G1),
        },
    )
    .unwrap();
    assert!(actions.contains(&Action::MarkAll(id(2))), "{actions:?}");
    assert_eq!(after.peer(id(2)).unwrap().mark, G1);
    // Reported again, it is not marked again.
    let (_, actions) = step(
        &after,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::Failed, G1),
        },
    )
    .unwrap();
    assert!(!actions.contains(&Action::MarkAll(id(2))));
}

#[test]
fn promotion_is_granted_refused_and_ended_by_the_table() {
    let s = state(Role::Secondary, DiskState::UpToDate, G1);
    let c = up(node(DiskState::UpToDate, G1), 2, s);
    // A peer asks: granted, and it counts as Primary from now on.
    let asked = |c: &Control, two_primaries| {
        let c = Control {
            two_primaries,
            ..c.clone()
        };
        step(&c, &Event::PromotionAsked { peer: id(2) })
    };
    let (n, actions) = asked(&c, false).unwrap();
    assert!(n.peer(id(2)).unwrap().is_primary());
    assert!(actions.contains(&Action::PrimaryAppeared(id(2))));
    // Refused while Primary here, or while this lower node id is asking too.
    let primary = Control {
        writers: 1,
        ..c.clone()
    };
    assert!(asked(&primary, false).is_err());
    assert!(asked(&primary, true).is_ok());
    let promoting = Control {
        promoting: true,
        ..c.clone()
    };
    assert!(asked(&promoting, false).is_err());
    // Refused while connected to another Primary, which the asker cannot see.
    let other = up(c.clone(), 3, state(Role::Primary, DiskState::Diskless, G1));
    assert!(asked(&other, false).is_err());
    assert!(asked(&other, true).is_ok());
    // Asking: refused while a peer is Primary, without quorum, or when a promotion
    // runs already.
    let start = |c: &Control, two_primaries, quorum| {
        let c = Control {
            two_primaries,
            ..c.clone()
        };
        step(&c, &Event::PromotionStarted { quorum })
    };
    let (seen, _) = asked(&c, false).unwrap();
    assert!(start(&seen, false, true).is_err());
    assert!(start(&seen, true, true).is_ok());
    assert!(start(&c, false, false).is_err());
    let (asking, _) = start(&c, false, true).unwrap();
    assert!(asking.promoting && asking.role() == Role::Secondary);
    assert!(start(&asking, false, true).is_err());
    // Agreed: Primary, announced. Not agreed: Secondary, announced to correct peers.
    let (n, actions) = step(
        &asking,
        &Event::PromotionEnded {
            agreed: true,
            quorum: true,
        },
    )
    .unwrap();
    assert_eq!(
        (n.role(), n.promoting, n.writers),
        (Role::Primary, false, 1)
    );
    assert!(actions.contains(&Action::Announce));
    let (n2, actions) = step(
        &asking,
        &Event::PromotionEnded {
            agreed: false,
            quorum: true,
        },
    )
    .unwrap();
    assert_eq!((n2.role(), n2.promoting), (Role::Secondary, false));
    // Agreed, but quorum went with peers that left unasked, or this node granted a
    // peer's promotion meanwhile: Secondary.
    let (n3, _) = step(
        &asking,
        &Event::PromotionEnded {
            agreed: true,
            quorum: false,
        },
    )
    .unwrap();
    assert_eq!(n3.role(), Role::Secondary);
    let granted = up(
        asking.clone(),
        2,
        state(Role::Primary, DiskState::UpToDate, G1),
    );
    let (n3, _) = step(
        &granted,
        &Event::PromotionEnded {
            agreed: true,
            quorum: true,
        },
    )
    .unwrap();
    assert_eq!(n3.role(), Role::Secondary);
    assert!(actions.contains(&Action::Announce));
    assert!(
        step(
            &n2,
            &Event::PromotionEnded {
                agreed: true,
                quorum: true
            }
        )
        .is_err(),
        "none under way"
    );
    // More writers, then closing: Secondary after the last, its activity log emptied.
    let (n, _) = step(&n, &Event::Opened).unwrap();
    let (n, actions) = step(&n, &Event::Closed).unwrap();
    assert_eq!((n.writers, actions.len()), (1, 0));
    let (n, actions) = step(&n, &Event::Closed).unwrap();
    assert_eq!(n.role(), Role::Secondary);
    assert!(actions.contains(&Action::ClearActivityLog));
    assert!(step(&n, &Event::Closed).is_err());
    assert!(
        step(&n, &Event::Opened).is_err(),
        "a Secondary is opened by promotion"
    );
}

#[test]
fn a_resync_ends_only_where_it_runs() {
    let source = state(Role::Secondary, DiskState::UpToDate, G2);
    let c = node(DiskState::Inconsistent, 0);
    let (target, _) = connect(&c, 2, source, 0, (false, false));
    assert_eq!(target.peer(id(2)).unwrap().sync, Sync::Target);
    let done = |primary_elsewhere| Event::ResyncDone {
        peer: id(2),
        generation: G2,
        primary_elsewhere,
    };
    // From a peer this replica does not receive from: refused, nothing changes.
    let other = up(node(DiskState::Inconsistent, G1), 2, source);
    assert!(step(&other, &done(false)).is_err());
    // From its source: UpToDate at the source's generation, on the source's line.
    let (n, actions) = step(&target, &done(false)).unwrap();
    assert_eq!(
        (n.disk, n.gens.current.0, n.gens.history[0].0),
        (DiskState::UpToDate, G2, 0)
    );
    assert_eq!(n.peer(id(2)).unwrap().sync, Sync::Idle);
    assert!(
        actions.contains(&Action::ResyncFinished(id(2))) && actions.contains(&Action::Announce)
    );
    assert!(step(&n, &done(false)).is_err(), "twice");
    // From a Secondary that follows a Primary this replica does not reach: whole, but
    // the Primary's later writes pass it by.
    let (n, _) = step(&target, &done(true)).unwrap();
    assert_eq!((n.disk, n.gens.current.0), (DiskState::Outdated, G2));
}

#[test]
fn a_source_resync_starts_finishes_and_is_refused_by_the_table() {
    let c = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Secondary, DiskState::Inconsistent, G1),
    );
    let c = with_peer(c, 2, |p| p.mark = G1);
    let started = |c: &Control, epoch| {
        step(
            c,
            &Event::ResyncStarted {
                peer: id(2),
                epoch,
                total: 4096,
            },
        )
    };
    assert!(started(&c, 6).is_err(), "an old connection");
    let (n, _) = started(&c, 7).unwrap();
    assert_eq!(n.peer(id(2)).unwrap().sync, Sync::Source { total: 4096 });
    assert!(
        step(
            &n,
            &Event::Verify {
                peer: id(2),
                done: Some(0)
            }
        )
        .is_err(),
        "verify during a resync"
    );
    let (done, actions) = step(
        &n,
        &Event::ResyncSent {
            peer: id(2),
            epoch: 7,
        },
    )
    .unwrap();
    let p = done.peer(id(2)).unwrap();
    assert_eq!((p.sync, p.mark), (Sync::Idle, 0));
    assert!(actions.contains(&Action::SettleSuspect));
    assert!(
        step(
            &done,
            &Event::ResyncSent {
                peer: id(2),
                epoch: 7
            }
        )
        .is_err(),
        "none under way"
    );
    // Declined (a Primary resyncs the peer): deferred. Refused: retried, once due.
    let (d, _) = step(
        &n,
        &Event::ResyncRefused {
            peer: id(2),
            epoch: 7,
            declined: true,
        },
    )
    .unwrap();
    assert!(d.peer(id(2)).unwrap().deferred);
    let (r, _) = step(
        &n,
        &Event::ResyncRefused {
            peer: id(2),
            epoch: 7,
            declined: false,
        },
    )
    .unwrap();
    assert!(r.peer(id(2)).unwrap().resync_due);
    assert!(
        step(
            &d,
            &Event::ResyncRetry {
                peer: id(2),
                epoch: 7
            }
        )
        .is_err()
    );
    let (r, actions) = step(
        &r,
        &Event::ResyncRetry {
            peer: id(2),
            epoch: 7,
        },
    )
    .unwrap();
    assert_eq!(
        actions,
        [Action::StartResync {
            peer: id(2),
            epoch: 7
        }]
    );
    assert!(!r.peer(id(2)).unwrap().resync_due);
}

#[test]
fn a_disconnect_ends_the_connections_state_and_starts_tracking() {
    let c = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Primary, DiskState::UpToDate, G1),
    );
    let c = with_peer(c, 2, |p| p.sync = Sync::Source { total: 1 });
    // An older connection's end changes nothing.
    let (n, actions) = step(
        &c,
        &Event::Disconnected {
            peer: id(2),
            epoch: 6,
        },
    )
    .unwrap();
    assert_eq!((n, actions), (c.clone(), vec![]));
    let (n, _) = step(
        &c,
        &Event::Disconnected {
            peer: id(2),
            epoch: 7,
        },
    )
    .unwrap();
    let p = n.peer(id(2)).unwrap();
    assert_eq!(
        (&p.link, p.remote, p.sync, p.mark),
        (&Link::Down, None, Sync::Idle, G1)
    );
    assert!(n.persisted_differs(&c));
    // State from a peer that is not connected is refused.
    assert!(
        step(
            &n,
            &Event::PeerState {
                peer: id(2),
                state: state(Role::Primary, DiskState::UpToDate, G1)
            }
        )
        .is_err()
    );
}

#[test]
fn a_replica_whose_resync_source_is_lost_reconnects_to_a_whole_one() {
    // Node 1 is Inconsistent, resynced by node 2 (Primary); node 4, a whole Secondary,
    // was declined as a source meanwhile.
    let mut c = node(DiskState::Inconsistent, G1);
    c.peers
        .push(PeerControl::new(id(4), ParticipantKind::Diskful, 0));
    let c = up(c, 2, state(Role::Primary, DiskState::UpToDate, G2));
    let c = up(c, 4, state(Role::Secondary, DiskState::UpToDate, G2));
    let c = with_peer(c, 2, |p| p.sync = Sync::Target);
    let lost = Event::Disconnected {
        peer: id(2),
        epoch: 7,
    };
    let (_, actions) = step(&c, &lost).unwrap();
    assert!(actions.contains(&Action::Disconnect(id(4))), "{actions:?}");
    assert!(!actions.contains(&Action::Disconnect(id(3))), "{actions:?}");
    // Resynced by another already, or the lost peer was not the source (this node
    // closed it to restart its handshake, say): nothing restarts.
    for c in [
        with_peer(c.clone(), 4, |p| p.sync = Sync::Target),
        with_peer(c.clone(), 2, |p| p.sync = Sync::Idle),
    ] {
        let (_, actions) = step(&c, &lost).unwrap();
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Disconnect(_))),
            "{actions:?}"
        );
    }
    // Node 2 gone without having resynced it, node 4 becomes Primary: the replica
    // reconnects to it, so that its handshake starts the resync.
    let (n, _) = step(&with_peer(c.clone(), 2, |p| p.sync = Sync::Idle), &lost).unwrap();
    let promoted = Event::PeerState {
        peer: id(4),
        state: state(Role::Primary, DiskState::UpToDate, G3),
    };
    let (_, actions) = step(&n, &promoted).unwrap();
    assert!(actions.contains(&Action::Disconnect(id(4))), "{actions:?}");
    // Not when node 4 resyncs it already, or when it is whole.
    for n in [
        with_peer(n.clone(), 4, |p| p.sync = Sync::Target),
        Control {
            disk: DiskState::Outdated,
            ..n.clone()
        },
    ] {
        let (_, actions) = step(&n, &promoted).unwrap();
        assert!(!actions.contains(&Action::Disconnect(id(4))), "{actions:?}");
    }
}

#[test]
fn a_write_that_leaves_a_replica_behind_starts_a_generation() {
    let primary = |disk| Control {
        writers: 1,
        ..node(disk, G1)
    };
    let c = primary(DiskState::UpToDate);
    let rotate = |c: &Control, receiving: Vec<NodeId>| {
        step(
            c,
            &Event::Rotate {
                receiving,
                next: G2,
            },
        )
        .unwrap()
    };
    // Node 2 receives: nothing changes.
    let (n, actions) = rotate(&c, vec![id(2)]);
    assert_eq!((n.gens, actions.len()), (c.gens, 0));
    // Node 2 misses it and still shares G1: G2 starts, G1 is what its bitmap marks from.
    let (n, actions) = rotate(&c, vec![]);
    assert_eq!((n.gens.current.0, n.gens.bitmap.0), (G2, G1));
    assert_eq!(n.peer(id(2)).unwrap().mark, G1);
    assert!(actions.contains(&Action::NewGeneration(G2)));
    // Already behind: no new generation per write.
    let (again, actions) = step(
        &n,
        &Event::Rotate {
            receiving: vec![],
            next: G3,
        },
    )
    .unwrap();
    assert_eq!((again.gens.current.0, actions.len()), (G2, 0));
    // Nor does a Secondary, or a Primary whose replica failed and which reaches no
    // whole one. One whose replica is being resynced does while a whole peer takes
    // its writes: the generation names that peer's data.
    let (n, _) = rotate(&node(DiskState::UpToDate, G1), vec![]);
    assert_eq!(n.gens.current.0, G1);
    let (n, _) = rotate(&primary(DiskState::Failed), vec![]);
    assert_eq!(n.gens.current.0, G1);
    let mut partial = primary(DiskState::Inconsistent);
    let (n, _) = rotate(&partial, vec![]);
    assert_eq!(n.gens.current.0, G1);
    let mut whole = PeerControl::new(id(4), ParticipantKind::Diskful, 0);
    whole.link = Link::Up { epoch: 9 };
    whole.remote = Some(state(Role::Secondary, DiskState::UpToDate, G1));
    partial.peers.push(whole);
    let (n, _) = rotate(&partial, vec![id(4)]);
    assert_eq!(n.gens.current.0, G2);
}

/// Seen in a chaos run: a replica resynced by a Secondary refused the Primary's
/// connection every 100 ms, each attempt starting a generation, until the generation
/// a third replica held had left every history and the two were taken for diverged.
#[test]
fn a_replica_that_drops_again_before_catching_up_starts_no_new_generation() {
    let primary = Control {
        writers: 1,
        ..node(DiskState::UpToDate, G1)
    };
    let (n, _) = step(
        &primary,
        &Event::Rotate {
            receiving: vec![],
            next: G2,
        },
    )
    .unwrap();
    let behind = state(Role::Secondary, DiskState::Inconsistent, G1);
    let drop = |c: &Control| {
        step(
            c,
            &Event::Disconnected {
                peer: id(2),
                epoch: 7,
            },
        )
        .unwrap()
        .0
    };
    // It connects still behind, and drops: the generation started for it stands.
    let again = drop(&connect(&n, 2, behind, 0, (false, false)).0);
    assert!(!again.rotation_due(&[]));
    // Its disk failed: it repeats the current generation without holding its data
    // (seen: a generation per write while a peer's disk was dead).
    let (failed, _) = step(
        &up(again.clone(), 2, behind),
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::Failed, G2),
        },
    )
    .unwrap();
    assert!(!failed.rotation_due(&[]));
    // It reports the current generation (a Primary's resync ends; or it connects
    // holding it): a write it misses starts another.
    let caught_up = up(again.clone(), 2, behind);
    let (reported, _) = step(
        &caught_up,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::UpToDate, G2),
        },
    )
    .unwrap();
    assert!(drop(&reported).rotation_due(&[]));
    let holding = connect(
        &again,
        2,
        state(Role::Secondary, DiskState::UpToDate, G2),
        0,
        (false, false),
    );
    assert!(drop(&holding.0).rotation_due(&[]));
    // The end of this node's resync to it is sent: it may hold the generation.
    let sending = with_peer(up(again, 2, behind), 2, |p| {
        p.sync = Sync::Source { total: 4096 }
    });
    let (sent, _) = step(
        &sending,
        &Event::ResyncSent {
            peer: id(2),
            epoch: 7,
        },
    )
    .unwrap();
    assert!(drop(&sent).rotation_due(&[]));
}

/// Seen in a 15-minute chaos run: a replica away while its peers started one
/// generation after another (one each time a replica dropped out under writes) was
/// refused as unrelated data once its generation left their history, then 4 deep, and
/// was never resynced.
#[test]
fn a_replica_away_through_many_generations_is_still_resynced() {
    let mut primary = Control {
        writers: 1,
        ..node(DiskState::UpToDate, G1)
    };
    primary
        .peers
        .push(PeerControl::new(id(4), ParticipantKind::Diskful, 0));
    // Node 2 stays away; node 4 drops out under writes, comes back, drops again.
    let rotations = 24;
    for next in 1..=rotations {
        let back = with_peer(primary, 4, |p| p.fenced = 0);
        let event = Event::Rotate {
            receiving: vec![],
            next: 0x100 + next,
        };
        primary = step(&back, &event).unwrap().0;
    }
    assert_eq!(primary.gens.current.0, 0x100 + rotations);
    // No bitmap for node 2 tells what it lacks (one is kept only while this replica's
    // data changes by writes alone; a resync from another clears it): only the
    // generations place it.
    let untracked = with_peer(primary, 2, |p| p.mark = 0);
    let outdated = state(Role::Secondary, DiskState::Outdated, G1);
    let (n, actions) = connect(&untracked, 2, outdated, 0, (false, false));
    let p = n.peer(id(2)).unwrap();
    assert_eq!(
        (&p.link, p.sync),
        (&Link::Up { epoch: 7 }, Sync::Source { total: 0 }),
        "node 2 is resynced"
    );
    assert!(
        actions.contains(&Action::MarkAll(id(2))),
        "in full: no bitmap tells what it lacks; {actions:?}"
    );
}

#[test]
fn the_primarys_state_moves_a_whole_replica_to_its_generation() {
    let c = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Secondary, DiskState::UpToDate, G1),
    );
    let (n, actions) = step(
        &c,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Primary, DiskState::UpToDate, G2),
        },
    )
    .unwrap();
    assert_eq!((n.gens.current.0, n.gens.history[0].0), (G2, G1));
    assert!(actions.contains(&Action::PrimaryAppeared(id(2))));
    // Not from a Secondary, and not into a replica that takes no writes (Outdated).
    let (n, _) = step(
        &c,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::UpToDate, G2),
        },
    )
    .unwrap();
    assert_eq!(n.gens.current.0, G1);
    let outdated = Control {
        disk: DiskState::Outdated,
        ..c.clone()
    };
    let (n, _) = step(
        &outdated,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Primary, DiskState::UpToDate, G2),
        },
    )
    .unwrap();
    assert_eq!(n.gens.current.0, G1);
    // A deferred peer reporting UpToDate at this generation is settled.
    let deferred = with_peer(c, 2, |p| {
        p.deferred = true;
        p.mark = G1
    });
    let (n, actions) = step(
        &deferred,
        &Event::PeerState {
            peer: id(2),
            state: state(Role::Secondary, DiskState::UpToDate, G1),
        },
    )
    .unwrap();
    let p = n.peer(id(2)).unwrap();
    assert_eq!((p.deferred, p.mark), (false, 0));
    assert!(actions.contains(&Action::ClearAll(id(2))));
}

#[test]
fn a_primary_whose_disk_fails_has_its_peers_move_on_without_it() {
    use DiskState::*;
    let primary = Control {
        writers: 1,
        ..up(node(UpToDate, G1), 2, state(Role::Secondary, UpToDate, G1))
    };
    let (n, actions) = step(&primary, &Event::LocalIoError { next: G3 }).unwrap();
    assert_eq!(
        (n.disk, n.gens.current.0, n.gens.bitmap.0, n.whole_at),
        (Failed, G3, G1, G1)
    );
    assert!(actions.contains(&Action::NewGeneration(G3)));
    // A Secondary's failing disk starts none: the Primary does, as for any replica
    // that misses its writes.
    let (s, _) = step(&node(UpToDate, G1), &Event::LocalIoError { next: G3 }).unwrap();
    assert_eq!(s.gens.current.0, G1);
    // Back after a repair, its dead disk recorded UpToDate at G1 (the failure could
    // not be written) and its crash's extents in the activity log: the peer, which
    // moved on to G3, resyncs it in full, and it sends nothing.
    let (back, _) = step(
        &node(UpToDate, G1),
        &Event::Connected {
            peer: id(2),
            epoch: 7,
            state: state(Role::Secondary, UpToDate, G3),
            their_mark: 0,
            their_history: history(&[G1]),
            their_confirmed: G3,
            my_dirty: true,
            theirs: vec![],
        },
    )
    .unwrap();
    assert_eq!(back.disk, Inconsistent);
    assert_eq!(back.peer(id(2)).unwrap().sync, Sync::Target);
}

#[test]
fn a_replica_follows_a_diskless_primary_whose_announcement_it_lost() {
    use DiskState::*;
    // A Primary without data (node 3) started G2 when another replica missed a write;
    // its connection to this replica was replaced before the announcement arrived.
    let hello = |mark| Event::Connected {
        peer: id(3),
        epoch: 7,
        state: state(Role::Primary, Diskless, G2),
        their_mark: mark,
        their_history: history(&[G1]),
        their_confirmed: G1,
        my_dirty: false,
        theirs: vec![],
    };
    let c = node(UpToDate, G1);
    // It took every write of G2 it was sent (the Primary does not hold it among those
    // that missed one): it follows.
    let (n, _) = step(&c, &hello(0)).unwrap();
    assert_eq!((n.disk, n.gens.current.0), (UpToDate, G2));
    // It is the one that missed a write: left behind, to be resynced.
    let (n, actions) = step(&c, &hello(G1)).unwrap();
    assert_eq!((n.disk, n.gens.current.0), (Outdated, G1));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::LeftBehind { .. }))
    );

    // The Primary's side: its Hello marks the replica that missed its writes since it
    // started G2, and only that one.
    let diskless_primary = Control {
        replica: false,
        writers: 1,
        disk: Diskless,
        whole_at: 0,
        peers: vec![
            PeerControl::new(id(1), ParticipantKind::Diskful, 0),
            PeerControl::new(id(2), ParticipantKind::Diskful, 0),
        ],
        ..node(Diskless, G1)
    };
    let d = up(
        up(diskless_primary, 1, state(Role::Secondary, UpToDate, G1)),
        2,
        state(Role::Secondary, UpToDate, G1),
    );
    let (d, _) = step(
        &d,
        &Event::Rotate {
            receiving: vec![id(1)],
            next: G2,
        },
    )
    .unwrap();
    assert_eq!(d.gens.current.0, G2);
    assert_eq!((d.mark_for_hello(id(1)), d.mark_for_hello(id(2))), (0, G1));
}

#[test]
fn local_failures_and_operator_requests() {
    let c = node(DiskState::UpToDate, G1);
    let (failed, actions) = step(&c, &Event::LocalIoError { next: G3 }).unwrap();
    assert_eq!(failed.disk, DiskState::Failed);
    assert!(actions.contains(&Action::Detached));
    let (again, actions) = step(&failed, &Event::LocalIoError { next: G3 }).unwrap();
    assert_eq!((again, actions), (failed, vec![]));
    let mut diskless = c.clone();
    diskless.replica = false;
    assert!(step(&diskless, &Event::LocalIoError { next: G3 }).is_err());
    assert!(step(&diskless, &Event::Invalidate).is_err());
    let open = Control {
        writers: 1,
        ..c.clone()
    };
    assert!(step(&open, &Event::Invalidate).is_err());
    let (n, actions) = step(&c, &Event::Invalidate).unwrap();
    assert_eq!(n.disk, DiskState::Inconsistent);
    assert!(
        actions.contains(&Action::Disconnect(id(2)))
            && actions.contains(&Action::Disconnect(id(3)))
    );
}

#[test]
fn the_replica_whose_disk_failed_last_is_trusted_and_only_it() {
    use DiskState::*;
    const G4: u64 = 0x44;
    // Both replicas of a two-replica volume failed in turn, then were repaired. Node
    // "first" failed at G1 (its data whole there); the Primary, "last", went on alone
    // at G2, and when its own disk failed its peers moved on to G4. Both followed the
    // generations since without data: each is at G4, its Hello's confirmed generation
    // the one its data was last whole at.
    let failed = |bitmap: u64, history: [u64; 2], whole_at: u64| Control {
        gens: Generations::from_line([G4, bitmap].into_iter().chain(history)),
        whole_at,
        ..node(Failed, G4)
    };
    let last = failed(G2, [G1, 0], G2);
    let first = failed(0, [G2, G1], G1);
    // What their Hellos give as confirmed, for each other.
    assert_eq!(
        (last.confirmed_for_peers(), first.confirmed_for_peers()),
        (G2, G1)
    );
    let with_other = |c: Control, confirmed: u64| {
        with_peer(up(c, 2, state(Role::Secondary, Failed, G4)), 2, |p| {
            p.history = history(&[G2, G1]);
            p.confirmed = confirmed;
        })
    };
    let (n, actions) = step(&with_other(last.clone(), G1), &Event::Trust { next: G3 }).unwrap();
    assert_eq!((n.disk, n.gens.current.0, n.confirmed), (UpToDate, G3, G3));
    assert_eq!(
        n.gens.line().map(|g| g.0).collect::<Vec<_>>()[..5],
        [G3, G4, G2, G1, 0],
        "the new line descends from every generation it followed"
    );
    assert_eq!(n.whole_at, G3);
    assert!(
        actions.contains(&Action::Disconnect(id(2))),
        "the others are resynced"
    );
    // The one that failed first: the other's data was whole at a newer generation.
    let e = step(&with_other(first, G2), &Event::Trust { next: G3 }).unwrap_err();
    assert!(e.0.contains("another replica failed after this one"), "{e}");
    // Every other replica must be connected, and none whole.
    let e = step(&last, &Event::Trust { next: G3 }).unwrap_err();
    assert!(e.0.contains("is not connected"), "{e}");
    let whole_peer = up(last.clone(), 2, state(Role::Secondary, UpToDate, G4));
    let e = step(&whole_peer, &Event::Trust { next: G3 }).unwrap_err();
    assert!(e.0.contains("holds whole data"), "{e}");
    // Nothing to trust on a whole replica, or on one never recorded whole.
    assert!(step(&node(UpToDate, G1), &Event::Trust { next: G3 }).is_err());
    let never = Control {
        whole_at: 0,
        ..with_other(last.clone(), G1)
    };
    assert!(step(&never, &Event::Trust { next: G3 }).is_err());
}

#[test]
fn a_rollback_starts_one_new_line_on_every_participant() {
    const G9: u64 = 0x99;
    let c = Control {
        gens: Generations::from_line([G1, G1, 7, 5]),
        ..with_peer(node(DiskState::UpToDate, G1), 2, |p| {
            p.mark = G1;
            p.resync_due = true;
            p.link = Link::Refused("diverged".into());
        })
    };
    let rolled = |holds| Event::RolledBack {
        generation: G9,
        holds,
    };
    // Refused while open here, or while a peer is Primary.
    assert!(
        step(
            &Control {
                writers: 1,
                ..c.clone()
            },
            &rolled(true)
        )
        .is_err()
    );
    let elsewhere = up(c.clone(), 2, state(Role::Primary, DiskState::UpToDate, G1));
    assert!(step(&elsewhere, &rolled(true)).is_err());
    // A replica holding the snapshot: UpToDate at the new generation, nothing before it,
    // no bitmap left, every peer reconnected (the refused one too).
    let (n, actions) = step(&c, &rolled(true)).unwrap();
    assert_eq!(
        (n.disk, n.gens, n.confirmed),
        (DiskState::UpToDate, gens(G9), G9)
    );
    let p2 = n.peer(id(2)).unwrap();
    assert_eq!((p2.mark, p2.resync_due, &p2.link), (0, false, &Link::Down));
    for peer in [2, 3] {
        assert!(
            actions.contains(&Action::ClearAll(id(peer)))
                && actions.contains(&Action::Disconnect(id(peer)))
        );
    }
    // A replica without it holds nothing of its own: a full resync follows.
    let (n, _) = step(&c, &rolled(false)).unwrap();
    assert_eq!(
        (n.disk, n.gens.current.0, n.confirmed),
        (DiskState::Inconsistent, 0, 0)
    );
    // A participant without a replica learns the generation.
    let tiebreaker = Control {
        replica: false,
        disk: DiskState::Diskless,
        ..c.clone()
    };
    let (n, _) = step(&tiebreaker, &rolled(false)).unwrap();
    assert_eq!((n.disk, n.gens.current.0), (DiskState::Diskless, G9));
}

#[test]
fn a_spec_change_keeps_or_restarts_each_peer() {
    let c = up(
        node(DiskState::UpToDate, G1),
        2,
        state(Role::Secondary, DiskState::UpToDate, G1),
    );
    let c = up(
        with_peer(c, 3, |p| p.mark = 0),
        3,
        state(Role::Secondary, DiskState::Diskless, G1),
    );
    let c = with_peer(c, 2, |p| p.mark = G1);
    let (n, _) = step(
        &c,
        &Event::SpecChanged {
            peers: vec![
                (id(2), ParticipantKind::Diskful, true),
                (id(3), ParticipantKind::Diskless, false),
                (id(4), ParticipantKind::Diskful, true),
            ],
            two_primaries: true,
        },
    )
    .unwrap();
    let p2 = n.peer(id(2)).unwrap();
    assert_eq!(
        (&p2.link, p2.mark),
        (&Link::Down, G1),
        "moved: starts over, keeps its bitmap generation"
    );
    let p3 = n.peer(id(3)).unwrap();
    assert_eq!(
        (&p3.link, p3.kind),
        (&Link::Up { epoch: 7 }, ParticipantKind::Diskless)
    );
    assert_eq!(n.peer(id(4)).unwrap().link, Link::Down);
    assert!(n.two_primaries);
    // The end of a connection to a peer that left changes nothing.
    let none = Event::SpecChanged {
        peers: vec![],
        two_primaries: false,
    };
    let (gone, _) = step(&n, &none).unwrap();
    assert!(
        step(
            &gone,
            &Event::Disconnected {
                peer: id(2),
                epoch: 7
            }
        )
        .is_ok()
    );
}

/// Seen in a chaos run: a replica whose disk failed kept repeating the Primary's
/// generation while its confirmed one stayed where its data last was whole; once that
/// had left the whole replicas' histories, they refused it as unrelated data, though
/// it stood at their very generation (and, once repaired, it stayed refused).
#[test]
fn a_failed_replica_is_placed_by_the_generations_it_followed() {
    let whole = node(DiskState::UpToDate, G2);
    let failed_peer = |generation: u64| Event::Connected {
        peer: id(2),
        epoch: 7,
        state: state(Role::Secondary, DiskState::Failed, generation),
        their_mark: 0,
        their_history: history(&[]),
        // Where its data was last whole: long gone from every history.
        their_confirmed: 0x99,
        my_dirty: false,
        theirs: vec![],
    };
    // At this node's generation: it takes everything from here.
    let (n, actions) = step(&whole, &failed_peer(G2)).unwrap();
    assert_eq!(n.peer(id(2)).unwrap().sync, Sync::Source { total: 0 });
    assert!(actions.contains(&Action::MarkAll(id(2))), "{actions:?}");
    // At a generation this node moved on from: the same.
    let moved_on = Control {
        gens: Generations {
            current: GenerationId(G3),
            bitmap: GenerationId(G2),
            ..Generations::default()
        },
        ..whole.clone()
    };
    let (n, actions) = step(&moved_on, &failed_peer(G2)).unwrap();
    assert_eq!(n.peer(id(2)).unwrap().sync, Sync::Source { total: 0 });
    assert!(actions.contains(&Action::MarkAll(id(2))), "{actions:?}");
    // At a generation this node never had: refused as before, not overwritten with
    // what may be older data.
    let (n, _) = step(&whole, &failed_peer(0x77)).unwrap();
    assert!(matches!(n.peer(id(2)).unwrap().link, Link::Refused(_)));
}

/// Seen in a chaos run: a replica took a Hello read long after it was sent (the source
/// had started a new generation meanwhile), was resynced in full, and took the new
/// generation with the history of the old one: the generation it descended from was
/// missing, and its next handshake with a replica still at that one called it split
/// brain.
#[test]
fn a_resync_ending_at_a_newer_generation_keeps_the_one_the_source_reported() {
    let stale = state(Role::Primary, DiskState::UpToDate, G2);
    let c = node(DiskState::Inconsistent, 0);
    let (target, _) = connect(&c, 2, stale, 0, (false, false));
    let (n, _) = step(
        &target,
        &Event::ResyncDone {
            peer: id(2),
            generation: G3,
            primary_elsewhere: false,
        },
    )
    .unwrap();
    assert_eq!(
        (n.gens.current.0, n.gens.bitmap.0),
        (G3, G2),
        "{:?}",
        n.gens
    );
    // A replica still at G2 is then behind this one, on its line, not diverged.
    let behind = Side::replica(DiskState::UpToDate, G2, 0, false, history(&[]), G2, false);
    let me = Side::replica(DiskState::UpToDate, G3, 0, false, n.history(), G3, false);
    assert_eq!(
        handshake::decide(me, behind, true),
        handshake::Direction::Source { full: true }
    );
}
