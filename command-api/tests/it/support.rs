//! The integration tests' helpers: the write side's harness, shared with `system-tests`.
//! (The saga's scenarios, audited over SPEC §8 with the projector's read models verified, are in
//! `system-tests/tests/write_side`.)

pub use command_api::testing::harness::*;

use std::sync::Arc;

use async_trait::async_trait;
use infra::eventlog::{
    Append, AppendOutcome, EventLog, Lag, LogFilter, LogPosition, RecordedEvent, Snapshot,
    StreamEvent, StreamId, Wakeups,
};
use tokio::sync::oneshot;

/// Says "reached" and waits for "go on".
pub type Gate = tokio::sync::Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>;

/// Holds the caller at `gate` the first time it is passed, until the test lets it go on.
pub async fn pass(gate: &Gate) {
    let gate = gate.lock().await.take();
    if let Some((reached, go_on)) = gate {
        let _ = reached.send(());
        let _ = go_on.await;
    }
}

pub fn gate() -> (Gate, oneshot::Receiver<()>, oneshot::Sender<()>) {
    let (reached, was_reached) = oneshot::channel();
    let (go_on, gone_on) = oneshot::channel();
    (
        tokio::sync::Mutex::new(Some((reached, gone_on))),
        was_reached,
        go_on,
    )
}

/// A log that can hold its first `read_stream` after it read (a load that finishes after
/// others have written), or its first `append` before it is written (an append in flight), and
/// counts the appends it was asked for. It leaves `append_chained` to the trait's default, one
/// `append` per link: what a store that cannot commit two streams together does (KurrentDB),
/// so with no gate set it is that store's chaining over another log.
pub struct Gated {
    pub inner: Arc<dyn EventLog>,
    pub read: Gate,
    pub append: Gate,
    pub appends: std::sync::atomic::AtomicUsize,
}

impl Gated {
    pub fn new(inner: Arc<dyn EventLog>) -> Self {
        Gated {
            inner,
            read: Gate::default(),
            append: Gate::default(),
            appends: Default::default(),
        }
    }
}

#[async_trait]
impl EventLog for Gated {
    async fn append(&self, appends: Vec<Append>) -> infra::Result<Vec<AppendOutcome>> {
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        pass(&self.append).await;
        self.inner.append(appends).await
    }
    async fn read_stream(&self, stream: &StreamId, after: u64) -> infra::Result<Vec<StreamEvent>> {
        let events = self.inner.read_stream(stream, after).await?;
        pass(&self.read).await;
        Ok(events)
    }
    async fn read_stream_recorded(
        &self,
        stream: &StreamId,
        after: u64,
    ) -> infra::Result<Vec<RecordedEvent>> {
        self.inner.read_stream_recorded(stream, after).await
    }
    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: LogFilter,
    ) -> infra::Result<Vec<RecordedEvent>> {
        self.inner.read_all(after, limit, filter).await
    }
    async fn head(&self) -> infra::Result<LogPosition> {
        self.inner.head().await
    }
    async fn lag(&self, checkpoint: LogPosition, filter: LogFilter) -> infra::Result<Lag> {
        self.inner.lag(checkpoint, filter).await
    }
    fn subscribe(&self) -> Wakeups {
        self.inner.subscribe()
    }
    async fn read_snapshot(&self, stream: &StreamId) -> infra::Result<Option<Snapshot>> {
        self.inner.read_snapshot(stream).await
    }
    async fn write_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> infra::Result<()> {
        self.inner.write_snapshot(stream, snapshot).await
    }
    async fn ping(&self) -> bool {
        self.inner.ping().await
    }
}
