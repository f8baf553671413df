//! The one follower loop: how the saga, the relay and the projector follow the log.
//!
//! A [`Follower`] only says how to start a session ([`Follower::lead`]: resume in-flight work,
//! connect to a broker) and how to process one batch ([`Follower::try_process_batch`]). The loop
//! around it, the same for all of them:
//! - takes the follower's leadership (one active runner across instances) and checks it about
//!   once a second, with the follower's housekeeping;
//! - after a full batch, goes straight on; after one that caught up with the log, and when idle,
//!   waits for a wake-up from the event log (a commit here or a `NOTIFY` from elsewhere; one
//!   that came during the batch is already there), or the poll interval as a fallback, but no
//!   longer than the follower's [`Follower::record_due`]: a follower records its progress at most
//!   every so often, idle or not, and an idle look is when it records what is left;
//! - a wake-up is sent once a commit is readable (after the commit here, by `NOTIFY` at commit,
//!   by a KurrentDB subscription), so a look that finds nothing after one means the commit held
//!   nothing for this follower: it waits for the next (decision 66);
//! - after a failed batch, ends the session and starts a fresh one after a back-off that grows
//!   from [`RETRY_FIRST`] to [`RETRY_MAX`] while failures repeat, keeping its leadership.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::eventlog::{EventLog, Wakeups};
use crate::leader::{Leadership, Lease};
use crate::tasks::pause;

/// How often a leader checks its lease and runs its housekeeping.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The first pause after a failed batch or session start.
pub const RETRY_FIRST: Duration = Duration::from_millis(200);

/// The longest pause between attempts while failures repeat.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A full batch: more may be waiting right behind it, so the loop looks again at once.
    Processed(usize),
    /// A batch that held everything committed when it was read (fewer events than asked for):
    /// whatever commits later sends a wake-up, so the loop waits for one, as when idle, instead
    /// of looking again at once only to find nothing (decision 68).
    CaughtUp(usize),
    Idle,
}

impl Outcome {
    /// A batch of `read` events from `log`, which was asked for up to `limit`: caught up when
    /// it came back short and `log` wakes this process for every commit (whoever made it), so
    /// the next one sends a wake-up; otherwise another look may find more.
    pub fn of_batch(read: usize, limit: usize, log: &dyn EventLog) -> Outcome {
        if read < limit && log.wakes_on_every_commit() {
            Outcome::CaughtUp(read)
        } else {
            Outcome::Processed(read)
        }
    }
}

/// A follower of the log.
#[async_trait]
pub trait Follower: Send + Sync + 'static {
    /// What a leadership session holds (a broker channel, nothing).
    type Session: Send;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The follower's name: its leadership lock and its log lines.
    fn name(&self) -> &'static str;

    /// Starts a session, each time this instance takes the lead or after a failure.
    async fn lead(&self) -> Result<Self::Session, Self::Error>;

    /// Processes the next batch after the follower's checkpoint and moves the checkpoint.
    async fn try_process_batch(&self, session: &mut Self::Session) -> Result<Outcome, Self::Error>;

    /// When the session holds progress it has not recorded yet (a checkpoint to write): how long
    /// until it is due, so an idle loop looks again by then and the follower records it there
    /// (decision 65). `None`: nothing to record. The default, for followers that record with
    /// every batch.
    fn record_due(&self, _session: &Self::Session) -> Option<Duration> {
        None
    }

    /// Runs about once a second while leading (timers, due work).
    async fn housekeeping(&self, _session: &mut Self::Session) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Ends a session (close a channel); called when it stops normally or fails.
    async fn end(&self, _session: Self::Session) {}
}

/// How the loop waits.
#[derive(Debug, Clone, Copy)]
pub struct FollowSettings {
    /// How long an idle follower waits without a wake-up before looking anyway.
    pub poll_interval: Duration,
}

