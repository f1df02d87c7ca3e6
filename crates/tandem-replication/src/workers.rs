//! The threads serving one connection's queued requests. None run at first: a worker
//! starts only when a request is queued and no worker is idle, up to a limit, and
//! stays (idle) until the connection ends. A node in hundreds of volumes, each with a
//! few links, so keeps only the threads its load has needed.

use crate::locks::Locked;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

struct State<J> {
    queue: VecDeque<J>,
    /// Workers waiting for a job.
    idle: usize,
    /// No more jobs come: workers finish the queue and end.
    closed: bool,
}

struct Shared<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
}

/// Owned by the connection's receiver; dropping it lets the workers end once the
/// queue is empty.
pub(crate) struct Workers<J: Send + 'static> {
    shared: Arc<Shared<J>>,
    serve: Arc<dyn Fn(J) + Send + Sync>,
    started: usize,
    limit: usize,
    name: String,
}

impl<J: Send + 'static> Workers<J> {
    /// Workers named `name-N`, at most `limit`, each running `serve` on the jobs it takes.
    pub fn new(name: String, limit: usize, serve: impl Fn(J) + Send + Sync + 'static) -> Self {
        Workers {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
            }),
            serve: Arc::new(serve),
            started: 0,
            limit,
            name,
        }
    }

    /// Threads started so far.
    #[cfg(test)]
    pub fn started(&self) -> usize {
        self.started
    }

    /// Whether jobs are queued or being served.
    pub fn busy(&self) -> bool {
        let state = self.shared.state.locked();
        !state.queue.is_empty() || state.idle < self.started
    }

    /// Queues a job; starts a worker for it if every worker is busy and the limit
    /// allows one more.
    pub fn push(&mut self, job: J) {
        let mut state = self.shared.state.locked();
        state.queue.push_back(job);
        let wanted = state.queue.len() > state.idle && self.started < self.limit;
        let idle = state.idle > 0;
        drop(state);
        if idle {
            self.shared.ready.notify_one();
        }
        if wanted {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        let (shared, serve) = (self.shared.clone(), self.serve.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{}", self.name, self.started))
            .spawn(move || work(&shared, &*serve));
        match spawned {
            Ok(_) => self.started += 1,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a peer worker");
                if self.started == 0 {
                    // Nobody else would take the queued jobs: serve them here.
                    let jobs = std::mem::take(&mut self.shared.state.locked().queue);
                    jobs.into_iter().for_each(|j| (self.serve)(j));
                }
            }
        }
    }
}

fn work<J>(shared: &Shared<J>, serve: &(dyn Fn(J) + Send + Sync)) {
    let mut state = shared.state.locked();
    loop {
        if let Some(job) = state.queue.pop_front() {
            drop(state);
            serve(job);
            state = shared.state.locked();
            continue;
        }
        if state.closed {
            return;
        }
        state.idle += 1;
        state = crate::locks::wait(&shared.ready, state);
        state.idle -= 1;
    }
}

impl<J: Send + 'static> Drop for Workers<J> {
    fn drop(&mut self) {
        self.shared.state.locked().closed = true;
        self.shared.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn workers_start_only_when_every_started_one_is_busy() {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        // Each job blocks until the test releases it.
        let mut w = Workers::new("t".into(), 3, move |_: u32| {
            rx.locked().recv().unwrap();
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(w.started(), 0);
        w.push(1);
        assert_eq!(w.started(), 1);
        w.push(2);
        w.push(3);
        w.push(4);
        w.push(5);
        assert_eq!(w.started(), 3, "never more than the limit");
        for _ in 0..5 {
            tx.send(()).unwrap();
        }
        assert!(
            wait(|| done.load(Ordering::SeqCst) == 5),
            "every queued job is served"
        );
        // Idle workers take new jobs: no new thread.
        assert!(wait(|| w.shared.state.locked().idle == 3));
        w.push(6);
        tx.send(()).unwrap();
        assert!(wait(|| done.load(Ordering::SeqCst) == 6));
        assert_eq!(w.started(), 3);
    }

    #[test]
    fn an_idle_worker_takes_the_next_job() {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let mut w = Workers::new("t".into(), 8, move |_: u32| {
            d.fetch_add(1, Ordering::SeqCst);
        });
        for i in 0..50 {
            w.push(i);
            assert!(wait(|| done.load(Ordering::SeqCst) == i as usize + 1));
            assert!(wait(|| w.shared.state.locked().idle == w.started()));
        }
        assert_eq!(w.started(), 1, "one job at a time needs one worker");
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}
