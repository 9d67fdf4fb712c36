//! Consumer groups: [`Consumer`], a stream of [`Job`]s to settle, and its
//! options.
//!
//! A membership is shared by its [`Consumer`] and every [`Job`] it handed
//! out (an `Arc`, so that jobs name their membership when settled); it ends
//! — a clean leave, so that whatever it still holds is redelivered at once
//! — when the consumer is dropped or [`Consumer::leave`] is called. Keep
//! the consumer while working on its jobs: once it is gone the broker
//! pushes it nothing more (nothing would read it), and its jobs can no
//! longer be settled.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use ringcast_protocol::{GroupOptions, SettleAction, WireEvent, WireGap};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::connection::{GroupPush, TerminalSlot};
use crate::error::{Error, Result};

/// Deliveries a membership holds unsettled by default
/// ([`ConsumeOptions::max_in_flight`]).
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;

/// How to join a consumer group ([`Client::consume`]).
///
/// The consumer name is required: it is how the group knows this worker
/// across reconnects and restarts. A worker that comes back under the same
/// name shares the pending work of its earlier sessions (and can still settle
/// it), while a random name per process would leave a restarted worker's
/// unsettled events waiting for their `ack_wait`.
///
/// ```
/// use ringcast_client::{ConsumeOptions, GroupOptions};
/// let options = ConsumeOptions::new("billing-1")
///     .max_in_flight(32)
///     .create(GroupOptions { ack_wait_ms: 10_000, ..GroupOptions::default() });
/// assert_eq!(options.consumer, "billing-1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// The member's name (1–255 bytes of `A-Z a-z 0-9 . _ : -`).
    pub consumer: String,
    /// Most deliveries this membership holds unsettled at once (the broker
    /// stops pushing at the limit); 0 = the group's `max_ack_pending`.
    /// Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: u32,
    /// Create the group with these settings when it does not exist (on the
    /// first join and on every re-join after a reconnect); `None` (the
    /// default): it must exist, else `consume` fails with `group_not_found`.
    pub create: Option<GroupOptions>,
}

impl ConsumeOptions {
    /// Options for the member `consumer`, with the defaults.
    pub fn new(consumer: impl Into<String>) -> Self {
        ConsumeOptions {
            consumer: consumer.into(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            create: None,
        }
    }

    /// Sets [`max_in_flight`](Self::max_in_flight).
    pub fn max_in_flight(mut self, max: u32) -> Self {
        self.max_in_flight = max;
        self
    }

    /// Sets [`create`](Self::create).
    pub fn create(mut self, options: GroupOptions) -> Self {
        self.create = Some(options);
        self
    }
}

/// The broker's answer to a settle: how many of the offsets the action
/// applied to, were already done, or were unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Offsets the action applied to.
    pub applied: u64,
    /// Offsets already done for the group (acked, dead-lettered or lost) —
    /// also what a repeated ack counts as.
    pub already_done: u64,
    /// Offsets never handed out, or (for a nack or in-progress) not in
    /// flight any more: redelivered meanwhile, say.
    pub unknown: u64,
}

/// One item of a [`Consumer`].
#[derive(Debug)]
pub enum ConsumerItem {
    /// Work to do, then settle.
    Job(Job),
    /// Work the group lost before it was done: the events from
    /// `requested + 1` to `first_available - 1` fell out of the topic's
    /// retention unprocessed (reason `Retention`). Delivery goes on.
    Gap(WireGap),
}

/// A membership, shared by its consumer and its jobs; dropping the last
/// reference leaves the group.
#[derive(Debug)]
struct Membership {
    client: Client,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Harmless when it already ended: the task ignores unknown ids.
        let _ = self.client.inner().drop_tx.send(self.id);
    }
}

