//! Group commit: many concurrent appends share one database transaction and one fsync.
//!
//! Callers hand their appends to one committer task through a bounded queue. The task takes
//! whatever is waiting (up to [`CommitterSettings::batch_events_max`] events), writes it with one
//! [`BatchWriter::write`], answers every caller, and wakes the followers. While a batch commits
//! the next one fills, so under load batches grow and commits per append shrink; an idle system
//! commits a lone append at once, with no timer to wait for.
//!
//! Bounded like everything else: a caller waits at most [`CommitterSettings::deadline`] for room
//! in the queue and for its turn; past it, it gets [`Error::Overloaded`] (a 503 with
//! `Retry-After` at the HTTP edge) and its appends are not written. No stream appears twice in a
//! batch: a request touching a stream of the batch being formed waits for the next one, so the
//! writer never has to order two appends of one stream. A request's appends always share a
//! batch, so a chain ([`Chained`]) is the writer's to honour within one transaction.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Append, AppendOutcome, Chained, StreamId};
use crate::error::{Error, Result};

/// Writes one batch of appends, no stream twice, ideally in one transaction.
#[async_trait]
pub trait BatchWriter: Send + 'static {
    /// The outcome of each append, in order. An append is made only if each one its
    /// [`Chained::after`] names (earlier in the batch) comes out written; otherwise it is a
    /// [`AppendOutcome::Conflict`], unwritten. An error leaves every outcome unknown.
    async fn write(&mut self, appends: &[Chained]) -> Result<Vec<AppendOutcome>>;
}

/// How the committer batches and bounds its queue.
#[derive(Debug, Clone, Copy)]
pub struct CommitterSettings {
    /// Requests (each one caller's appends) waiting at most.
    pub queue_capacity: usize,
    /// Events per batch at most: bounds a batch's statement and transaction.
    pub batch_events_max: usize,
    /// How long a caller waits for room in the queue and for its batch to start.
    pub deadline: Duration,
}

impl Default for CommitterSettings {
    fn default() -> Self {
        CommitterSettings {
            // A burst of this many concurrent requests queues; more are refused after the
            // deadline. 4,096 is two seconds of the fastest load measured, far above the
            // service's HTTP concurrency.
            queue_capacity: 4_096,
            // ~2,000 small rows insert in a few milliseconds; bigger batches only lengthen the
            // transaction that holds back every log follower.
            batch_events_max: 2_000,
            // A request that could not even start its write within 2 s is better refused (the
            // client retries with its idempotency key) than left hanging.
            deadline: Duration::from_secs(2),
        }
    }
}

struct Request {
    /// Prerequisites index this request's own appends.
    appends: Vec<Chained>,
    reply: oneshot::Sender<Result<Vec<AppendOutcome>>>,
    deadline: Instant,
    enqueued: Instant,
}

impl Request {
    fn events(&self) -> usize {
        self.appends
            .iter()
            .map(|chained| chained.append.events.len())
            .sum()
    }

    fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.appends.iter().map(|chained| &chained.append.stream)
    }
}

/// The handle callers append through. Cheap to clone; the task ends when every handle is gone.
#[derive(Clone)]
pub struct GroupCommitter {
    sender: mpsc::Sender<Request>,
    deadline: Duration,
}

impl GroupCommitter {
    /// Starts the committer task over `writer`. After each batch that wrote something,
    /// `committed` is bumped so followers in this process look at once.
    pub fn start<W: BatchWriter>(
        writer: W,
        committed: watch::Sender<u64>,
        settings: CommitterSettings,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(settings.queue_capacity);
        tokio::spawn(run(writer, receiver, committed, settings));
        GroupCommitter {
            sender,
            deadline: settings.deadline,
        }
    }

    /// As [`GroupCommitter::start`], with the committer task on a thread of its own
    /// ([`crate::tasks::spawn_on_own_thread`]): for a writer whose every statement is a round
    /// trip to another thread (SQLite's).
    pub fn start_on_own_thread<W: BatchWriter>(
        writer: W,
        committed: watch::Sender<u64>,
        settings: CommitterSettings,
    ) -> Result<Self> {
        let (sender, receiver) = mpsc::channel(settings.queue_capacity);
        crate::tasks::spawn_on_own_thread(
            "event-log-committer",
            run(writer, receiver, committed, settings),
        )?;
        Ok(GroupCommitter {
            sender,
            deadline: settings.deadline,
        })
    }

