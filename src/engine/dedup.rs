//! Publish guarantees, the part every backend shares: which events of an
//! append repeat an idempotency key inside the topic's dedup window, whether
//! the append's expected position holds, and the assignment of positions to
//! the rest. A backend calls [`append`] on its own counters and key index
//! inside `persist`, so both checks are atomic with position assignment.

use std::collections::VecDeque;
use std::sync::Arc;

use super::event::{Event, NewEvent};
use super::log::{Counters, FastMap};

/// Longest idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// What an append expects of its topic, checked atomically with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// The topic's last offset must be this (0 = no event was ever stored).
    pub offset: Option<u64>,
    /// The last version of the batch's event type must be this (0 = none yet).
    pub version: Option<u64>,
}

impl Expected {
    /// Whether anything is expected at all.
    pub fn is_none(&self) -> bool {
        self.offset.is_none() && self.version.is_none()
    }
}

/// Where a keyed event landed, as a key index remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Original {
    /// Its offset.
    pub offset: u64,
    /// Its version.
    pub version: u64,
    /// When it was appended (the window counts from here).
    pub at_ms: u64,
}

/// The keys of one topic incarnation appended within its window, oldest
/// first. Expiry is by age only: [`Window::get`] ignores older entries even
/// before [`Window::expire`] has dropped them.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    entries: FastMap<Arc<str>, Original>,
    /// Every insert in append order (= time order), for expiry and
    /// iteration; an item whose key was inserted again since (after it
    /// expired) is stale: `entries` holds the newer original.
    order: VecDeque<(Arc<str>, Original)>,
}

impl Window {
    /// The original of `key`, if appended less than `window_ms` before `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64, window_ms: u64) -> Option<Original> {
        self.entries
            .get(key)
            .copied()
            .filter(|o| now_ms.saturating_sub(o.at_ms) < window_ms)
    }

    /// Remembers `key` for a new append (replacing an expired original).
    pub fn insert(&mut self, key: Arc<str>, original: Original) {
        self.entries.insert(key.clone(), original);
        self.order.push_back((key, original));
    }

    /// Forgets keys older than the window; returns how many.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64) -> usize {
        let mut gone = 0;
        while let Some((key, original)) = self.order.front() {
            if now_ms.saturating_sub(original.at_ms) < window_ms {
                break;
            }
            if self.entries.get(key) == Some(original) {
                self.entries.remove(key);
                gone += 1;
            }
            self.order.pop_front();
        }
        gone
    }

    /// Keys remembered, in append order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Original)> {
        self.order
            .iter()
            .filter(|(key, original)| self.entries.get(key) == Some(original))
            .map(|(key, original)| (key, original))
    }

    /// Keys remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is remembered.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Why an append was refused before anything was assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// The topic's last offset now.
    pub current_offset: u64,
    /// The last version of the batch's type now.
    pub current_version: u64,
}

/// What an append came to in a backend.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The new events with their positions, to store and commit.
    pub events: Vec<Arc<Event>>,
    /// `(index in the request, original)` of the events that repeated a key.
    pub repeats: Vec<(usize, Original)>,
    /// The keys of the new events, for the backend's index.
    pub keyed: Vec<(Arc<str>, Original)>,
}

