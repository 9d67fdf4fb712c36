//! Where a subscription stands, so that it can be resumed on a new connection
//! without a duplicate or a hole.
//!
//! Pure bookkeeping, no I/O: the connection task feeds it what the broker
//! says (`Subscribed`, each event and gap handed to the caller) and asks it
//! for the `Start` of the next `Subscribe`.
//!
//! The position is `(epoch, offset)`: every event of that epoch up to
//! `offset` was handed to the caller or reported lost by a gap. Once known,
//! a resume is `AfterOffset { epoch, offset }`, exact for every start kind.
//! Before it is known the original start is replayed:
//! - `Live`: the position is known from the first `Subscribed`
//!   (`next_offset - 1`), so events published while disconnected are not lost.
//! - `AfterOffset`: the position is the start itself.
//! - `Earliest`: until the first event, resuming is `Earliest` again.
//! - `AfterVersions`: once an event was delivered, resuming is
//!   `AfterOffset { epoch, last delivered }` plus a client-side replay filter:
//!   below the `next_offset` announced by the first `Subscribed` (the start
//!   of live), only events of the named types above their versions pass, as
//!   the broker's own replay does. Limitation: a connection lost before the
//!   first event of such a subscription is delivered resumes with
//!   `AfterVersions` again, so events of *unnamed* types published in
//!   between start live on the new connection instead of being replayed.

use ringcast_protocol::{Start, WireEvent, WireGap};

/// What handing one push to the caller changes in the [`Resume`] state;
/// computed when the push is routed, applied once it is in the caller's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// An event at this offset was delivered.
    Offset(u64),
    /// An event was delivered during an `AfterVersions` replay.
    Version {
        offset: u64,
        event_type: String,
        version: u64,
    },
    /// A gap was delivered.
    Gap {
        epoch: u64,
        event_type: Option<String>,
        current: u64,
    },
}

/// Resume bookkeeping of one subscription.
#[derive(Debug, Clone)]
pub(crate) struct Resume {
    /// The original start (for `AfterVersions`, with the versions delivered
    /// since), used until `position` is known.
    start: Start,
    /// `(epoch, offset)` accounted for so far.
    position: Option<(u64, u64)>,
    /// Epoch of the events arriving now (from `Subscribed`, then gaps).
    stream_epoch: Option<u64>,
    /// For an `AfterVersions` start: the broker replays offsets below this.
    live_from: Option<u64>,
}

impl Resume {
    /// Whether `event` is one an `AfterVersions` replay excludes: below the
    /// start of live and not a named type above its version. Only checked
    /// once resuming by offset, when the broker no longer filters for us.
    fn replay_excludes(&self, event: &WireEvent) -> bool {
        let (Some(live_from), Start::AfterVersions { versions, .. }) =
            (self.live_from, &self.start)
        else {
            return false;
        };
        if event.offset >= live_from {
            return false;
        }
        match versions.iter().find(|(t, _)| *t == event.event_type) {
            Some((_, v)) => event.version <= *v,
            None => true,
        }
    }
}

impl Resume {
    pub(crate) fn new(start: Start) -> Self {
        let position = match start {
            Start::AfterOffset { epoch, offset } => Some((epoch, offset)),
            _ => None,
        };
        Resume {
            start,
            position,
            stream_epoch: None,
            live_from: None,
        }
    }

    /// The start for the next `Subscribe`.
    pub(crate) fn start(&self) -> Start {
        match self.position {
            Some((epoch, offset)) => Start::AfterOffset { epoch, offset },
            None => self.start.clone(),
        }
    }

    /// The epoch of the events arriving now, once a `Subscribed` was seen.
    pub(crate) fn epoch(&self) -> Option<u64> {
        self.stream_epoch
    }

    /// The broker confirmed a `Subscribe` sent with [`start`](Self::start).
    pub(crate) fn on_subscribed(&mut self, epoch: u64, next_offset: u64) {
        self.stream_epoch = Some(epoch);
        if self.position.is_some() {
            // Resumed with AfterOffset: a gap follows if `epoch` differs.
            return;
        }
        match self.start {
            Start::Live => self.position = Some((epoch, next_offset.saturating_sub(1))),
            Start::AfterVersions { .. } => self.live_from = Some(next_offset),
            Start::Earliest | Start::AfterOffset { .. } => {}
        }
    }

    /// What delivering `event` changes, or `None` if it is a duplicate of
    /// something already delivered (to be dropped).
    pub(crate) fn effect_of_event(&self, event: &WireEvent) -> Option<Effect> {
        if let (Some((epoch, offset)), Some(stream)) = (self.position, self.stream_epoch) {
            if epoch == stream && event.offset <= offset {
                return None;
            }
        }
        if matches!(self.start, Start::AfterVersions { .. }) {
            if self.position.is_some() && self.replay_excludes(event) {
                return None;
            }
            let replaying = self
                .live_from
                .is_none_or(|live_from| event.offset < live_from);
            if replaying {
                return Some(Effect::Version {
                    offset: event.offset,
                    event_type: event.event_type.clone(),
                    version: event.version,
                });
            }
        }
        Some(Effect::Offset(event.offset))
    }

    /// What delivering `gap` changes.
    pub(crate) fn effect_of_gap(gap: &WireGap) -> Effect {
        Effect::Gap {
            epoch: gap.epoch,
            event_type: gap.event_type.clone(),
            current: gap.current,
        }
    }

