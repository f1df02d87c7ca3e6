//! The owner of a volume's control state: applies events one at a time through
//! [`step`], stores what must survive a restart (disk state, generations, bitmap
//! generations) before anyone sees it, and publishes each new state as an immutable
//! view. The data path reads the view without waiting for the owner; only events wait
//! for each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tandem_api::{DiskState, VolumeName};
use tandem_pool::{GenerationId, PoolError, Volume};

use crate::control::{Action, Control, Event, Refused, step};
use crate::locks::{Locked, Shared};

pub(crate) struct Owner {
    volume: VolumeName,
    /// The replica whose superblock stores the persisted part of the state.
    local: Option<Arc<Volume>>,
    /// The state; held while an event is applied, so events never interleave.
    control: Mutex<Control>,
    view: RwLock<Arc<Control>>,
    /// Failing to record the Failed state was logged.
    failed_store_told: AtomicBool,
}

impl Owner {
    pub fn new(volume: VolumeName, local: Option<Arc<Volume>>, control: Control) -> Owner {
        Owner {
            volume,
            local,
            view: RwLock::new(Arc::new(control.clone())),
            control: Mutex::new(control),
            failed_store_told: AtomicBool::new(false),
        }
    }

    /// The state as last published.
    pub fn view(&self) -> Arc<Control> {
        self.view.reading().clone()
    }

    /// Applies `event`: the actions that carry it out (for the caller to run), or why
    /// it was refused, which leaves the state as it was. If the new state cannot be
    /// stored, the replica's metadata is failing: the replica is given up instead.
    pub fn apply(&self, event: Event) -> Result<Vec<Action>, Refused> {
        let mut control = self.control.locked();
        let (next, actions) = match step(&control, &event) {
            Ok(stepped) => stepped,
            Err(refused) => {
                if event.refusal_is_an_answer() {
                    tracing::debug!(volume = %self.volume, ?event, %refused, "event refused");
                } else {
                    tracing::warn!(volume = %self.volume, ?event, %refused, "state change refused");
                }
                return Err(refused);
            }
        };
        let (next, actions) = match self.store(&control, &next) {
            Ok(()) => (next, actions),
            Err(e) => {
                tracing::error!(volume = %self.volume, error = %e, ?event,
                    "cannot store the volume's state; giving up the local replica");
                let failure = Event::LocalIoError {
                    next: GenerationId::random().0,
                };
                let (failed, actions) = step(&control, &failure)?;
                // Failed is kept even if it cannot be stored either: the replica is not
                // used again in this run, and a restart finds it behind its peers.
                let _ = self.store(&control, &failed);
                (failed, actions)
            }
        };
        if next.gens != control.gens {
            let hex = |g: GenerationId| format!("{:016x}", g.0);
            let g = &next.gens;
            tracing::debug!(volume = %self.volume, current = %hex(g.current), bitmap = %hex(g.bitmap),
                history = %g.history.iter().filter(|h| h.0 != 0).map(|h| hex(*h)).collect::<Vec<_>>().join(" "),
                disk = %next.disk, "data generations changed");
        }
        *control = next.clone();
        *self.view.writing() = Arc::new(next);
        Ok(actions)
    }

    /// Writes the persisted part of `next` if it differs from `now`'s. Failing to
    /// record the Failed state is only logged: there is nothing further to give up.
    fn store(&self, now: &Control, next: &Control) -> Result<(), PoolError> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        if !next.persisted_differs(now) {
            return Ok(());
        }
        let result = local.update_superblock(|sb| {
            sb.disk_state = next.disk;
            sb.generations = next.gens;
            sb.whole_at = GenerationId(next.whole_at);
            sb.confirmed = GenerationId(next.confirmed);
            for slot in &mut sb.peers {
                if let Some(p) = next.peer(slot.node) {
                    slot.bitmap_generation = GenerationId(p.mark);
                }
            }
        });
        match result {
            // A replica given up still records the generations it follows where its
            // metadata takes writes (a full file system does), so that once repaired
            // it is placed by them; on a dead disk every change fails again: said
            // once.
            Err(e) if next.disk == DiskState::Failed => {
                if !self.failed_store_told.swap(true, Ordering::Relaxed) {
                    tracing::error!(volume = %self.volume, error = %e, "cannot record the Failed state");
                }
                Ok(())
            }
            other => other,
        }
    }
}

impl Event {
    /// Whether a refusal is an ordinary answer (a promotion not granted, an
    /// operator's request turned down) rather than a sign of a bug.
    fn refusal_is_an_answer(&self) -> bool {
        matches!(
            self,
            Event::Connected { .. }
                | Event::PromotionAsked { .. }
                | Event::PromotionStarted { .. }
                | Event::Invalidate
                | Event::Trust { .. }
                | Event::Opened
                | Event::PeerState { .. }
                | Event::ResyncRetry { .. }
        )
    }
}
