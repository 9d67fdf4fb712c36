//! The writer thread of a queued backend: drains requests into passes,
//! hands each pass to the [`Log`], then commits its outcome through
//! [`commit`](super::commit) — the one place where events reach rings and
//! acks reach publishers. While the log is degraded it retries the repair
//! (with backoff) and refuses what is queued.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::event::Ack;
use super::log::{FastMap, Health, Log, Outcome, Step};
use super::topic::{Registry, Topic};
use super::{EngineError, EngineMetrics};

/// Most requests folded into one pass.
const MAX_OPS: usize = 4096;
/// First and longest wait between repair attempts.
const REPAIR_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));

/// What to do with a step once its pass is persisted (or failed).
pub(crate) enum Done {
    Append {
        topic: Arc<Topic>,
        ack: oneshot::Sender<Result<Vec<Ack>, EngineError>>,
    },
    Seal {
        topic: Arc<Topic>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    Delete {
        topic: Arc<Topic>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    Trim,
    Sync {
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// One queued request.
pub(crate) enum Request {
    /// A step and its completion; `permit` holds its share of the queue's
    /// byte budget until the step is committed.
    Step {
        step: Step,
        done: Done,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Commit everything before, close the log (clean marker), refuse the rest.
    Close {
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
}

pub(crate) struct Writer {
    pub log: Arc<dyn Log>,
    pub registry: Arc<Registry>,
    pub metrics: EngineMetrics,
    pub clock: super::Clock,
}

/// When to try the next repair of a degraded log.
struct Repairs {
    backoff: Duration,
    next: Instant,
}

impl Repairs {
    fn new() -> Self {
        Self {
            backoff: REPAIR_BACKOFF.0,
            next: Instant::now(),
        }
    }

    /// A pass just failed: the first retry waits the shortest backoff.
    fn failed(&mut self) {
        self.next = self.next.max(Instant::now() + REPAIR_BACKOFF.0);
    }

    /// Tries a repair if one is due; returns whether the log is healthy.
    fn attempt(&mut self, log: &dyn Log, registry: &Registry) -> bool {
        if log.health() == Health::Ok {
            return true;
        }
        if Instant::now() < self.next {
            return false;
        }
        match log.repair(&super::committed(registry)) {
            Ok(()) => {
                // The store may lack group records of failed passes.
                super::consume::redirty_all(registry);
                self.backoff = REPAIR_BACKOFF.0;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "storage repair failed");
                self.next = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(REPAIR_BACKOFF.1);
                false
            }
        }
    }
}

impl Writer {
    pub fn run(self, rx: Receiver<Request>) {
        let writable = metrics::gauge!(crate::metrics::STORAGE_WRITABLE);
        let mut dirty: FastMap<Arc<str>, Arc<Topic>> = FastMap::default();
        let mut repairs = Repairs::new();
        loop {
            let healthy = repairs.attempt(&*self.log, &self.registry);
            writable.set(if healthy { 1.0 } else { 0.0 });
            let wait = if !dirty.is_empty() {
                Duration::ZERO
            } else if !healthy {
                repairs.next.saturating_duration_since(Instant::now())
            } else {
                Duration::from_secs(3600)
            };
            let mut requests = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(r) => requests.push(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while requests.len() < MAX_OPS {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            let mut steps = Vec::with_capacity(requests.len() + dirty.len());
            let mut dones = Vec::with_capacity(requests.len() + dirty.len());
            for topic in std::mem::take(&mut dirty).into_values() {
                let state = topic.state.read();
                if state.deleted || state.ephemeral {
                    continue;
                }
                steps.push(Step::Trim {
                    topic: topic.id(&state),
                    first_retained: state.first_offset(),
                    next_offset: state.next_offset(),
                });
                dones.push(Done::Trim);
            }
            // Held until the pass is committed: the queue's byte budget.
            let mut permits = Vec::new();
            let mut requests = requests.into_iter();
            let mut close = None;
            for r in requests.by_ref() {
                match r {
                    Request::Step { step, done, permit } => {
                        steps.push(step);
                        dones.push(done);
                        permits.extend(permit);
                    }
                    Request::Close { ack } => {
                        close = Some(ack);
                        break;
                    }
                }
            }
            if !steps.is_empty() {
                self.pass(steps, dones, &mut dirty);
                if self.log.health() != Health::Ok {
                    repairs.failed();
                }
            }
            drop(permits);
            if let Some(ack) = close {
                let _ = ack.send(self.log.close(&super::committed(&self.registry)));
                // Nothing is acknowledged after the clean marker.
                for r in requests.chain(rx.try_iter()) {
                    refuse(r, &EngineError::ShuttingDown);
                }
                return;
            }
        }
    }

    fn pass(
        &self,
        mut steps: Vec<Step>,
        dones: Vec<Done>,
        dirty: &mut FastMap<Arc<str>, Arc<Topic>>,
    ) {
        let now = self.clock.now_ms();
        // The groups changed since the last pass go into its first
        // `Groups` step: many acks, one record per group.
        let mut stored_groups = Vec::new();
        super::consume::drop_stale_removals(&self.registry, &mut steps);
        if let Some(Step::Groups { writes }) =
            steps.iter_mut().find(|s| matches!(s, Step::Groups { .. }))
        {
            let (records, groups) = super::consume::take_dirty_records(&self.registry, now);
            writes.extend(records);
            stored_groups = groups;
        }
        let started = Instant::now();
        let result = self.log.persist(&mut steps, now);
        self.metrics.flush_seconds.record(started.elapsed());
        match result {
            Ok(outcomes) => {
                let mut wake: FastMap<Arc<str>, Arc<Topic>> = FastMap::default();
                // Consecutive appends to one topic, committed together.
                let mut run: Vec<super::AppendReply> = Vec::new();
                let mut run_topic: Option<Arc<Topic>> = None;
                let flush = |run: &mut Vec<super::AppendReply>,
                             topic: Option<Arc<Topic>>,
                             dirty: &mut FastMap<Arc<str>, Arc<Topic>>,
                             wake: &mut FastMap<Arc<str>, Arc<Topic>>| {
                    if let Some(topic) = topic {
                        super::commit_appends(&self.metrics, &topic, run, now, dirty);
                        wake.insert(topic.name.clone(), topic);
                    }
                };
                for (done, outcome) in dones.into_iter().zip(outcomes) {
                    match (done, outcome) {
                        (
                            Done::Append { topic, ack },
                            Outcome::Appended {
                                events,
                                repeats,
                                shared,
                            },
                        ) => {
                            if run_topic.as_ref().is_some_and(|t| !Arc::ptr_eq(t, &topic)) {
                                flush(&mut run, run_topic.take(), dirty, &mut wake);
                            }
                            run_topic = Some(topic);
                            run.push((ack, events, repeats, shared));
                        }
                        (done, outcome) => {
                            flush(&mut run, run_topic.take(), dirty, &mut wake);
                            if let Some(topic) =
                                super::commit(&self.metrics, done, outcome, now, dirty)
                            {
                                wake.insert(topic.name.clone(), topic);
                            }
                        }
                    }
                }
                flush(&mut run, run_topic.take(), dirty, &mut wake);
                for topic in wake.values() {
                    topic.wake();
                }
            }
            Err(e) => {
                super::consume::redirty(&self.registry, stored_groups);
                for done in dones {
                    super::fail(done, &e);
                }
            }
        }
    }
}

fn refuse(r: Request, e: &EngineError) {
    match r {
        Request::Step { done, .. } => super::fail(done, e),
        Request::Close { ack } => {
            let _ = ack.send(Ok(()));
        }
    }
}

/// Decrements a topic's pending count once its publish is settled; an
/// ephemeral topic nobody uses any more goes.
pub(crate) fn settle(topic: &Arc<Topic>) {
    if topic.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
        topic.release_if_unused();
    }
}
