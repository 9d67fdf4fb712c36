//! [`Subscription`]: a stream of deliveries that survives reconnects.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use ringcast_protocol::{WireEvent, WireGap};

use crate::client::Client;
use crate::connection::{take_terminal, Push, TerminalSlot};
use crate::error::Result;
use crate::queue::PushReceiver;

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// An event. Within a subscription, offsets only increase and no event
    /// is delivered twice, across reconnects too.
    Event(WireEvent),
    /// Events the subscription should have seen are no longer available
    /// (trimmed, another epoch, or this consumer fell behind); refetch your
    /// state. Delivery continues live after it.
    Gap(WireGap),
    /// The topic was sealed (or deleted) and everything was delivered;
    /// the subscription is over.
    End {
        /// Topic name.
        topic: String,
        /// The topic's last offset.
        last_offset: u64,
    },
}

/// A live subscription, created by [`Client::subscribe`].
///
/// It is a [`Stream`] of `Result<Delivery>` (also readable with
/// [`next_delivery`](Self::next_delivery)):
/// - `Ok(Delivery::Event | Delivery::Gap)` while it lives;
/// - `Ok(Delivery::End)` when the topic was sealed or deleted, then `None`;
/// - an `Err` is terminal and is followed by `None`: [`Error::Closed`] after
///   [`Client::close`], or [`Error::Server`] when the broker refused to
///   resume it after a reconnect (for instance `TooManySubscriptions`).
///
/// Reconnects are invisible: the subscription resumes exactly after the last
/// event it delivered. A consumer that falls more than
/// [`ClientOptions::subscription_buffer`](crate::ClientOptions::subscription_buffer)
/// deliveries behind is paused and resumed the same way, so it sees a gap
/// only if the broker dropped what it had not read yet. Dropping the
/// subscription unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    client: Client,
    id: u64,
    topic: String,
    epoch: u64,
    next_offset: u64,
    last_offset: Option<u64>,
    rx: PushReceiver,
    terminal: TerminalSlot,
    done: bool,
}

impl Subscription {
    pub(crate) fn new(
        client: Client,
        id: u64,
        topic: String,
        epoch: u64,
        next_offset: u64,
        rx: PushReceiver,
        terminal: TerminalSlot,
    ) -> Self {
        Subscription {
            client,
            id,
            topic,
            epoch,
            next_offset,
            last_offset: None,
            rx,
            terminal,
            done: false,
        }
    }

    /// The client-chosen subscription id (unique per client).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic's epoch: from `Subscribed`, then from each delivery (a gap
    /// with reason `EpochChanged` moves it).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The offset the topic's next event was to get when the subscription
    /// started (from `Subscribed`).
    pub fn start_next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The offset of the last event delivered to the caller (or the offset a
    /// whole-topic gap skipped to); `None` before the first. With
    /// [`epoch`](Self::epoch), what to pass to
    /// [`SubscribeBuilder::after_offset`](crate::SubscribeBuilder::after_offset)
    /// to resume in another process.
    pub fn last_offset(&self) -> Option<u64> {
        self.last_offset
    }

    /// The next delivery, waiting for one; `None` once the subscription is
    /// over (after `End` or a terminal error).
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Ends the subscription, waiting for the broker's confirmation (or the
    /// request timeout). Deliveries already buffered are discarded.
    pub async fn unsubscribe(mut self) -> Result<()> {
        self.done = true;
        self.client.end_subscription(self.id).await
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let push = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(push) => push,
        };
        let delivery = match push {
            Some(Push::Event { epoch, event }) => {
                self.epoch = epoch;
                self.last_offset = Some(event.offset);
                Ok(Delivery::Event(event))
            }
            Some(Push::Gap(gap)) => {
                self.epoch = gap.epoch;
                if gap.event_type.is_none() {
                    self.last_offset = Some(gap.current);
                }
                Ok(Delivery::Gap(gap))
            }
            Some(Push::End { topic, last_offset }) => {
                self.done = true;
                Ok(Delivery::End { topic, last_offset })
            }
            None => {
                self.done = true;
                Err(take_terminal(&self.terminal))
            }
        };
        Poll::Ready(Some(delivery))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Harmless when it already ended: the task ignores unknown ids.
        let _ = self.client.inner().drop_tx.send(self.id);
    }
}
