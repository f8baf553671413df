//! The transaction saga: a process manager that follows the committed log (never the request
//! path) and carries every transaction to CONFIRMED and settled, or REJECTED and released
//! (SPEC §4). What to do next is always the domain's decision (`domain::saga::next_step`); this
//! module executes it, many transactions at a time.
//!
//! A batch reads the transaction events after the saga's checkpoint and advances every
//! transaction they touch in **rounds**. Each round:
//! 1. decides each transaction's next step from its current state;
//! 2. decides the account commands of every step that has some (hold and reserve, settle and
//!    post, release and cancel), one account at a time in memory: one append per account;
//! 3. decides the transaction's own events (`FundsReserved`, `TransactionConfirmed`,
//!    `SettlementCompleted`…), chaining what can follow at once (a reservation whose approval is
//!    already recorded is confirmed in the same append): one append per transaction;
//! 4. writes them all in one chained append ([`EventLog::append_chained`], decision 55): a
//!    transaction's append is made only if the appends of the accounts it has a command on come
//!    out written, and lands after them in the log.
//!
//! Account events never commit after the transaction event that records them: in the same
//! commit where the log can (PostgreSQL, SQLite), before it where it cannot (KurrentDB), and
//! correctness never needs two streams to commit together. A conflict (another writer got
//! to a stream first) only sends that transaction to the next round, decided again on fresh
//! state. The checkpoint and which transactions are still in flight (and when to look at them
//! again: the decision deadline, or a retry) are recorded together, in one database transaction:
//! at most every [`RECORD_INTERVAL`], busy or idle (an idle saga records what is left once it is
//! due, decision 65), and when it runs its housekeeping (decision 53). A crash replays what was
//! not recorded yet, and every step is idempotent.
//!
//! The transaction states come from the store's cache, fed by the log the saga reads and by its
//! own appends; it can lag only behind other writers' events (`TransactionCreated`,
//! `FraudChecked`), which never makes a step unsafe. Account states come from the cache too: a
//! write decided on a stale one conflicts, but a skip would not, so an account command that
//! comes out as a no-op ("already done") or a refusal on a cached state is decided again on the
//! state the log holds before it is believed ([`Freshness`], decision 48). A failed append (its
//! outcome unknown) fails the batch's open transactions and makes the store forget the streams
//! it touched, so they are read from the log when they are retried.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use domain::saga::{self, SagaStep};
use domain::{
    AccountCommand, AccountEvent, AccountId, RejectionReason, Transaction, TransactionCommand,
    TransactionEvent, TransactionId,
};
use futures::StreamExt;
use infra::codec::{TRANSACTION_STREAM, decode_payload};
use infra::eventlog::{
    AppendOutcome, Chained, EventLog, EventMetadata, LogFilter, LogPosition, RecordedEvent,
};
use infra::follow::{Follower, Outcome};
use uuid::Uuid;

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::error::{Error, Result};
use crate::metadata;
use crate::state::{FollowerState, InFlight, SagaProgress};
use crate::store::{AggregateStore, Pending};

/// The checkpoint row of the saga.
pub const CHECKPOINT: &str = "saga";

/// Rounds a batch runs at most. A transaction needs three (reserve, then settle or release,
/// then done; a confirmation chains onto its reservation or takes one more); more mean conflicts
/// kept coming, and the transaction is retried later.
const ROUNDS_MAX: usize = 8;

/// Transaction events the saga reads per round, unless configured (`SAGA_BATCH_SIZE`).
pub const BATCH_SIZE_DEFAULT: usize = 512;

/// Streams the saga loads at once, unless configured (`SAGA_CONCURRENCY`).
pub const CONCURRENCY_DEFAULT: usize = 16;

/// How long a busy saga goes between two records of its progress (decision 53). Each record is
/// a commit, and its fsync waited between one batch and the next; a crash replays at most this
/// much work, all of it idempotent.
pub const RECORD_INTERVAL: Duration = Duration::from_millis(100);

/// Tuning of the runner.
#[derive(Debug, Clone)]
pub struct SagaSettings {
    /// Events read per batch.
    pub batch_size: usize,
    /// Streams loaded concurrently when they are not cached.
    pub concurrency: usize,
    /// No fraud decision within this time → REJECTED `fraud_check_timeout` (SPEC §4).
    pub decision_timeout: TimeDelta,
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
    log: Arc<dyn EventLog>,
    state: Arc<dyn FollowerState>,
    settings: SagaSettings,
}

