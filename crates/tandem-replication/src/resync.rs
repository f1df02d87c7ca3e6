//! Resync, source side: sends a peer the blocks its bitmap marks, while the volume stays
//! in use. Each chunk is read and sent under the interval lock, so an application write
//! to the same range waits and stale resync data never lands after newer data.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::completion::Completion;
use crate::control::Event;
use crate::locks::Locked;
use crate::peer::Peer;
use crate::volume::ReplicatedVolume;
use crate::wire::{Buffer, FLAG_MAY_PUNCH, FLAG_RESYNC, Header, Kind};

/// Largest piece sent at once; small enough that application writes waiting for the
/// same range wait briefly.
const CHUNK: u64 = 1 << 20;

impl ReplicatedVolume {
    pub(crate) fn resync(self: Arc<Self>, peer: Arc<Peer>, epoch: u64) {
        let name = self.name();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut at = 0u64;
        tracing::info!(volume = %name, target = %peer.node, "resync starts: this replica is SyncSource");
        let live = || self.view().peer(peer.id).and_then(|p| p.epoch()) == Some(epoch);
        let finished = loop {
            if !live() {
                break false;
            }
            // The rate may change with the spec while the resync runs.
            let rate = self.config().spec.options.resync_rate;
            let next = peer
                .tracked
                .as_ref()
                .and_then(|t| t.locked().bits.next_run(at, CHUNK));
            let Some(run) = next else {
                if at == 0 {
                    break true;
                }
                // Blocks behind us may have been marked meanwhile: sweep again.
                at = 0;
                continue;
            };
            let len = run.end - run.start;
            match self.send_chunk(&peer, run.start, len) {
                Ok(()) => {}
                Err(Some(status)) if live() => {
                    // Busy: the target takes its data from the Primary instead. Else
                    // try again shortly while connected (a replica that has not grown
                    // yet refuses what lies past its end, say).
                    let declined = status == libc::EBUSY as u32;
                    if declined {
                        tracing::info!(volume = %name, target = %peer.node, sent,
                            "resync declined by the target: a Primary resyncs it");
                    } else {
                        tracing::warn!(volume = %name, target = %peer.node, sent, status,
                            "resync refused by the target; retrying");
                    }
                    let _ = self.apply(Event::ResyncRefused {
                        peer: peer.id,
                        epoch,
                        declined,
                    });
                    return;
                }
                Err(_) => break false,
            }
            self.clear(&peer, run.start, len);
            self.progress.tick(&self.notify);
            sent += len;
            peer.transferred.fetch_add(len, Ordering::Relaxed);
            at = run.end;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        };
        if !finished {
            tracing::warn!(volume = %name, target = %peer.node, sent, "resync interrupted");
            return;
        }
        if let Some(local) = &self.local {
            if let Err(e) = local.sync_meta() {
                tracing::error!(volume = %name, error = %e, "cannot store the bitmap after resync");
                return;
            }
        }
        let mut done = Header::new(Kind::ResyncDone, self.next_id());
        let view = self.view();
        done.offset = view.gens.current.0;
        if view.writers == 0 && view.primary_besides(peer.id).is_some() {
            done.flags = crate::wire::FLAG_PRIMARY_ELSEWHERE;
        }
        if peer.send(&done, &[]).is_err() {
            return;
        }
        // The peer has everything: it no longer shares a generation with a bitmap here.
        let _ = self.apply(Event::ResyncSent {
            peer: peer.id,
            epoch,
        });
        // A change taken from a Primary between the last piece and now was marked for
        // the peer (see `serve_request`): it goes in a resync of its own.
        let left = peer.tracked.as_ref().map_or(0, |t| t.locked().bits.bytes());
        if left > 0 {
            let _ = self.apply(Event::ResyncAgain { peer: peer.id });
        }
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(volume = %name, target = %peer.node, bytes = sent,
            mib_per_s = sent as f64 / (1 << 20) as f64 / secs.max(1e-6), "resync finished");
    }

    /// Sends one marked range (data, or a zeroing for a hole) and waits for the ack;
    /// on failure, the status the peer answered with, if it answered.
    fn send_chunk(&self, peer: &Arc<Peer>, offset: u64, len: u64) -> Result<(), Option<u32>> {
        let Some(local) = &self.local else {
            return Err(None);
        };
        let _held = self.intervals.lock(offset, len);
        let holes = local.data().extents(offset, len).unwrap_or_default();
        let all_hole = holes.len() == 1 && holes[0].hole && holes[0].len == len;
        let mut buf = Buffer::zeroed(0);
        let mut h = if all_hole {
            let mut h = Header::new(Kind::Zero, self.next_id());
            h.flags = FLAG_MAY_PUNCH | FLAG_RESYNC;
            h
        } else {
            buf = Buffer::zeroed(len as usize);
            if let Err(e) = local.data().read_at(&mut buf, offset) {
                tracing::error!(volume = %self.name(), offset, error = %e, "resync read failed");
                return Err(None);
            }
            let mut h = Header::new(Kind::Write, self.next_id());
            h.flags = FLAG_RESYNC;
            h.payload = len as u32;
            h
        };
        h.offset = offset;
        h.length = len;
        let completion = Arc::new(Completion::new(1));
        peer.request(&h, &buf, &completion);
        let outcome = completion.wait();
        match outcome.failed.first() {
            Some((_, status)) => Err(Some(*status)),
            None if outcome.lost.is_empty() => Ok(()),
            None => Err(None),
        }
    }
}