/// Decides and assigns an append of `events` stamped `now_ms`: events whose
/// key `lookup` knows are repeats (answered with their originals, stored
/// never); if every event is a repeat the batch is a retry of a stored one
/// and `expect` is not checked (the position has moved since, by the batch
/// itself). Otherwise `expect` must hold against `counters` before the
/// batch, and the rest get positions. `window_ms == 0` ignores keys. The
/// engine validated keys (length, no repeat within the batch) beforehand.
pub(crate) fn append(
    counters: &mut Counters,
    events: &mut Vec<NewEvent>,
    expect: Expected,
    window_ms: u64,
    now_ms: u64,
    lookup: impl Fn(&str) -> Option<Original>,
) -> Result<Applied, Mismatch> {
    let keyed = window_ms > 0 && events.iter().any(|e| e.idempotency_key.is_some());
    let mut repeats = Vec::new();
    if keyed {
        for (i, e) in events.iter().enumerate() {
            if let Some(original) = e.idempotency_key.as_deref().and_then(&lookup) {
                repeats.push((i, original));
            }
        }
        if repeats.len() == events.len() {
            events.clear();
            return Ok(Applied {
                repeats,
                ..Applied::default()
            });
        }
    }
    if !expect.is_none() {
        let current_offset = counters.next_offset.saturating_sub(1);
        let current_version = events
            .first()
            .and_then(|e| counters.versions.get(e.event_type.as_str()))
            .copied()
            .unwrap_or(0);
        let offset_ok = expect.offset.is_none_or(|o| o == current_offset);
        let version_ok = expect.version.is_none_or(|v| v == current_version);
        if !(offset_ok && version_ok) {
            return Err(Mismatch {
                current_offset,
                current_version,
            });
        }
    }
    if !keyed {
        return Ok(Applied {
            events: counters.assign(events, now_ms),
            ..Applied::default()
        });
    }
    let mut fresh: Vec<NewEvent> = Vec::with_capacity(events.len() - repeats.len());
    let mut next_repeat = repeats.iter().map(|(i, _)| *i).peekable();
    for (i, e) in events.drain(..).enumerate() {
        if next_repeat.peek() == Some(&i) {
            next_repeat.next();
        } else {
            fresh.push(e);
        }
    }
    let keys: Vec<Option<Arc<str>>> = fresh
        .iter_mut()
        .map(|e| e.idempotency_key.take().map(Arc::from))
        .collect();
    let assigned = counters.assign(&mut fresh, now_ms);
    let keyed = keys
        .into_iter()
        .zip(&assigned)
        .filter_map(|(k, e)| {
            let original = Original {
                offset: e.offset,
                version: e.version,
                at_ms: now_ms,
            };
            Some((k?, original))
        })
        .collect();
    Ok(Applied {
        events: assigned,
        repeats,
        keyed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 120_000;

    fn keyed(t: &str, key: Option<&str>) -> NewEvent {
        let mut e = NewEvent::new(t, "x");
        e.idempotency_key = key.map(str::to_owned);
        e
    }

    fn original(offset: u64, at_ms: u64) -> Original {
        Original {
            offset,
            version: offset,
            at_ms,
        }
    }

    fn offsets(a: &Applied) -> Vec<u64> {
        a.events.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn a_repeated_key_inside_the_window_returns_the_original_and_assigns_nothing() {
        let mut w = Window::default();
        w.insert("k1".into(), original(7, 1_000));
        let mut counters = Counters::from_parts(10, &[("t".into(), 9)]);
        let w = &w;
        let lookup = |now| move |k: &str| w.get(k, now, WINDOW);
        let mut events = vec![keyed("t", Some("k1"))];
        let a = append(
            &mut counters,
            &mut events,
            Expected::default(),
            WINDOW,
            2_000,
            lookup(2_000),
        )
        .unwrap();
        assert!(a.events.is_empty());
        assert_eq!(a.repeats, vec![(0, original(7, 1_000))]);
        assert_eq!(counters.next_offset, 10);
        // Past the window the key is new again.
        let mut events = vec![keyed("t", Some("k1"))];
        let now = 1_000 + WINDOW;
        let a = append(
            &mut counters,
            &mut events,
            Expected::default(),
            WINDOW,
            now,
            lookup(now),
        )
        .unwrap();
        assert_eq!(offsets(&a), vec![10]);
        assert_eq!(a.keyed[0].0.as_ref(), "k1");
        assert_eq!(a.keyed[0].1.offset, 10);
    }

    #[test]
    fn a_partly_repeated_batch_appends_the_rest_contiguously() {
        let mut w = Window::default();
        w.insert("b".into(), original(3, 0));
        let mut counters = Counters::from_parts(4, &[]);
        let mut events = vec![
            keyed("t", Some("a")),
            keyed("t", Some("b")),
            keyed("t", None),
        ];
        let a = append(
            &mut counters,
            &mut events,
            Expected::default(),
            WINDOW,
            5,
            |k| w.get(k, 5, WINDOW),
        )
        .unwrap();
        assert_eq!(offsets(&a), vec![4, 5]);
        assert_eq!(a.repeats, vec![(1, original(3, 0))]);
        assert_eq!(a.keyed.len(), 1, "only keyed events are remembered");
    }

    #[test]
    fn the_retry_of_a_stored_batch_succeeds_although_its_expectation_moved() {
        let mut w = Window::default();
        w.insert("a".into(), original(1, 0));
        w.insert("b".into(), original(2, 0));
        let mut counters = Counters::from_parts(3, &[("t".into(), 2)]);
        let expect = Expected {
            offset: Some(0),
            version: None,
        };
        let mut events = vec![keyed("t", Some("a")), keyed("t", Some("b"))];
        let a = append(&mut counters, &mut events, expect, WINDOW, 10, |k| {
            w.get(k, 10, WINDOW)
        })
        .unwrap();
        assert_eq!(a.repeats.len(), 2);
        assert!(a.events.is_empty());
    }

    #[test]
    fn a_wrong_expectation_is_a_mismatch_with_the_current_values() {
        let none = |_: &str| None;
        let mut counters = Counters::from_parts(6, &[("t".into(), 1)]);
        let expect = |offset, version| Expected { offset, version };
        let mut events = vec![keyed("t", None)];
        assert_eq!(
            append(
                &mut counters,
                &mut events,
                expect(Some(4), Some(1)),
                WINDOW,
                0,
                none
            )
            .unwrap_err(),
            Mismatch {
                current_offset: 5,
                current_version: 1
            }
        );
        assert_eq!(events.len(), 1, "a refused batch keeps its events");
        assert_eq!(counters.next_offset, 6);
        let a = append(
            &mut counters,
            &mut events,
            expect(Some(5), Some(1)),
            WINDOW,
            0,
            none,
        )
        .unwrap();
        assert_eq!(offsets(&a), vec![6]);
        // 0 = the topic (or the type) must be new.
        let mut fresh = Counters::new();
        let mut events = vec![keyed("t", None)];
        assert!(append(
            &mut fresh,
            &mut events,
            expect(Some(0), Some(0)),
            WINDOW,
            0,
            none
        )
        .is_ok());
    }

    #[test]
    fn a_zero_window_ignores_keys() {
        let mut w = Window::default();
        w.insert("k".into(), original(1, 0));
        let mut counters = Counters::from_parts(2, &[]);
        let mut events = vec![keyed("t", Some("k"))];
        let a = append(&mut counters, &mut events, Expected::default(), 0, 0, |k| {
            w.get(k, 0, u64::MAX)
        })
        .unwrap();
        assert_eq!(offsets(&a), vec![2]);
        assert!(a.keyed.is_empty());
    }

    #[test]
    fn expiry_forgets_keys_in_time_order_and_only_old_ones() {
        let mut w = Window::default();
        for (i, at) in [0_u64, 10, 20].into_iter().enumerate() {
            w.insert(format!("k{i}").into(), original(i as u64 + 1, at));
        }
        assert_eq!(w.expire(WINDOW + 15, WINDOW), 2);
        assert!(!w.is_empty());
        assert_eq!(w.len(), 1);
        assert!(w.get("k2", WINDOW + 15, WINDOW).is_some());
        // A key re-used after its window is remembered once, at its new place.
        w.insert("k2".into(), original(9, WINDOW + 30));
        assert_eq!(w.iter().count(), 1);
        assert_eq!(w.expire(2 * WINDOW + 29, WINDOW), 0);
    }
}