/// A transaction to advance, with what caused it and the correlation id to carry on.
#[derive(Debug, Clone)]
pub struct Work {
    pub transaction_id: TransactionId,
    pub correlation_id: String,
    pub cause: String,
}

/// One transaction within a batch.
struct Item {
    work: Work,
    /// Its state as last loaded or decided, with the stream's version.
    state: Option<(Transaction, u64)>,
    /// Set once the transaction is settled for this batch.
    result: Option<Result<Progress>>,
}

impl Saga {
    pub fn new(
        accounts: Arc<AggregateStore<AccountAggregate>>,
        transactions: Arc<AggregateStore<TransactionAggregate>>,
        log: Arc<dyn EventLog>,
        state: Arc<dyn FollowerState>,
        settings: SagaSettings,
    ) -> Self {
        Saga {
            accounts,
            transactions,
            log,
            state,
            settings,
        }
    }

    /// No fraud decision within this time rejects a transaction.
    pub fn decision_timeout(&self) -> TimeDelta {
        self.settings.decision_timeout
    }

    /// Advances up to `max` in-flight transactions whose deadline or retry time has passed.
    pub async fn process_due(&self, max: usize) -> Result<usize> {
        let due = self.state.due(max).await?;
        let count = due.len();
        if count == 0 {
            return Ok(0);
        }
        let work = due
            .into_iter()
            .map(|(id, correlation_id)| Work {
                transaction_id: TransactionId(id),
                correlation_id: correlation_id.unwrap_or_else(|| id.to_string()),
                cause: "timer".to_owned(),
            })
            .collect();
        let results = self.advance_all(work).await;
        self.state
            .record_saga_batch(None, &progress_of(&results))
            .await?;
        Ok(count)
    }

    /// Advances every in-flight transaction once, as at start after a crash. Returns how many.
    pub async fn resume_all(&self) -> Result<usize> {
        self.state.mark_all_due().await?;
        let mut resumed = 0;
        loop {
            let processed = self.process_due(self.settings.batch_size).await?;
            resumed += processed;
            if processed < self.settings.batch_size {
                return Ok(resumed);
            }
        }
    }

    /// One batch of the log after the recorded checkpoint: advance the transactions of up to
    /// `batch_size` new events, then record the progress and move the checkpoint.
    pub async fn process_log_batch(&self) -> Result<Outcome> {
        let mut session = SagaSession::default();
        let outcome = self.next_log_batch(&mut session).await?;
        self.record(&mut session).await?;
        Ok(outcome)
    }

    /// Records what `session` has not recorded yet, if anything: the progress of its batches
    /// and the checkpoint after them, in one transaction.
    async fn record(&self, session: &mut SagaSession) -> Result<()> {
        session.recorded_at = Instant::now();
        if !session.has_unrecorded() {
            return Ok(());
        }
        let progress: Vec<SagaProgress> = session.unrecorded.drain().map(|(_, p)| p).collect();
        let checkpoint = (session.position > session.recorded).then_some(session.position);
        self.state.record_saga_batch(checkpoint, &progress).await?;
        session.recorded = session.position;
        metrics::counter!("saga_records_total").increment(1);
        Ok(())
    }

