//! The instance's chain writer: one task that appends every entry of this instance, so the
//! chain needs no lock. Entries queued while a transaction commits go into the next one
//! together (group commit: one fsync for many PUTs). A pending entry's waiter hears whether
//! it was made durable; a completion that fails is kept and retried, so an outcome the proxy
//! knows is not lost to a short store outage.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::chain::{ChainHead, ChainKey};
use super::metrics::AuditMetrics;
use super::record::{Entry, EntryKind, Outcome};
use super::store::{Store, StoreError};
use crate::error::ErrorChain;

/// At most this many entries per transaction.
const MAX_BATCH: usize = 512;
/// Completions that failed are retried this often while nothing else comes.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Completions kept for retrying at most (beyond, the oldest are given up: their records
/// stay pending until resolved as unknown).
const MAX_BACKLOG: usize = 100_000;

pub(super) enum Job {
    Pending {
        entry: Entry,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Completion {
        entry: Entry,
        /// Completes a pending entry of this process (counted in the pending gauge).
        own: bool,
    },
    /// Write what is queued, try the retries once more, and end.
    Stop,
}

/// Whether the store took the last write or check.
#[derive(Default)]
pub(super) struct Health {
    problem: Mutex<Option<String>>,
}

impl Health {
    pub fn set(&self, metrics: &AuditMetrics, result: &Result<(), StoreError>) {
        let problem = result.as_ref().err().map(|e| ErrorChain(e).to_string());
        metrics.up.set(i64::from(problem.is_none()));
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

pub(super) struct Writer {
    pub store: Arc<dyn Store>,
    pub key: ChainKey,
    pub chain: String,
    pub metrics: AuditMetrics,
    pub health: Arc<Health>,
}

struct Completion {
    entry: Entry,
    own: bool,
}

impl Writer {
    pub async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        // `None`: an append failed, so where the chain stands is read back first.
        let mut head = Some(ChainHead::genesis(&self.chain, &self.key));
        let mut backlog: VecDeque<Completion> = VecDeque::new();
        let mut stopping = false;
        loop {
            let mut batch = Vec::new();
            if !stopping {
                // Err: nothing came within `RETRY_EVERY`, time to retry the backlog.
                let received = if backlog.is_empty() {
                    Ok(jobs.recv().await)
                } else {
                    tokio::time::timeout(RETRY_EVERY, jobs.recv()).await
                };
                match received {
                    Ok(Some(Job::Stop) | None) => stopping = true,
                    Ok(Some(job)) => batch.push(job),
                    Err(_) => {}
                }
            }
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(Job::Stop) => stopping = true,
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if batch.is_empty() && backlog.is_empty() {
                if stopping {
                    return;
                }
                continue;
            }
            self.write(&mut head, &mut backlog, batch).await;
            if stopping && jobs.is_empty() {
                if !backlog.is_empty() {
                    tracing::warn!(
                        outcomes = backlog.len(),
                        "stopping with audit outcomes not written: their records stay pending \
                         until resolved as unknown"
                    );
                }
                return;
            }
        }
    }

    /// One transaction: the retried completions first (they are older), then `batch`.
    async fn write(
        &self,
        head: &mut Option<ChainHead>,
        backlog: &mut VecDeque<Completion>,
        batch: Vec<Job>,
    ) {
        let mut completions: Vec<Completion> = backlog.drain(..).collect();
        let mut entries: Vec<Entry> = completions.iter().map(|c| c.entry.clone()).collect();
        let mut waiters = Vec::new();
        for job in batch {
            match job {
                Job::Pending { entry, done } => {
                    entries.push(entry);
                    waiters.push(done);
                }
                Job::Completion { entry, own } => {
                    entries.push(entry.clone());
                    completions.push(Completion { entry, own });
                }
                Job::Stop => {}
            }
        }
        let started = std::time::Instant::now();
        let result = self.append(head, entries).await;
        self.metrics.commit.observe(started.elapsed().as_secs_f64());
        self.health.set(
            &self.metrics,
            &result.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        match result {
            Ok(dropped) => {
                for _ in &waiters {
                    self.metrics.recorded(Outcome::Pending);
                    self.metrics.pending.inc();
                }
                for completion in &completions {
                    let is_dropped = dropped.iter().any(|d| d == &completion.entry);
                    if completion.own {
                        self.metrics.pending.dec();
                    }
                    if !is_dropped {
                        let outcome = completion
                            .entry
                            .outcome
                            .as_deref()
                            .and_then(Outcome::parse)
                            .unwrap_or(Outcome::Unknown);
                        self.metrics.recorded(outcome);
                    }
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(error = %ErrorChain(&err), "the audit store did not take a write");
                for waiter in waiters {
                    let _ = waiter.send(Err(err.clone()));
                }
                self.metrics
                    .completion_failures
                    .inc_by(completions.len() as u64);
                backlog.extend(completions);
                while backlog.len() > MAX_BACKLOG {
                    if let Some(given_up) = backlog.pop_front() {
                        if given_up.own {
                            self.metrics.pending.dec();
                        }
                    }
                }
            }
        }
    }

    /// Appends at `head` (read back first when unknown); the completions dropped as already
    /// completed.
    async fn append(
        &self,
        head: &mut Option<ChainHead>,
        entries: Vec<Entry>,
    ) -> Result<Vec<Entry>, StoreError> {
        let at = match head.take() {
            Some(at) => at,
            None => self
                .store
                .head(self.chain.clone())
                .await?
                .unwrap_or_else(|| ChainHead::genesis(&self.chain, &self.key)),
        };
        let appended = self
            .store
            .append(at.clone(), self.key.clone(), entries)
            .await;
        match appended {
            Ok(appended) => {
                *head = Some(appended.head);
                for entry in &appended.already_completed {
                    debug_assert_eq!(entry.kind, EntryKind::Completion);
                    tracing::info!(
                        record = %entry.record_id,
                        "an audit record was already completed (resolved by another instance); \
                         this outcome is not recorded"
                    );
                }
                Ok(appended.already_completed)
            }
            Err(err) => Err(err),
        }
    }
}