/// A membership in a consumer group, created by [`Client::consume`]: a
/// [`Stream`] of `Result<ConsumerItem>` (also readable with
/// [`next`](Self::next)).
///
/// Each [`Job`] is this member's alone until it is settled or its `ack_wait`
/// runs out; at most [`ConsumeOptions::max_in_flight`] are unsettled at once.
///
/// # Reconnects
/// When the connection drops, the client reconnects and joins again under
/// the same consumer name. Jobs already handed out stay valid and can be
/// settled on the new connection; an ack in flight at the loss is sent again
/// (a repeat counts as `already_done`). Deliveries lost with the connection
/// come again after the group's `ack_wait`, with a higher attempt.
///
/// # Ending
/// An `Err` item is terminal (then `None`): [`Error::Closed`] after
/// [`Client::close`], or [`Error::Server`] when the broker refused to let
/// the membership join again after a reconnect (the group was deleted, say).
/// [`leave`](Self::leave) leaves cleanly and waits for the broker's answer;
/// dropping the consumer leaves too, without waiting. A clean leave
/// redelivers every job not settled at once (the attempt counts), and
/// settling one of them afterwards fails.
#[derive(Debug)]
pub struct Consumer {
    membership: Arc<Membership>,
    topic: String,
    group: String,
    consumer: String,
    epoch: u64,
    rx: mpsc::UnboundedReceiver<GroupPush>,
    terminal: TerminalSlot,
    done: bool,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: Client,
        id: u64,
        topic: String,
        group: String,
        consumer: String,
        epoch: u64,
        rx: mpsc::UnboundedReceiver<GroupPush>,
        terminal: TerminalSlot,
    ) -> Self {
        Consumer {
            membership: Arc::new(Membership { client, id }),
            topic,
            group,
            consumer,
            epoch,
            rx,
            terminal,
            done: false,
        }
    }

    /// The topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This member's consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The topic's epoch when the membership started (from `Joined`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next job or gap, waiting for one; `None` once the consumer is
    /// over (after a terminal error).
    pub async fn next(&mut self) -> Option<Result<ConsumerItem>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Leaves the group cleanly, waiting for the broker's confirmation (or
    /// the request timeout): every job not settled — buffered here or still
    /// held by the caller — is redelivered at once, and settling a job of
    /// this membership afterwards fails with `group_not_found`.
    pub async fn leave(mut self) -> Result<()> {
        self.done = true;
        self.membership
            .client
            .end_subscription(self.membership.id)
            .await
    }

    fn take_terminal(&self) -> Error {
        self.terminal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(Error::Closed)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // A consumer nobody reads must not keep taking work: leave now,
        // whatever jobs are still alive (harmless after `leave`: the task
        // ignores ids it no longer knows).
        let _ = self
            .membership
            .client
            .inner()
            .drop_tx
            .send(self.membership.id);
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumerItem>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let push = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(push) => push,
        };
        let item = match push {
            Some(GroupPush::Job { attempt, event }) => Ok(ConsumerItem::Job(Job {
                membership: Arc::clone(&self.membership),
                attempt,
                event,
            })),
            Some(GroupPush::Gap(gap)) => Ok(ConsumerItem::Gap(gap)),
            None => {
                self.done = true;
                Err(self.take_terminal())
            }
        };
        Poll::Ready(Some(item))
    }
}

/// One delivery of a consumer group: the event, which attempt this is, and
/// the ways to settle it.
///
/// Settling is by offset and idempotent: [`ack`](Self::ack) twice counts
/// the second as `already_done`. A job dropped without being settled is
/// redelivered (attempt + 1) when the group's `ack_wait` runs out, or at
/// once when its membership ends cleanly (its [`Consumer`] dropped, or
/// [`Consumer::leave`]). A job can be settled after the connection that
/// delivered it dropped (the settle goes over the new one), but not after
/// its consumer is gone.
#[derive(Debug)]
pub struct Job {
    membership: Arc<Membership>,
    attempt: u32,
    event: WireEvent,
}

impl Job {
    /// The event (the same type subscriptions yield).
    pub fn event(&self) -> &WireEvent {
        &self.event
    }

    /// The event's offset in its topic: what settling names.
    pub fn offset(&self) -> u64 {
        self.event.offset
    }

    /// 1 for the first delivery, +1 per redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Done: never delivered again. Sent again on the next connection if
    /// this one drops before the answer.
    pub async fn ack(&self) -> Result<Settled> {
        self.settle(SettleAction::Ack).await
    }

    /// Failed: redeliver after `delay` (`None`: the group's backoff for this
    /// attempt); after `max_deliver` attempts it is dead-lettered instead.
    /// Not sent again if the connection drops before the answer (a repeat
    /// could nack another member's redelivery): it then fails with
    /// [`Error::ConnectionLost`], and the job comes back after `ack_wait`.
    /// The same holds for [`in_progress`](Self::in_progress) and
    /// [`term`](Self::term).
    pub async fn nack(&self, delay: Option<Duration>) -> Result<Settled> {
        let delay = delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.settle(SettleAction::Nack(delay)).await
    }

    /// Still working: the deadline moves a whole `ack_wait` on from now.
    pub async fn in_progress(&self) -> Result<Settled> {
        self.settle(SettleAction::InProgress).await
    }

    /// Gives up now: the event is appended to the group's dead-letter topic
    /// with `reason` (cut to the broker's limit; empty reads `terminated`).
    pub async fn term(&self, reason: impl Into<String>) -> Result<Settled> {
        self.settle(SettleAction::Term(reason.into())).await
    }

    async fn settle(&self, action: SettleAction) -> Result<Settled> {
        self.membership
            .client
            .settle(self.membership.id, vec![self.event.offset], action)
            .await
    }
}