    /// One batch of the log after `session`'s position (read from the recorded checkpoint when
    /// the session has none yet); its progress is kept in the session until [`Saga::record`].
    async fn next_log_batch(&self, session: &mut SagaSession) -> Result<Outcome> {
        if !session.read {
            session.position = self.state.checkpoint(CHECKPOINT).await?;
            session.recorded = session.position;
            session.read = true;
        }
        let events = self
            .log
            .read_all(
                session.position,
                self.settings.batch_size,
                LogFilter::aggregate(TRANSACTION_STREAM),
            )
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(Outcome::Idle);
        };
        let started = Instant::now();
        if let Some(first) = events.first() {
            infra::follow::record_event_age("saga", first.recorded_at);
        }
        for event in &events {
            self.observe(event);
        }
        let work = distinct_work(&events);
        let transactions = work.len();
        let results = self.advance_all(work).await;
        for progress in progress_of(&results) {
            // A later batch's word on a transaction replaces an earlier one's.
            session.unrecorded.insert(progress.transaction_id, progress);
        }
        session.position = last;
        metrics::counter!("saga_events_total").increment(events.len() as u64);
        metrics::histogram!("saga_batch_seconds").record(started.elapsed().as_secs_f64());
        let failed = results.iter().filter(|(_, result)| result.is_err()).count();
        tracing::info!(
            events = events.len(),
            transactions,
            failed,
            position = %last,
            correlation_ids = %correlation_ids(&results),
            "saga batch applied"
        );
        Ok(Outcome::of_batch(
            events.len(),
            self.settings.batch_size,
            &*self.log,
        ))
    }

    /// Feeds the transactions' cache from the log the saga reads, so most states need no load.
    fn observe(&self, event: &RecordedEvent) {
        match decode_payload::<TransactionEvent>(
            &event.event_type,
            &event.event_version,
            &event.payload,
        ) {
            Ok(decoded) => {
                count_decision(&decoded);
                self.transactions
                    .observe(&event.stream.aggregate_id, event.sequence, &decoded)
            }
            Err(problem) => {
                tracing::error!(stream = %event.stream, problem, "unreadable transaction event");
                self.transactions.forget(&event.stream.aggregate_id);
            }
        }
    }

    /// Carries each transaction as far as it can go now (see the module documentation). Safe
    /// to call at any time, any number of times: each step is decided from the current state
    /// and is a no-op once done.
    pub async fn advance_all(&self, work: Vec<Work>) -> Vec<(Work, Result<Progress>)> {
        let mut items: Vec<Item> = work
            .into_iter()
            .map(|work| Item {
                work,
                state: None,
                result: None,
            })
            .collect();
        let mut freshness = Freshness::default();
        for _ in 0..ROUNDS_MAX {
            if items.iter().all(|item| item.result.is_some()) {
                break;
            }
            if let Err(error) = self.round(&mut items, &mut freshness).await {
                // An append whose outcome is unknown: stop here, report every transaction
                // still open as failed, and let the caller start afresh.
                let message = error.to_string();
                for item in items.iter_mut().filter(|item| item.result.is_none()) {
                    item.result = Some(Err(Error::Store {
                        context: "advancing a transaction",
                        message: message.clone(),
                    }));
                }
                break;
            }
        }
        items
            .into_iter()
            .map(|item| {
                let result = item.result.unwrap_or_else(|| {
                    Err(Error::Store {
                        context: "advancing a transaction",
                        message: format!(
                            "transaction {} made no progress in {ROUNDS_MAX} rounds",
                            item.work.transaction_id
                        ),
                    })
                });
                if let Err(error) = &result {
                    tracing::warn!(
                        transaction_id = %item.work.transaction_id,
                        correlation_id = %item.work.correlation_id,
                        error.message = %error,
                        "saga step failed; will retry"
                    );
                }
                (item.work, result)
            })
            .collect()
    }

    /// One round over the open items. An `Err` is an append whose outcome is unknown.
    async fn round(&self, items: &mut [Item], freshness: &mut Freshness) -> Result<()> {
        self.load_transactions(items).await;
        let now = Utc::now();
        let mut steps: Vec<(usize, SagaStep)> = Vec::new();
        for (index, item) in items.iter_mut().enumerate() {
            if item.result.is_some() {
                continue;
            }
            let Some((transaction, _)) = &item.state else {
                continue;
            };
            match saga::next_step(transaction, now, self.settings.decision_timeout) {
                SagaStep::Done => item.result = Some(Ok(Progress::Done)),
                SagaStep::AwaitDecision { deadline } => {
                    item.result = Some(Ok(Progress::Waiting { until: deadline }));
                }
                step => steps.push((index, step)),
            }
        }
        if steps.is_empty() {
            return Ok(());
        }
        let accounts = self.account_phase(items, &steps, freshness, now).await;
        self.transaction_phase(items, &steps, accounts, now).await
    }

    /// Loads the state of every open item that has none: from the cache when it holds it.
    async fn load_transactions(&self, items: &mut [Item]) {
        let wanted: Vec<(usize, TransactionId)> = items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.result.is_none() && item.state.is_none())
            .map(|(index, item)| (index, item.work.transaction_id))
            .collect();
        let loaded: Vec<(usize, Result<(TransactionAggregate, u64)>)> = futures::stream::iter(
            wanted,
        )
        .map(|(index, id)| async move { (index, self.transactions.load(&id.to_string()).await) })
        .buffer_unordered(self.settings.concurrency)
        .collect()
        .await;
        for (index, result) in loaded {
            let item = &mut items[index];
            match result {
                Ok((TransactionAggregate(Some(transaction)), version)) => {
                    item.state = Some((transaction, version));
                }
                Ok((TransactionAggregate(None), _)) => {
                    item.result = Some(Err(Error::Store {
                        context: "advancing a transaction",
                        message: format!("transaction {} has no events", item.work.transaction_id),
                    }));
                }
                Err(error) => item.result = Some(Err(error)),
            }
        }
    }

    /// Decides the account commands of every step that has some: per item, what its accounts
    /// said (done, refused with a rejection reason, or "again next round"), and the appends
    /// that carry them, which [`Saga::transaction_phase`] writes.
    async fn account_phase(
        &self,
        items: &mut [Item],
        steps: &[(usize, SagaStep)],
        freshness: &mut Freshness,
        now: DateTime<Utc>,
    ) -> AccountPlan {
        // Per stepping item: its index, the step's name and its account commands.
        let mut commands: Vec<(usize, &'static str, AccountCommands)> = Vec::new();
        for &(index, step) in steps {
            let Some((transaction, _)) = &items[index].state else {
                continue;
            };
            let (name, list) = match step {
                SagaStep::Reserve => ("reserve", saga::reservation_commands(transaction, now)),
                SagaStep::Settle => ("settle", saga::settlement_commands(transaction, now)),
                SagaStep::Release => ("release", saga::release_commands(transaction, now)),
                _ => continue,
            };
            commands.push((index, name, list));
        }
        let mut done: HashMap<usize, AccountsDone> = HashMap::new();
        if commands.is_empty() {
            return AccountPlan::default();
        }
        // The accounts' states, from the cache when it holds them, from the log when a no-op or
        // a refusal decided on the cached state is to be checked.
        let ids: HashSet<AccountId> = commands
            .iter()
            .flat_map(|(_, _, list)| list.iter().map(|(id, _)| *id))
            .collect();
        let mut accounts: HashMap<AccountId, Working> = HashMap::new();
        let loaded: Vec<(AccountId, Result<Marked<AccountAggregate>>)> = futures::stream::iter(ids)
            .map(|id| {
                let check = freshness.wanted.contains(&id);
                async move {
                    let key = id.to_string();
                    let loaded = if check {
                        self.accounts
                            .load_fresh(&key)
                            .await
                            .map(|(state, version)| (state, version, true))
                    } else {
                        self.accounts.load_marked(&key).await
                    };
                    (id, loaded)
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let mut unavailable: HashMap<AccountId, String> = HashMap::new();
        for (id, result) in loaded {
            match result {
                Ok((state, version, fresh)) => {
                    if fresh {
                        freshness.wanted.remove(&id);
                    }
                    accounts.insert(
                        id,
                        Working {
                            version,
                            fresh,
                            state,
                            decisions: Vec::new(),
                            items: Vec::new(),
                        },
                    );
                }
                Err(error) => {
                    unavailable.insert(id, error.to_string());
                }
            }
        }
        // Each transaction's commands in order, on the accounts' working states. Accounts are
        // appended in the order they were first changed, so the log reads as the steps ran
        // (a source's hold before its destination's credit).
        let mut changed: Vec<AccountId> = Vec::new();
        for (index, name, list) in commands {
            let work = &items[index].work;
            let mut outcome = AccountsDone::Done;
            let involved: Vec<AccountId> = list.iter().map(|(id, _)| *id).collect();
            for (account_id, command) in list {
                if let Some(problem) = unavailable.get(&account_id) {
                    outcome = AccountsDone::Failed(problem.clone());
                    break;
                }
                let Some(account) = accounts.get_mut(&account_id) else {
                    outcome = AccountsDone::Failed(format!("account {account_id} is missing"));
                    break;
                };
                account.items.push(index);
                match AggregateStore::<AccountAggregate>::decide(&account.state, command).await {
                    Ok((_, events)) if events.is_empty() && !account.fresh => {
                        // "Already done" decided on a cached state is believed only from the
                        // log: a state that has not seen this step's earlier event (a hold)
                        // would skip a leg for good. The whole step is decided again next
                        // round, on every one of its accounts as the log holds them then.
                        freshness.wanted.extend(&involved);
                        outcome = AccountsDone::Again;
                        break;
                    }
                    Ok((_, events)) if events.is_empty() => {}
                    Ok((next, events)) => {
                        if account.decisions.is_empty() {
                            changed.push(account_id);
                        }
                        let metadata = metadata::for_saga(
                            &work.correlation_id,
                            &work.cause,
                            format!("saga/{}/{name}/{account_id}", work.transaction_id),
                        );
                        account.decisions.push((events, metadata));
                        account.state = next;
                    }
                    Err(_) if !account.fresh => {
                        // A refusal decided on a cached state is decided again next round, on
                        // the state the log holds: a stale one could refuse what it allows.
                        freshness.wanted.extend(&involved);
                        outcome = AccountsDone::Again;
                        break;
                    }
                    Err(refusal) => {
                        outcome = match saga::rejection_for(&refusal) {
                            Some(reason) if name == "reserve" => AccountsDone::Refused(reason),
                            _ => AccountsDone::Failed(format!(
                                "account {account_id} refused: {refusal}"
                            )),
                        };
                        break;
                    }
                }
            }
            done.insert(index, outcome);
        }
        // One append per account, in the order they were first changed.
        let mut plan = AccountPlan {
            done,
            ..AccountPlan::default()
        };
        for id in changed {
            let account = &accounts[&id];
            plan.pending.push(Pending {
                id: id.to_string(),
                expected_version: account.version,
                state_after: account.state.clone(),
                decisions: account.decisions.clone(),
            });
            plan.items.push(account.items.clone());
        }
        plan
    }

    /// Decides each stepping transaction's own events, then appends them with the accounts'
    /// in one chained append: each transaction's append is made only if the appends of the
    /// accounts it has a command on come out written, and after them in the log (module
    /// documentation). On PostgreSQL and SQLite that is one commit for the whole round.
    async fn transaction_phase(
        &self,
        items: &mut [Item],
        steps: &[(usize, SagaStep)],
        accounts: AccountPlan,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let AccountPlan {
            done,
            pending: account_pending,
            items: account_items,
        } = accounts;
        let mut pending: Vec<(usize, Pending<TransactionAggregate>)> = Vec::new();
        for &(index, step) in steps {
            let item = &mut items[index];
            let Some((transaction, version)) = item.state.clone() else {
                continue;
            };
            let first = match (step, done.get(&index)) {
                (_, Some(AccountsDone::Again)) => continue,
                (_, Some(AccountsDone::Failed(problem))) => {
                    item.result = Some(Err(Error::Store {
                        context: "applying a saga step to an account",
                        message: problem.clone(),
                    }));
                    continue;
                }
                (SagaStep::Reserve, Some(AccountsDone::Refused(reason))) => {
                    TransactionCommand::Reject {
                        reason: *reason,
                        at: now,
                    }
                }
                (SagaStep::Reserve, _) => TransactionCommand::RecordReservation { at: now },
                (SagaStep::Settle, _) => TransactionCommand::CompleteSettlement { at: now },
                (SagaStep::Release, _) => TransactionCommand::CompleteRelease { at: now },
                (SagaStep::Confirm, _) => TransactionCommand::Confirm { at: now },
                (SagaStep::Reject(reason), _) => TransactionCommand::Reject { reason, at: now },
                (SagaStep::AwaitDecision { .. } | SagaStep::Done, _) => continue,
            };
            match self.decide_chain(&item.work, transaction, first, now).await {
                Ok(Some((state_after, decisions))) => pending.push((
                    index,
                    Pending {
                        id: item.work.transaction_id.to_string(),
                        expected_version: version,
                        state_after,
                        decisions,
                    },
                )),
                Ok(None) => {
                    // Nothing to record (already recorded): look again next round, fresh.
                    self.transactions
                        .forget(&item.work.transaction_id.to_string());
                    item.state = None;
                }
                Err(error) => item.result = Some(Err(error)),
            }
        }
        if pending.is_empty() && account_pending.is_empty() {
            return Ok(());
        }
        let (indexes, pending): (Vec<usize>, Vec<Pending<TransactionAggregate>>) =
            pending.into_iter().unzip();
        let states: Vec<(TransactionAggregate, u64)> = pending
            .iter()
            .map(|item| {
                let events: usize = item.decisions.iter().map(|(events, _)| events.len()).sum();
                (
                    item.state_after.clone(),
                    item.expected_version + events as u64,
                )
            })
            .collect();
        // The accounts first, then each transaction after the accounts it has a command on.
        let mut prerequisites: HashMap<usize, Vec<usize>> = HashMap::new();
        for (append, involved) in account_items.iter().enumerate() {
            for &index in involved {
                let list = prerequisites.entry(index).or_default();
                if !list.contains(&append) {
                    list.push(append);
                }
            }
        }
        let account_appends = AggregateStore::<AccountAggregate>::encode_all(&account_pending)?;
        let transaction_appends = AggregateStore::<TransactionAggregate>::encode_all(&pending)?;
        let mut chain: Vec<Chained> = account_appends.into_iter().map(Chained::alone).collect();
        for (index, append) in indexes.iter().zip(transaction_appends) {
            chain.push(Chained {
                append,
                after: prerequisites.remove(index).unwrap_or_default(),
            });
        }
        // Until the outcomes are in the caches, the decision consumer waits for them rather
        // than decide on the states these appends replace (decision 56).
        let writing = (
            self.accounts
                .writing(account_pending.iter().map(|item| item.id.clone())),
            self.transactions
                .writing(pending.iter().map(|item| item.id.clone())),
        );
        let outcomes = match self.transactions.log().append_chained(chain).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                self.accounts.forget_unknown(&account_pending);
                self.transactions.forget_unknown(&pending);
                return Err(error.into());
            }
        };
        let (account_outcomes, transaction_outcomes) = outcomes.split_at(account_pending.len());
        // An account that conflicted sends every item with a command on it to the next round,
        // decided again on fresh state; their transaction appends were not made.
        let mut again: HashSet<usize> = HashSet::new();
        for (involved, outcome) in account_items.iter().zip(account_outcomes) {
            if *outcome == AppendOutcome::Conflict {
                metrics::counter!("saga_conflicts_total", "stream" => "account").increment(1);
                again.extend(involved);
            }
        }
        self.accounts
            .after_outcomes(account_pending, account_outcomes)
            .await;
        self.transactions
            .after_outcomes(pending, transaction_outcomes)
            .await;
        drop(writing);
        for ((index, outcome), (state, version)) in
            indexes.into_iter().zip(transaction_outcomes).zip(states)
        {
            let item = &mut items[index];
            match (outcome, state.0) {
                // Not made: the state it was decided on still stands; its accounts are read
                // again next round.
                _ if again.contains(&index) => {}
                (AppendOutcome::Appended { .. }, Some(transaction)) => {
                    item.state = Some((transaction, version));
                }
                (AppendOutcome::Conflict, _) => {
                    metrics::counter!("saga_conflicts_total", "stream" => "transaction")
                        .increment(1);
                    item.state = None;
                }
                // A duplicate (written by an earlier attempt) or a state that vanished: read it.
                _ => item.state = None,
            }
        }
        Ok(())
    }

    /// Decides `first` on the transaction, then whatever transaction-only step follows at once
    /// (a reservation with an approval on record is confirmed in the same append). `None` when
    /// nothing is to be recorded.
    async fn decide_chain(
        &self,
        work: &Work,
        transaction: Transaction,
        first: TransactionCommand,
        now: DateTime<Utc>,
    ) -> Result<
        Option<(
            TransactionAggregate,
            Vec<(Vec<TransactionEvent>, EventMetadata)>,
        )>,
    > {
        let mut state = TransactionAggregate(Some(transaction));
        let mut decisions = Vec::new();
        let mut command = Some(first);
        while let Some(next) = command.take() {
            let name = command_name(&next);
            let (after, events) = AggregateStore::<TransactionAggregate>::decide(&state, next)
                .await
                .map_err(|refusal| Error::Store {
                    context: "recording a saga step",
                    message: format!("transaction {} refused: {refusal}", work.transaction_id),
                })?;
            if events.is_empty() {
                break;
            }
            decisions.push((
                events,
                metadata::for_saga(
                    &work.correlation_id,
                    &work.cause,
                    format!("saga/{}/{name}", work.transaction_id),
                ),
            ));
            state = after;
            let Some(transaction) = &state.0 else {
                break;
            };
            command = saga::chained_command(transaction, now, self.settings.decision_timeout);
        }
        Ok((!decisions.is_empty()).then_some((state, decisions)))
    }
}

/// The account commands of one step.
type AccountCommands = Vec<(AccountId, AccountCommand)>;

/// A loaded state, its version, and whether it was read from the log now.
type Marked<A> = (A, u64, bool);

/// The account side of a round, decided and not yet appended.
#[derive(Default)]
struct AccountPlan {
    /// Per stepping item with account commands, what they came to.
    done: HashMap<usize, AccountsDone>,
    /// One append per changed account, in the order they were first changed.
    pending: Vec<Pending<AccountAggregate>>,
    /// Per append in `pending`, the items with a command on that account.
    items: Vec<Vec<usize>>,
}

/// What a transaction's account commands came to in a round.
#[derive(Debug, Clone)]
enum AccountsDone {
    /// Decided (or nothing to do) and appended.
    Done,
    /// An account refused the reservation for this reason, decided on its fresh state.
    Refused(RejectionReason),
    /// An account's append conflicted: decide again next round.
    Again,
    /// Cannot proceed now; retried later.
    Failed(String),
}

/// Which accounts the next round reads from the log rather than the cache. A step that comes
/// out as a no-op or a refusal on a state only the cache vouches for is decided again next round
/// on all of its accounts as the log holds them then. "As the log holds them then" is what makes
/// the no-op safe whoever else writes: the accounts are read after the transaction's state was
/// known, so they hold every account event committed no later than the transaction event that state
/// shows (a step's account events never commit after its transaction event). A round's
/// reads are trusted for that round only, and all of a step's accounts are read together, so
/// the step is decided on fresh states next round and the batch ends.
#[derive(Debug, Default)]
struct Freshness {
    /// To read from the log next round.
    wanted: HashSet<AccountId>,
}

/// An account's state while a round decides commands on it.
struct Working {
    version: u64,
    /// Whether `state` was read from the log this round, else only the cache vouches for it.
    fresh: bool,
    state: AccountAggregate,
    decisions: Vec<(Vec<AccountEvent>, EventMetadata)>,
    /// The items with a command on this account this round.
    items: Vec<usize>,
}

/// What a leadership session of the saga keeps between batches: where it has read to, and the
/// progress it has not recorded yet (decision 53).
#[derive(Debug)]
pub struct SagaSession {
    /// Whether `position` was read from the recorded checkpoint yet.
    read: bool,
    /// The position of the last event this session processed.
    position: LogPosition,
    /// The checkpoint as last recorded.
    recorded: LogPosition,
    recorded_at: Instant,
    /// The latest progress of each transaction since the last record.
    unrecorded: HashMap<Uuid, SagaProgress>,
}

impl SagaSession {
    /// Whether it holds progress or a position its last record did not write.
    fn has_unrecorded(&self) -> bool {
        !self.unrecorded.is_empty() || self.position != self.recorded
    }
}

impl Default for SagaSession {
    fn default() -> Self {
        SagaSession {
            read: false,
            position: LogPosition::START,
            recorded: LogPosition::START,
            recorded_at: Instant::now(),
            unrecorded: HashMap::new(),
        }
    }
}

#[async_trait]
impl Follower for Saga {
    type Session = SagaSession;
    type Error = Error;

    fn name(&self) -> &'static str {
        "saga"
    }

    /// A new session starts from the log: caches may hold states an unknown outcome left behind,
    /// or another instance's leader changed since.
    async fn lead(&self) -> Result<SagaSession> {
        self.accounts.forget_all();
        self.transactions.forget_all();
        let resumed = self.resume_all().await?;
        tracing::info!(resumed, "saga resumed in-flight transactions");
        Ok(SagaSession::default())
    }

    /// A batch, and a record of the progress when the last one is [`RECORD_INTERVAL`] old, busy
    /// or idle: at light load the saga goes idle after nearly every batch, and a record at each
    /// was a commit (and an in-flight row written and deleted) per transfer (decision 65). An
    /// idle look that records also reads the checkpoint again, so an operator who moved it back
    /// is followed.
    async fn try_process_batch(&self, session: &mut SagaSession) -> Result<Outcome> {
        let outcome = self.next_log_batch(session).await?;
        if session.recorded_at.elapsed() >= RECORD_INTERVAL {
            self.record(session).await?;
            if outcome == Outcome::Idle {
                session.read = false;
            }
        }
        Ok(outcome)
    }

    /// Progress not recorded yet is recorded [`RECORD_INTERVAL`] after the last record.
    fn record_due(&self, session: &SagaSession) -> Option<Duration> {
        session
            .has_unrecorded()
            .then(|| RECORD_INTERVAL.saturating_sub(session.recorded_at.elapsed()))
    }

    /// Records first: the due transactions are read from what is recorded.
    async fn housekeeping(&self, session: &mut SagaSession) -> Result<()> {
        self.record(session).await?;
        self.process_due(self.settings.batch_size).await?;
        Ok(())
    }

    /// A session that stops records what it can; one that failed may not, and its successor
    /// replays from the recorded checkpoint.
    async fn end(&self, mut session: SagaSession) {
        if let Err(error) = self.record(&mut session).await {
            tracing::warn!(error.message = %error, "saga progress not recorded; it is replayed");
        }
    }
}

