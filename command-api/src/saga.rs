//! The transaction saga: a process manager that follows the committed log (never the request
//! path) and carries every transaction to CONFIRMED and settled, or REJECTED and released
//! (SPEC §4).
//!
//! Each batch reads transaction events after the saga's checkpoint, advances every transaction
//! they touch (the domain's `saga::next_step` says what to do; this module only executes it),
//! then records, in one database transaction, the new checkpoint and which transactions are still
//! in flight and when to look at them again (the decision deadline, or a retry after a failure).
//! A crash anywhere replays at most one batch, and every step is idempotent, so nothing is
//! applied twice and nothing is lost. One instance runs the saga at a time (a leader lock).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use domain::saga::{self, SagaStep};
use domain::{
    AccountCommand, AccountError, AccountId, Transaction, TransactionCommand, TransactionId,
};
use futures::StreamExt;
use infra::leader::Leadership;
use infra::log::{LogEvent, LogReader};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::checkpoints;
use crate::error::{DatabaseContext, Error, Result};
use crate::metadata::EventMetadata;
use crate::store::AggregateStore;

/// The checkpoint row of the saga.
pub(crate) const CHECKPOINT: &str = "saga";

/// Transactions advance at most this many steps in one call; a transaction needs three
/// (reserve, confirm or reject, settle or release), so more means a step made no progress.
const STEPS_PER_ADVANCE_MAX: usize = 8;

/// Account streams are serialised in-process through this many striped locks: two steps on one
/// account never race (so they never conflict), steps on different accounts rarely share a
/// stripe. Only one lock is held at a time, so no deadlock is possible.
const ACCOUNT_LOCK_STRIPES: usize = 1024;

/// How often a leader checks that its lock session is alive, and scans for due transactions.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// How long to wait after a failed batch before trying again.
const BATCH_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Tuning of the runner.
#[derive(Debug, Clone)]
pub struct SagaSettings {
    /// Events read per batch.
    pub batch_size: i64,
    /// Transactions advanced concurrently within a batch.
    pub concurrency: usize,
    /// Sleep between polls of an idle log.
    pub poll_interval: Duration,
    /// No fraud decision within this time → REJECTED `fraud_check_timeout` (SPEC §4).
    pub decision_timeout: TimeDelta,
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    Processed(usize),
    Idle,
}

/// Where a transaction stands after the saga advanced it as far as it could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Final and fully applied.
    Done,
    /// Waiting for the fraud decision, at the latest until this deadline.
    Waiting { until: DateTime<Utc> },
}

pub struct Saga {
    accounts: Arc<AggregateStore<AccountAggregate>>,
    transactions: Arc<AggregateStore<TransactionAggregate>>,
    pool: PgPool,
    reader: LogReader,
    settings: SagaSettings,
    account_locks: Vec<Mutex<()>>,
}

/// A transaction to advance, with what caused it and the correlation id to carry on.
struct Work {
    transaction_id: TransactionId,
    correlation_id: String,
    cause: String,
}