    /// Records that a push with this effect reached the caller's queue.
    pub(crate) fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Offset(offset) => {
                if let Some(epoch) = self.stream_epoch {
                    self.position = Some((epoch, offset));
                }
            }
            Effect::Version {
                offset,
                event_type,
                version,
            } => {
                let Some(epoch) = self.stream_epoch else {
                    return;
                };
                if let Start::AfterVersions { versions, .. } = &mut self.start {
                    set_version(versions, event_type, version);
                }
                self.position = Some((epoch, offset));
            }
            Effect::Gap {
                epoch,
                event_type: None,
                current,
            } => {
                // The broker continues live after `current`.
                self.stream_epoch = Some(epoch);
                self.position = Some((epoch, current));
            }
            Effect::Gap {
                epoch,
                event_type: Some(event_type),
                current,
            } => {
                // A per-type gap of an AfterVersions start: that type now
                // continues live after `current`.
                self.stream_epoch = Some(epoch);
                if let Start::AfterVersions { epoch: e, versions } = &mut self.start {
                    *e = epoch;
                    set_version(versions, event_type, current);
                }
            }
        }
    }
}

fn set_version(versions: &mut Vec<(String, u64)>, event_type: String, version: u64) {
    match versions.iter_mut().find(|(t, _)| *t == event_type) {
        Some((_, v)) => *v = (*v).max(version),
        None => versions.push((event_type, version)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ringcast_protocol::GapReason;

    fn event(offset: u64, event_type: &str, version: u64) -> WireEvent {
        WireEvent {
            topic: "t".into(),
            offset,
            event_type: event_type.into(),
            version,
            timestamp_ms: 0,
            headers: vec![],
            payload: Bytes::new(),
        }
    }

    fn deliver(resume: &mut Resume, e: &WireEvent) -> bool {
        match resume.effect_of_event(e) {
            Some(effect) => {
                resume.apply(effect);
                true
            }
            None => false,
        }
    }

    fn gap(epoch: u64, event_type: Option<&str>, current: u64) -> WireGap {
        WireGap {
            topic: "t".into(),
            event_type: event_type.map(Into::into),
            reason: GapReason::Retention,
            epoch,
            requested: 0,
            first_available: 0,
            current,
        }
    }

    #[test]
    fn live_resumes_after_the_offset_announced_by_subscribed() {
        let mut r = Resume::new(Start::Live);
        assert_eq!(r.start(), Start::Live);
        r.on_subscribed(9, 41);
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 9,
                offset: 40
            }
        );
    }

    #[test]
    fn resumes_after_the_last_delivered_offset() {
        let mut r = Resume::new(Start::Earliest);
        r.on_subscribed(9, 100);
        assert_eq!(r.start(), Start::Earliest, "nothing delivered yet");
        assert!(deliver(&mut r, &event(5, "a", 1)));
        assert!(deliver(&mut r, &event(6, "a", 2)));
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 9,
                offset: 6
            }
        );
    }

    #[test]
    fn events_at_or_below_the_position_are_dropped_as_duplicates() {
        let mut r = Resume::new(Start::AfterOffset {
            epoch: 9,
            offset: 3,
        });
        r.on_subscribed(9, 10);
        assert!(!deliver(&mut r, &event(3, "a", 3)));
        assert!(deliver(&mut r, &event(4, "a", 4)));
        assert!(!deliver(&mut r, &event(4, "a", 4)));
        assert!(deliver(&mut r, &event(5, "a", 5)));
    }

    #[test]
    fn a_new_epoch_after_a_gap_resets_the_duplicate_check() {
        let mut r = Resume::new(Start::AfterOffset {
            epoch: 1,
            offset: 50,
        });
        r.on_subscribed(2, 4);
        r.apply(Resume::effect_of_gap(&gap(2, None, 3)));
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 2,
                offset: 3
            }
        );
        assert!(deliver(&mut r, &event(4, "a", 1)));
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 2,
                offset: 4
            }
        );
    }

    #[test]
    fn a_whole_topic_gap_moves_the_position_to_its_current_offset() {
        let mut r = Resume::new(Start::AfterOffset {
            epoch: 1,
            offset: 2,
        });
        r.on_subscribed(1, 101);
        r.apply(Resume::effect_of_gap(&gap(1, None, 100)));
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 1,
                offset: 100
            }
        );
    }

    #[test]
    fn after_versions_replay_resumes_by_offset_and_filters_the_replay_itself() {
        let mut r = Resume::new(Start::AfterVersions {
            epoch: 9,
            versions: vec![("a".into(), 2), ("b".into(), 7)],
        });
        // Before anything is delivered, the original start is repeated.
        assert!(matches!(r.start(), Start::AfterVersions { .. }));
        r.on_subscribed(9, 20);
        assert!(deliver(&mut r, &event(10, "a", 3)));
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 9,
                offset: 10
            }
        );
        // Resumed by offset, the broker sends everything after 10: below
        // live (20) only named types above their versions pass.
        r.on_subscribed(9, 25);
        assert!(
            !deliver(&mut r, &event(11, "c", 1)),
            "unnamed type in the replay range"
        );
        assert!(!deliver(&mut r, &event(12, "b", 7)), "b 7 was already had");
        assert!(deliver(&mut r, &event(13, "b", 8)));
        assert!(deliver(&mut r, &event(20, "c", 2)), "live: every type");
        assert_eq!(
            r.start(),
            Start::AfterOffset {
                epoch: 9,
                offset: 20
            }
        );
    }

    #[test]
    fn a_per_type_gap_bumps_that_types_version() {
        let mut r = Resume::new(Start::AfterVersions {
            epoch: 9,
            versions: vec![("a".into(), 2)],
        });
        r.on_subscribed(9, 20);
        r.apply(Resume::effect_of_gap(&gap(9, Some("a"), 12)));
        // Nothing delivered yet: the versions start is repeated, a bumped.
        assert_eq!(
            r.start(),
            Start::AfterVersions {
                epoch: 9,
                versions: vec![("a".into(), 12)]
            }
        );
    }
}