/// The transactions a batch touches, once each, with the latest event as the cause.
fn distinct_work(events: &[RecordedEvent]) -> Vec<Work> {
    let mut seen = HashSet::new();
    let mut work = Vec::new();
    for event in events.iter().rev() {
        let Ok(id) = Uuid::parse_str(&event.stream.aggregate_id) else {
            tracing::error!(stream = %event.stream, "transaction stream id is not a UUID; skipped");
            continue;
        };
        if seen.insert(id) {
            let correlation_id = &event.metadata.correlation_id;
            work.push(Work {
                transaction_id: TransactionId(id),
                correlation_id: if correlation_id.is_empty() {
                    id.to_string()
                } else {
                    correlation_id.clone()
                },
                cause: event.event_id.to_string(),
            });
        }
    }
    work.reverse();
    work
}

fn progress_of(results: &[(Work, Result<Progress>)]) -> Vec<SagaProgress> {
    results
        .iter()
        .map(|(work, result)| SagaProgress {
            transaction_id: work.transaction_id.as_uuid(),
            correlation_id: work.correlation_id.clone(),
            state: match result {
                Ok(Progress::Done) => InFlight::Done,
                Ok(Progress::Waiting { until }) => InFlight::Waiting { until: *until },
                Err(error) => InFlight::Failed {
                    error: error.to_string(),
                },
            },
        })
        .collect()
}