    /// Appends through the next batch. The same stream may appear only once in `appends`.
    pub async fn submit(&self, appends: Vec<Append>) -> Result<Vec<AppendOutcome>> {
        self.submit_chained(appends.into_iter().map(Chained::alone).collect())
            .await
    }

    /// As [`GroupCommitter::submit`], honouring each append's prerequisites: the whole chain is
    /// written in one batch.
    pub async fn submit_chained(&self, appends: Vec<Chained>) -> Result<Vec<AppendOutcome>> {
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        super::check_chain(&appends)?;
        let mut seen = HashSet::with_capacity(appends.len());
        if let Some(twice) = appends
            .iter()
            .map(|chained| &chained.append)
            .find(|append| !seen.insert(&append.stream))
        {
            return Err(Error::Config(format!(
                "stream {} appears twice in one append call",
                twice.stream
            )));
        }
        let enqueued = Instant::now();
        let deadline = enqueued + self.deadline;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            appends,
            reply,
            deadline,
            enqueued,
        };
        match self.sender.send_timeout(request, self.deadline).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                metrics::counter!("event_log_appends_refused_total", "reason" => "queue_full")
                    .increment(1);
                return Err(overloaded());
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(stopped()),
        }
        answer.await.map_err(|_| stopped())?
    }
}

fn overloaded() -> Error {
    Error::Overloaded {
        what: "the event log's write queue",
        retry_after: Duration::from_secs(1),
    }
}

fn stopped() -> Error {
    Error::CommitFailed("the event log's committer has stopped".to_owned())
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut receiver: mpsc::Receiver<Request>,
    committed: watch::Sender<u64>,
    settings: CommitterSettings,
) {
    let mut deferred: VecDeque<Request> = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(request) => request,
            None => match receiver.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let batch = gather(first, &mut deferred, &mut receiver, settings);
        if batch.is_empty() {
            continue;
        }
        // One list; each request's prerequisites shifted to where its appends start in it.
        let mut appends: Vec<Chained> = Vec::new();
        for request in &batch {
            let start = appends.len();
            appends.extend(request.appends.iter().map(|chained| Chained {
                append: chained.append.clone(),
                after: chained.after.iter().map(|before| start + before).collect(),
            }));
        }
        let started = Instant::now();
        for request in &batch {
            metrics::histogram!("event_log_queue_wait_seconds")
                .record(started.duration_since(request.enqueued).as_secs_f64());
        }
        let written = writer.write(&appends).await;
        metrics::histogram!("event_log_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("event_log_batch_events").record(
            appends
                .iter()
                .map(|chained| chained.append.events.len())
                .sum::<usize>() as f64,
        );
        match written {
            Ok(outcomes) => {
                debug_assert_eq!(outcomes.len(), appends.len());
                if outcomes
                    .iter()
                    .any(|outcome| matches!(outcome, AppendOutcome::Appended { .. }))
                {
                    committed.send_modify(|count| *count = count.wrapping_add(1));
                }
                let mut outcomes = outcomes.into_iter();
                for request in batch {
                    let mine: Vec<AppendOutcome> =
                        outcomes.by_ref().take(request.appends.len()).collect();
                    let _ = request.reply.send(Ok(mine));
                }
            }
            Err(error) => {
                metrics::counter!("event_log_batch_failures_total").increment(1);
                tracing::error!(
                    error.message = %error,
                    error.cause_chain = %crate::problem::cause_chain(&error),
                    appends = appends.len(),
                    "an event log batch failed; its outcome is unknown to its callers"
                );
                let message = error.to_string();
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(Error::CommitFailed(message.clone())));
                }
            }
        }
    }
}

