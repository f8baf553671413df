//! The one follower loop: how the saga, the relay and the projector follow the log.
//!
//! A [`Follower`] only says how to start a session ([`Follower::lead`]: resume in-flight work,
//! connect to a broker) and how to process one batch ([`Follower::try_process_batch`]). The loop
//! around it, the same for all of them:
//! - takes the follower's leadership (one active runner across instances) and checks it about
//!   once a second, with the follower's housekeeping;
//! - after a batch, goes straight on; when idle, waits for a wake-up from the event log (a
//!   commit here or a `NOTIFY` from elsewhere), or the poll interval as a fallback;
//! - after a wake-up that found nothing visible yet (a commit can become readable a moment after
//!   it is announced, when an older transaction is still running), looks again after 1, 2, 4 …
//!   milliseconds, instead of waiting a whole poll interval;
//! - after a failed batch, ends the session and starts a fresh one after a back-off that grows
//!   from [`RETRY_FIRST`] to [`RETRY_MAX`] while failures repeat, keeping its leadership.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::eventlog::Wakeups;
use crate::leader::{Leadership, Lease};
use crate::tasks::pause;

/// How often a leader checks its lease and runs its housekeeping.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The first pause after a failed batch or session start.
pub const RETRY_FIRST: Duration = Duration::from_millis(200);

/// The longest pause between attempts while failures repeat.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// The longest of the quick looks after a wake-up that found nothing visible yet: past it, the
/// commit is held back by something long, and the poll interval takes over.
const RECHECK_MAX: Duration = Duration::from_millis(32);

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Processed(usize),
    Idle,
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
    let mut recheck: Option<Duration> = None;
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
        match follower.try_process_batch(&mut session).await {
            Ok(Outcome::Processed(_)) => {
                worked = true;
                recheck = None;
            }
            Ok(Outcome::Idle) => {
                let wait = recheck.unwrap_or(settings.poll_interval);
                let woken = tokio::select! {
                    () = cancel.cancelled() => None,
                    changed = wakeups.changed() => Some(changed.is_ok()),
                    () = tokio::time::sleep(wait) => Some(false),
                };
                let Some(woken) = woken else {
                    break SessionEnd::Stopped;
                };
                recheck = if woken {
                    Some(Duration::from_millis(1))
                } else {
                    recheck
                        .map(|previous| previous * 2)
                        .filter(|next| *next <= RECHECK_MAX)
                };
                if !woken && recheck.is_none() && wakeups.has_changed().is_err() {
                    // The log is gone (its sender dropped): poll only.
                    pause(cancel, settings.poll_interval).await;
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