/// The correlation ids of a batch, for its log line: one grep follows a transaction.
fn correlation_ids(results: &[(Work, Result<Progress>)]) -> String {
    let mut ids: Vec<&str> = results
        .iter()
        .map(|(work, _)| work.correlation_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.join(",")
}

/// Counts a transaction's confirmation or rejection as the saga reads it from the log
/// (`saga_transactions_decided_total`): what an operator watches for rejections by reason, the
/// decision timeouts among them. An event read again (a saga restarted before it recorded its
/// checkpoint) counts again.
fn count_decision(event: &TransactionEvent) {
    let (outcome, reason) = match event {
        TransactionEvent::TransactionConfirmed { .. } => ("confirmed", "none"),
        TransactionEvent::TransactionRejected { reason, .. } => ("rejected", reason.as_str()),
        _ => return,
    };
    metrics::counter!(
        "saga_transactions_decided_total",
        "outcome" => outcome,
        "reason" => reason
    )
    .increment(1);
}

/// The name a transaction step's command id carries: `saga/{transaction}/{name}`.
pub(crate) fn command_name(command: &TransactionCommand) -> &'static str {
    match command {
        TransactionCommand::Create { .. } => "create",
        TransactionCommand::RecordReservation { .. } => "reserved",
        TransactionCommand::RecordFraudDecision { .. } => "decision",
        TransactionCommand::Confirm { .. } => "confirm",
        TransactionCommand::Reject { .. } => "reject",
        TransactionCommand::CompleteSettlement { .. } => "settled",
        TransactionCommand::CompleteRelease { .. } => "released",
    }
}

/// How long the housekeeping may wait between due scans; exposed for tests.
pub const DUE_SCAN_INTERVAL: Duration = infra::follow::HOUSEKEEPING_INTERVAL;