impl Saga {
    pub fn new(
        accounts: Arc<AggregateStore<AccountAggregate>>,
        transactions: Arc<AggregateStore<TransactionAggregate>>,
        pool: PgPool,
        settings: SagaSettings,
    ) -> Self {
        Saga {
            accounts,
            transactions,
            reader: LogReader::new(pool.clone(), "events"),
            pool,
            settings,
            account_locks: (0..ACCOUNT_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Runs the saga while this instance holds the leader lock, until `cancel`. A lost lock is
    /// re-acquired; a failed batch is retried after a pause.
    pub async fn run(self: Arc<Self>, lock_options: PgConnectOptions, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            let leadership = match Leadership::acquire(&lock_options, "saga", &cancel).await {
                Ok(Some(leadership)) => leadership,
                Ok(None) => return,
                Err(error) => {
                    tracing::error!(error.message = %error, "saga cannot take its leader lock");
                    tokio::time::sleep(BATCH_RETRY_DELAY).await;
                    continue;
                }
            };
            self.lead(leadership, &cancel).await;
        }
        tracing::info!("saga stopped");
    }

    async fn lead(&self, mut leadership: Leadership, cancel: &CancellationToken) {
        match self.resume_all().await {
            Ok(resumed) => tracing::info!(resumed, "saga resumed in-flight transactions"),
            Err(error) => {
                tracing::error!(error.message = %error, "saga resume failed; will retry when due")
            }
        }
        let mut housekeeping = Instant::now();
        while !cancel.is_cancelled() {
            if housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
                housekeeping = Instant::now();
                if !leadership.still_held().await {
                    return;
                }
                if let Err(error) = self.process_due(self.settings.batch_size).await {
                    tracing::error!(error.message = %error, "saga due scan failed");
                }
            }
            let pause = match self.try_process_batch(self.settings.batch_size).await {
                Ok(BatchOutcome::Processed(_)) => continue,
                Ok(BatchOutcome::Idle) => self.settings.poll_interval,
                Err(error) => {
                    tracing::error!(error.message = %error, "saga batch failed");
                    BATCH_RETRY_DELAY
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One step of the log follower: advance the transactions of up to `max` new events, then
    /// move the checkpoint.
    pub async fn try_process_batch(&self, max: i64) -> Result<BatchOutcome> {
        let checkpoint = checkpoints::load(&self.pool, CHECKPOINT).await?;
        let events = self
            .reader
            .read_after(checkpoint, max, Some("transaction"))
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(BatchOutcome::Idle);
        };
        let results = self.advance_all(distinct_work(&events)).await;
        let mut transaction = self.pool.begin().await.context("starting a saga batch")?;
        record_progress(&mut transaction, &results).await?;
        checkpoints::store(&mut transaction, CHECKPOINT, last).await?;
        transaction
            .commit()
            .await
            .context("committing a saga batch")?;
        metrics::counter!("saga_events_total").increment(events.len() as u64);
        Ok(BatchOutcome::Processed(events.len()))
    }

    /// Advances up to `max` in-flight transactions whose deadline or retry time has passed.
    pub async fn process_due(&self, max: i64) -> Result<usize> {
        let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(
            "SELECT transaction_id, correlation_id FROM saga_inflight \
             WHERE due_at <= now() ORDER BY due_at LIMIT $1",
        )
        .bind(max)
        .fetch_all(&self.pool)
        .await
        .context("reading due transactions")?;
        let count = rows.len();
        let work = rows
            .into_iter()
            .map(|(id, correlation_id)| Work {
                transaction_id: TransactionId(id),
                correlation_id: correlation_id.unwrap_or_else(|| id.to_string()),
                cause: "timer".to_owned(),
            })
            .collect();
        let results = self.advance_all(work).await;
        let mut transaction = self.pool.begin().await.context("starting a due scan")?;
        record_progress(&mut transaction, &results).await?;
        transaction
            .commit()
            .await
            .context("committing a due scan")?;
        Ok(count)
    }

    /// Advances every in-flight transaction once, as at start after a crash. Returns how many.
    pub async fn resume_all(&self) -> Result<usize> {
        sqlx::query("UPDATE saga_inflight SET due_at = now() WHERE due_at > now()")
            .execute(&self.pool)
            .await
            .context("marking in-flight transactions due")?;
        let mut resumed = 0;
        loop {
            let processed = self.process_due(self.settings.batch_size).await?;
            resumed += processed;
            if processed < usize::try_from(self.settings.batch_size).unwrap_or(usize::MAX) {
                return Ok(resumed);
            }
        }
    }

    async fn advance_all(&self, work: Vec<Work>) -> Vec<(Work, Result<Progress>)> {
        futures::stream::iter(work)
            .map(|work| async move {
                let result = self
                    .advance(work.transaction_id, &work.correlation_id, &work.cause)
                    .await;
                if let Err(error) = &result {
                    tracing::warn!(
                        transaction_id = %work.transaction_id,
                        correlation_id = %work.correlation_id,
                        error.message = %error,
                        "saga step failed; will retry"
                    );
                }
                (work, result)
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await
    }

    /// Carries one transaction as far as it can go now. Safe to call at any time, any number of
    /// times: each step is decided from the current state and is a no-op once done.
    pub async fn advance(
        &self,
        transaction_id: TransactionId,
        correlation_id: &str,
        cause: &str,
    ) -> Result<Progress> {
        let stream = transaction_id.to_string();
        let metadata = EventMetadata::for_saga(correlation_id, cause);
        for _ in 0..STEPS_PER_ADVANCE_MAX {
            let (aggregate, _) = self.transactions.load(&stream).await?;
            let transaction = aggregate.0.ok_or_else(|| Error::Store {
                context: "advancing a transaction",
                message: format!("transaction {transaction_id} has no events"),
            })?;
            let now = Utc::now();
            let step = saga::next_step(&transaction, now, self.settings.decision_timeout);
            match step {
                SagaStep::Done => return Ok(Progress::Done),
                SagaStep::AwaitDecision { deadline } => {
                    return Ok(Progress::Waiting { until: deadline });
                }
                SagaStep::Reserve => self.reserve(&transaction, now, &metadata).await?,
                SagaStep::Confirm => {
                    self.on_transaction(
                        &transaction,
                        TransactionCommand::Confirm { at: now },
                        &metadata,
                    )
                    .await?;
                }
                SagaStep::Reject(reason) => {
                    self.on_transaction(
                        &transaction,
                        TransactionCommand::Reject { reason, at: now },
                        &metadata,
                    )
                    .await?;
                }
                SagaStep::Settle => {
                    self.on_accounts(saga::settlement_commands(&transaction, now), &metadata)
                        .await?;
                    self.on_transaction(
                        &transaction,
                        TransactionCommand::CompleteSettlement { at: now },
                        &metadata,
                    )
                    .await?;
                }
                SagaStep::Release => {
                    self.on_accounts(saga::release_commands(&transaction, now), &metadata)
                        .await?;
                    self.on_transaction(
                        &transaction,
                        TransactionCommand::CompleteRelease { at: now },
                        &metadata,
                    )
                    .await?;
                }
            }
            metrics::counter!("saga_steps_total", "step" => step_name(step)).increment(1);
            tracing::info!(
                transaction_id = %transaction_id,
                correlation_id,
                step = step_name(step),
                "saga step"
            );
        }
        Err(Error::Store {
            context: "advancing a transaction",
            message: format!("transaction {transaction_id} made no progress"),
        })
    }

    /// Holds on the source and reserves the credit on the destination, then records the
    /// reservation; an account that refuses for lack of funds (or room) rejects the transaction.
    async fn reserve(
        &self,
        transaction: &Transaction,
        now: DateTime<Utc>,
        metadata: &EventMetadata,
    ) -> Result<()> {
        for (account_id, command) in saga::reservation_commands(transaction, now) {
            if let Err(refusal) = self.on_account(account_id, command, metadata).await? {
                let Some(reason) = saga::rejection_for(&refusal) else {
                    return Err(Error::Store {
                        context: "reserving funds",
                        message: format!("account {account_id} refused: {refusal}"),
                    });
                };
                return self
                    .on_transaction(
                        transaction,
                        TransactionCommand::Reject { reason, at: now },
                        metadata,
                    )
                    .await;
            }
        }
        self.on_transaction(
            transaction,
            TransactionCommand::RecordReservation { at: now },
            metadata,
        )
        .await
    }

    async fn on_accounts(
        &self,
        commands: Vec<(AccountId, AccountCommand)>,
        metadata: &EventMetadata,
    ) -> Result<()> {
        for (account_id, command) in commands {
            self.on_account(account_id, command, metadata)
                .await?
                .map_err(|refusal| Error::Store {
                    context: "applying a saga step to an account",
                    message: format!("account {account_id} refused: {refusal}"),
                })?;
        }
        Ok(())
    }

    async fn on_account(
        &self,
        account_id: AccountId,
        command: AccountCommand,
        metadata: &EventMetadata,
    ) -> Result<Result<(), AccountError>> {
        let stripe = stripe_of(account_id);
        let _serialised = self.account_locks[stripe].lock().await;
        let outcome = self
            .accounts
            .execute(&account_id.to_string(), command, &metadata.to_map())
            .await?;
        Ok(outcome.map(|_| ()))
    }

    async fn on_transaction(
        &self,
        transaction: &Transaction,
        command: TransactionCommand,
        metadata: &EventMetadata,
    ) -> Result<()> {
        self.transactions
            .execute(&transaction.id.to_string(), command, &metadata.to_map())
            .await?
            .map(|_| ())
            .map_err(|refusal| Error::Store {
                context: "recording a saga step",
                message: format!("transaction {} refused: {refusal}", transaction.id),
            })
    }
}

/// The transactions a batch touches, once each, with the latest event as the cause.
fn distinct_work(events: &[LogEvent]) -> Vec<Work> {
    let mut seen = HashSet::new();
    let mut work = Vec::new();
    for event in events.iter().rev() {
        let Ok(id) = Uuid::parse_str(&event.aggregate_id) else {
            tracing::error!(stream = %event.aggregate_id, "transaction stream id is not a UUID; skipped");
            continue;
        };
        if seen.insert(id) {
            work.push(Work {
                transaction_id: TransactionId(id),
                correlation_id: event
                    .metadata_str("correlation_id")
                    .map_or_else(|| id.to_string(), str::to_owned),
                cause: event.event_id.to_string(),
            });
        }
    }
    work
}

/// Records, inside the batch's database transaction, which transactions are finished and when
/// to look at the others again.
async fn record_progress(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    results: &[(Work, Result<Progress>)],
) -> Result<()> {
    let mut done = Vec::new();
    let (mut waiting_ids, mut waiting_correlations, mut waiting_until) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut failed_ids, mut failed_correlations, mut failed_errors) =
        (Vec::new(), Vec::new(), Vec::new());
    for (work, result) in results {
        let id = work.transaction_id.as_uuid();
        match result {
            Ok(Progress::Done) => done.push(id),
            Ok(Progress::Waiting { until }) => {
                waiting_ids.push(id);
                waiting_correlations.push(work.correlation_id.clone());
                waiting_until.push(*until);
            }
            Err(error) => {
                failed_ids.push(id);
                failed_correlations.push(work.correlation_id.clone());
                failed_errors.push(error.to_string());
            }
        }
    }
    sqlx::query("DELETE FROM saga_inflight WHERE transaction_id = ANY($1)")
        .bind(&done)
        .execute(&mut **transaction)
        .await
        .context("removing finished transactions")?;
    sqlx::query(
        "INSERT INTO saga_inflight (transaction_id, correlation_id, due_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) \
         ON CONFLICT (transaction_id) DO UPDATE \
         SET due_at = EXCLUDED.due_at, attempts = 0, last_error = NULL",
    )
    .bind(&waiting_ids)
    .bind(&waiting_correlations)
    .bind(&waiting_until)
    .execute(&mut **transaction)
    .await
    .context("recording waiting transactions")?;
    // Failed steps are retried with exponential back-off, capped at a minute.
    sqlx::query(
        "INSERT INTO saga_inflight (transaction_id, correlation_id, due_at, attempts, last_error) \
         SELECT id, correlation, now() + interval '1 second', 1, error \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS failed(id, correlation, error) \
         ON CONFLICT (transaction_id) DO UPDATE \
         SET attempts = saga_inflight.attempts + 1, last_error = EXCLUDED.last_error, \
             due_at = now() + least(interval '1 second' * power(2, saga_inflight.attempts), interval '60 seconds')",
    )
    .bind(&failed_ids)
    .bind(&failed_correlations)
    .bind(&failed_errors)
    .execute(&mut **transaction)
    .await
    .context("recording failed transactions")?;
    Ok(())
}

fn stripe_of(account_id: AccountId) -> usize {
    let bits = account_id.as_uuid().as_u128();
    // UUIDv7's low bits are random; fold all of them so any UUID version spreads well.
    ((bits ^ (bits >> 64)) as usize) % ACCOUNT_LOCK_STRIPES
}

fn step_name(step: SagaStep) -> &'static str {
    match step {
        SagaStep::Reserve => "reserve",
        SagaStep::Confirm => "confirm",
        SagaStep::Reject(_) => "reject",
        SagaStep::Settle => "settle",
        SagaStep::Release => "release",
        SagaStep::AwaitDecision { .. } => "await_decision",
        SagaStep::Done => "done",
    }
}