/// Forms a batch: `first`, then deferred requests, then whatever the queue holds, up to the
/// event bound, no stream twice. Requests past their deadline are refused here, unwritten.
fn gather(
    first: Request,
    deferred: &mut VecDeque<Request>,
    receiver: &mut mpsc::Receiver<Request>,
    settings: CommitterSettings,
) -> Vec<Request> {
    let now = Instant::now();
    let mut batch = Vec::new();
    let mut streams: HashSet<StreamId> = HashSet::new();
    let mut events = 0;
    let take = |request: Request,
                batch: &mut Vec<Request>,
                streams: &mut HashSet<StreamId>,
                events: &mut usize|
     -> Option<Request> {
        if request.deadline < now {
            metrics::counter!("event_log_appends_refused_total", "reason" => "deadline")
                .increment(1);
            let _ = request.reply.send(Err(overloaded()));
            return None;
        }
        if request.streams().any(|stream| streams.contains(stream)) {
            return Some(request);
        }
        streams.extend(request.streams().cloned());
        *events += request.events();
        batch.push(request);
        None
    };
    if let Some(kept) = take(first, &mut batch, &mut streams, &mut events) {
        deferred.push_front(kept);
        return batch;
    }
    let mut still_deferred = VecDeque::new();
    while let Some(request) = deferred.pop_front() {
        if events >= settings.batch_events_max {
            still_deferred.push_back(request);
            continue;
        }
        if let Some(kept) = take(request, &mut batch, &mut streams, &mut events) {
            still_deferred.push_back(kept);
        }
    }
    *deferred = still_deferred;
    while events < settings.batch_events_max {
        let Ok(request) = receiver.try_recv() else {
            break;
        };
        if let Some(kept) = take(request, &mut batch, &mut streams, &mut events) {
            deferred.push_back(kept);
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::eventlog::{EventMetadata, LogPosition, NewEvent};

    /// Records the batches it was given (and their chains); every append succeeds.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<StreamId>>>>,
        chains: Arc<Mutex<Vec<Vec<Vec<usize>>>>>,
        delay: Duration,
    }

    impl Recorder {
        fn new(batches: Arc<Mutex<Vec<Vec<StreamId>>>>, delay: Duration) -> Self {
            Recorder {
                batches,
                chains: Arc::default(),
                delay,
            }
        }
    }

    #[async_trait]
    impl BatchWriter for Recorder {
        async fn write(&mut self, appends: &[Chained]) -> Result<Vec<AppendOutcome>> {
            tokio::time::sleep(self.delay).await;
            self.batches.lock().expect("test lock").push(
                appends
                    .iter()
                    .map(|chained| chained.append.stream.clone())
                    .collect(),
            );
            self.chains.lock().expect("test lock").push(
                appends
                    .iter()
                    .map(|chained| chained.after.clone())
                    .collect(),
            );
            Ok(appends
                .iter()
                .map(|chained| &chained.append)
                .map(|append| AppendOutcome::Appended {
                    version: append.expected_version + append.events.len() as u64,
                    position: LogPosition::START,
                })
                .collect())
        }
    }

    fn append(id: &str) -> Append {
        Append {
            stream: StreamId::new("account", id),
            expected_version: 0,
            events: vec![NewEvent {
                event_id: uuid::Uuid::new_v4(),
                event_type: "Test".to_owned(),
                event_version: "1".to_owned(),
                payload: "{}".to_owned(),
                metadata: EventMetadata::default(),
            }],
        }
    }

    #[tokio::test]
    async fn concurrent_appends_share_batches_and_one_stream_never_appears_twice_in_one() {
        // Proves group commit: 50 concurrent callers are served by far fewer batches, and two
        // callers of the same stream land in different batches.
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (committed, mut wakeups) = watch::channel(0);
        let committer = GroupCommitter::start(
            Recorder::new(batches.clone(), Duration::from_millis(5)),
            committed,
            CommitterSettings::default(),
        );
        let mut callers = Vec::new();
        for index in 0..50 {
            let committer = committer.clone();
            // Streams 0 and 25 are the same: "s0".
            let id = format!("s{}", index % 25);
            callers.push(tokio::spawn(async move {
                committer.submit(vec![append(&id)]).await
            }));
        }
        for caller in callers {
            let outcomes = caller.await.expect("no panic").expect("written");
            assert!(matches!(outcomes[..], [AppendOutcome::Appended { .. }]));
        }
        let batches = batches.lock().expect("test lock").clone();
        assert!(
            batches.len() < 50,
            "{} batches for 50 appends",
            batches.len()
        );
        for batch in &batches {
            let distinct: HashSet<_> = batch.iter().collect();
            assert_eq!(distinct.len(), batch.len(), "a stream twice in {batch:?}");
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 50);
        assert!(wakeups.has_changed().expect("sender alive"));
        assert!(*wakeups.borrow_and_update() > 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_past_the_deadline_without_writing() {
        // Proves the bound: with a queue of one and a writer slower than the deadline, a caller
        // that cannot get in is refused with Overloaded, and its append is never written.
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (committed, _wakeups) = watch::channel(0);
        let committer = GroupCommitter::start(
            Recorder::new(batches.clone(), Duration::from_millis(300)),
            committed,
            CommitterSettings {
                queue_capacity: 1,
                batch_events_max: 1,
                deadline: Duration::from_millis(50),
            },
        );
        let mut callers = Vec::new();
        for index in 0..4 {
            let committer = committer.clone();
            callers.push(tokio::spawn(async move {
                committer.submit(vec![append(&format!("s{index}"))]).await
            }));
        }
        let mut refused = 0;
        for caller in callers {
            match caller.await.expect("no panic") {
                Ok(_) => {}
                Err(Error::Overloaded { .. }) => refused += 1,
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert!(refused >= 2, "only {refused} refused");
        let written: usize = batches
            .lock()
            .expect("test lock")
            .iter()
            .map(Vec::len)
            .sum();
        assert_eq!(written, 4 - refused, "a refused append was written");
    }

    #[tokio::test]
    async fn a_chain_keeps_pointing_at_its_own_appends_in_a_shared_batch() {
        // Proves the shift: a request's prerequisites index its own appends; in a batch behind
        // another request's appends they must name the same appends at their new places.
        let batches = Arc::new(Mutex::new(Vec::new()));
        let writer = Recorder::new(batches.clone(), Duration::from_millis(50));
        let chains = writer.chains.clone();
        let (committed, _wakeups) = watch::channel(0);
        let committer = GroupCommitter::start(writer, committed, CommitterSettings::default());
        // The first batch holds the writer while the next two requests queue together.
        let busy = tokio::spawn({
            let committer = committer.clone();
            async move { committer.submit(vec![append("busy")]).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let plain = tokio::spawn({
            let committer = committer.clone();
            async move { committer.submit(vec![append("p1"), append("p2")]).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let chained = committer
            .submit_chained(vec![
                Chained::alone(append("source")),
                Chained::alone(append("other")),
                Chained {
                    append: append("record"),
                    after: vec![0, 1],
                },
            ])
            .await
            .expect("written");
        assert_eq!(chained.len(), 3);
        busy.await.expect("no panic").expect("written");
        plain.await.expect("no panic").expect("written");
        let batches = batches.lock().expect("test lock").clone();
        let chains = chains.lock().expect("test lock").clone();
        let shared = batches
            .iter()
            .position(|batch| batch.len() == 5)
            .unwrap_or_else(|| panic!("the two requests did not share a batch: {batches:?}"));
        let names: Vec<&str> = batches[shared]
            .iter()
            .map(|stream| stream.aggregate_id.as_str())
            .collect();
        assert_eq!(names, ["p1", "p2", "source", "other", "record"]);
        assert_eq!(chains[shared], [vec![], vec![], vec![], vec![], vec![2, 3]]);
    }

    #[tokio::test]
    async fn the_same_stream_twice_in_one_call_is_refused() {
        let (committed, _wakeups) = watch::channel(0);
        let committer = GroupCommitter::start(
            Recorder::new(Arc::default(), Duration::ZERO),
            committed,
            CommitterSettings::default(),
        );
        let error = committer
            .submit(vec![append("s"), append("s")])
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("twice"), "{error}");
    }
}