/// Runs `follower` until `cancel`, whenever this instance leads it.
pub async fn follow<F: Follower>(
    follower: Arc<F>,
    leadership: Arc<dyn Leadership>,
    mut wakeups: Wakeups,
    settings: FollowSettings,
    cancel: CancellationToken,
) {
    let name = follower.name();
    let mut retry = RETRY_FIRST;
    while !cancel.is_cancelled() {
        let mut lease = match leadership.acquire(name, &cancel).await {
            Ok(Some(lease)) => lease,
            Ok(None) => break,
            Err(error) => {
                tracing::error!(follower = name, error.message = %error, "cannot take the leadership");
                pause(&cancel, retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        while !cancel.is_cancelled() {
            let session = match follower.lead().await {
                Ok(session) => session,
                Err(error) => {
                    failed(name, "starting", &error);
                    pause(&cancel, retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    if !lease.still_held().await {
                        break;
                    }
                    continue;
                }
            };
            match run_session(
                &*follower,
                session,
                &mut *lease,
                &mut wakeups,
                settings,
                &cancel,
            )
            .await
            {
                SessionEnd::Stopped | SessionEnd::LeaseLost => {
                    retry = RETRY_FIRST;
                    break;
                }
                SessionEnd::Failed(worked) => {
                    if worked {
                        retry = RETRY_FIRST;
                    }
                    pause(&cancel, retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    if !lease.still_held().await {
                        break;
                    }
                }
            }
        }
    }
    tracing::info!(follower = name, "follower stopped");
}

enum SessionEnd {
    Stopped,
    LeaseLost,
    /// A batch or the housekeeping failed; `true` when the session processed something first.
    Failed(bool),
}

async fn run_session<F: Follower>(
    follower: &F,
    mut session: F::Session,
    lease: &mut dyn Lease,
    wakeups: &mut Wakeups,
    settings: FollowSettings,
    cancel: &CancellationToken,
) -> SessionEnd {
    let name = follower.name();
    let mut housekeeping = Instant::now();
    let mut worked = false;
    let end = loop {
        if cancel.is_cancelled() {
            break SessionEnd::Stopped;
        }
        if housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            housekeeping = Instant::now();
            if !lease.still_held().await {
                break SessionEnd::LeaseLost;
            }
            if let Err(error) = follower.housekeeping(&mut session).await {
                failed(name, "housekeeping", &error);
                break SessionEnd::Failed(worked);
            }
        }
        // Whatever committed before this batch's read is in it: wake-ups until now are spent.
        wakeups.borrow_and_update();
        let outcome = follower.try_process_batch(&mut session).await;
        if let Ok(Outcome::Processed(_) | Outcome::CaughtUp(_)) = outcome {
            worked = true;
        }
        match outcome {
            Ok(Outcome::Processed(_)) => {}
            Ok(Outcome::CaughtUp(_) | Outcome::Idle) => {
                let mut wait = settings.poll_interval;
                if let Some(due) = follower.record_due(&session) {
                    wait = wait.min(due);
                }
                let woken = tokio::select! {
                    () = cancel.cancelled() => None,
                    changed = wakeups.changed() => Some(changed.is_ok()),
                    () = tokio::time::sleep(wait) => Some(false),
                };
                let Some(woken) = woken else {
                    break SessionEnd::Stopped;
                };
                if !woken && wakeups.has_changed().is_err() {
                    // The log is gone (its sender dropped): poll only.
                    pause(cancel, wait).await;
                }
            }
            Err(error) => {
                failed(name, "processing a batch", &error);
                break SessionEnd::Failed(worked);
            }
        }
    };
    follower.end(session).await;
    end
}

fn failed(name: &'static str, doing: &'static str, error: &(dyn std::error::Error + 'static)) {
    metrics::counter!("follower_failures_total", "follower" => name).increment(1);
    tracing::error!(
        follower = name,
        error.message = %error,
        error.cause_chain = %crate::problem::cause_chain(error),
        "follower failed while {doing}; starting a fresh session"
    );
}

/// Records how long the oldest event of a batch waited between its commit and a follower
/// processing it: the wake-up and read latency of `follower` (`follower_event_age_seconds`).
pub fn record_event_age(follower: &'static str, recorded_at: chrono::DateTime<chrono::Utc>) {
    let age = (chrono::Utc::now() - recorded_at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    metrics::histogram!("follower_event_age_seconds", "follower" => follower).record(age);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::{mpsc, watch};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::leader::LocalLeadership;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    /// `follower` run by the loop with an hour's poll interval, so only a wake-up or the
    /// follower's `record_due` brings a look after an idle or caught-up one.
    struct Running {
        cancel: CancellationToken,
        loop_task: JoinHandle<()>,
    }

    impl Running {
        fn start<F: Follower>(follower: F, wakeups: Wakeups) -> Running {
            let cancel = CancellationToken::new();
            let loop_task = tokio::spawn(follow(
                Arc::new(follower),
                Arc::new(LocalLeadership::default()),
                wakeups,
                FollowSettings {
                    poll_interval: Duration::from_secs(3600),
                },
                cancel.clone(),
            ));
            Running { cancel, loop_task }
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.loop_task.await.expect("the loop stops when cancelled");
        }
    }

    /// A follower that never finds work and reports progress to record, due after `due`, until
    /// a look finds it due; each look is sent to the test.
    struct Unrecorded {
        due: Duration,
        since: Mutex<Option<Instant>>,
        looks: mpsc::UnboundedSender<bool>,
    }

    #[async_trait]
    impl Follower for Unrecorded {
        type Session = ();
        type Error = Never;

        fn name(&self) -> &'static str {
            "unrecorded"
        }

        async fn lead(&self) -> Result<(), Never> {
            Ok(())
        }

        async fn try_process_batch(&self, _session: &mut ()) -> Result<Outcome, Never> {
            let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
            let started = *since.get_or_insert_with(Instant::now);
            let recorded = started.elapsed() >= self.due;
            if recorded {
                *since = None;
            }
            let _ = self.looks.send(recorded);
            Ok(Outcome::Idle)
        }

        fn record_due(&self, _session: &()) -> Option<Duration> {
            let since = self.since.lock().unwrap_or_else(|e| e.into_inner());
            since.map(|started| self.due.saturating_sub(started.elapsed()))
        }
    }

    /// With no wake-up and an hour's poll interval, only the follower's `record_due` can make
    /// an idle loop look again: it must, by then, and the look records.
    #[tokio::test]
    async fn an_idle_loop_looks_again_when_unrecorded_progress_is_due() {
        let (looks, mut seen) = mpsc::unbounded_channel();
        let (_sender, wakeups) = watch::channel(0);
        let running = Running::start(
            Unrecorded {
                due: Duration::from_millis(50),
                since: Mutex::new(None),
                looks,
            },
            wakeups,
        );
        let first = seen.recv().await;
        assert_eq!(first, Some(false), "the first look finds nothing due");
        let second = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await;
        assert_eq!(
            second,
            Ok(Some(true)),
            "the loop looked again once the record was due, and that look recorded"
        );
        running.stop().await;
    }

    /// A follower whose every batch catches up with the log; each look is sent to the test.
    /// With `commit_during_first`, its first batch sees a commit land while it runs (it bumps
    /// the wake-ups itself).
    struct CatchingUp {
        commit_during_first: Option<watch::Sender<u64>>,
        looks: mpsc::UnboundedSender<()>,
    }

    #[async_trait]
    impl Follower for CatchingUp {
        type Session = ();
        type Error = Never;

        fn name(&self) -> &'static str {
            "catching-up"
        }

        async fn lead(&self) -> Result<(), Never> {
            Ok(())
        }

        async fn try_process_batch(&self, _session: &mut ()) -> Result<Outcome, Never> {
            let _ = self.looks.send(());
            if let Some(commits) = &self.commit_during_first
                && *commits.borrow() == 0
            {
                commits.send_modify(|count| *count += 1);
            }
            // A loop that wrongly looked again at once must not starve the test's runtime.
            tokio::task::yield_now().await;
            Ok(Outcome::CaughtUp(1))
        }
    }

    /// A batch that caught up is followed by a wait for the next wake-up, not by another look.
    #[tokio::test]
    async fn after_a_batch_that_caught_up_the_loop_waits_for_a_wake_up() {
        let (looks, mut seen) = mpsc::unbounded_channel();
        let (sender, wakeups) = watch::channel(0_u64);
        let running = Running::start(
            CatchingUp {
                commit_during_first: None,
                looks,
            },
            wakeups,
        );
        assert_eq!(seen.recv().await, Some(()), "the first look");
        let again = tokio::time::timeout(Duration::from_millis(300), seen.recv()).await;
        assert!(again.is_err(), "no second look without a wake-up");
        sender.send_modify(|count| *count += 1);
        let woken = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await;
        assert_eq!(woken, Ok(Some(())), "a wake-up brings the next look");
        running.stop().await;
    }

    /// A wake-up that arrives while a batch runs is not lost: the batch that caught up is
    /// followed by another look at once, without waiting for the poll interval.
    #[tokio::test]
    async fn a_wake_up_during_a_batch_brings_the_next_look() {
        let (looks, mut seen) = mpsc::unbounded_channel();
        let (commits, wakeups) = watch::channel(0_u64);
        let running = Running::start(
            CatchingUp {
                commit_during_first: Some(commits),
                looks,
            },
            wakeups,
        );
        assert_eq!(seen.recv().await, Some(()), "the first look");
        let second = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await;
        assert_eq!(
            second,
            Ok(Some(())),
            "the commit during it brings a second look"
        );
        running.stop().await;
    }
}
