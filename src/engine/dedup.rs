//! Publish guarantees, the decision part (issue 11, not wired in yet — see
//! `docs/publish-guarantees-plan.md`): which events of an append are
//! repeats of an idempotency key inside the topic's dedup window, and
//! whether the append's expected position holds. Pure: a backend calls
//! [`decide`] on its staged state inside `persist`, so the check is atomic
//! with position assignment.
#![allow(dead_code)] // Wired in by the rest of issue 11.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Longest idempotency key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 128;

/// What an append expects of the topic before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Expect {
    /// The topic's last offset must be this (0 = no event ever).
    pub offset: Option<u64>,
    /// The last version of the first event's type must be this (0 = none).
    pub version: Option<u64>,
}

/// Where a keyed event landed, as the dedup index remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Original {
    /// Its offset.
    pub offset: u64,
    /// Its version.
    pub version: u64,
    /// When it was appended (the window counts from here).
    pub at_ms: u64,
}

/// The keys of one topic incarnation seen within its window.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    entries: HashMap<Arc<str>, Original>,
    /// Keys in append order (= time order), for expiry.
    order: VecDeque<Arc<str>>,
}

impl Window {
    /// The original of `key`, if seen less than `window_ms` before `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64, window_ms: u64) -> Option<Original> {
        self.entries
            .get(key)
            .copied()
            .filter(|o| now_ms.saturating_sub(o.at_ms) < window_ms)
    }

    /// Remembers `key` (a new append).
    pub fn insert(&mut self, key: Arc<str>, original: Original) {
        if self.entries.insert(key.clone(), original).is_none() {
            self.order.push_back(key);
        }
    }

    /// Forgets keys older than the window; returns how many.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64) -> usize {
        let mut gone = 0;
        while let Some(key) = self.order.front() {
            let old = self
                .entries
                .get(key)
                .is_none_or(|o| now_ms.saturating_sub(o.at_ms) >= window_ms);
            if !old {
                break;
            }
            if let Some(key) = self.order.pop_front() {
                self.entries.remove(&key);
                gone += 1;
            }
        }
        gone
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Why an append is refused before anything is assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// The expected position does not hold; the current values, so the
    /// caller can reload and retry.
    PositionMismatch {
        /// The topic's last offset now.
        current_offset: u64,
        /// The last version of the batch's first type now.
        current_version: u64,
    },
    /// One batch names the same key twice.
    RepeatedKey(String),
    /// A key is empty or longer than [`MAX_KEY_LEN`].
    BadKey(usize),
}

/// What to do with an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Every event repeats a key: answer with the originals, store nothing.
    AllDuplicates(Vec<Original>),
    /// Append the events at `fresh` (indices, in order); answer the others
    /// with their originals.
    Append {
        /// Indices of the events to append.
        fresh: Vec<usize>,
        /// `(index, original)` of the repeats.
        repeats: Vec<(usize, Original)>,
    },
}

/// Decides an append of events whose keys are `keys` (one per event)
/// against `window`, and checks `expect` against `last_offset` and
/// `last_version` (of the first event's type) unless every event is a
/// repeat — the retry of a stored batch must succeed although the position
/// has moved since.
pub(crate) fn decide(
    window: &Window,
    keys: &[Option<&str>],
    expect: Expect,
    last_offset: u64,
    last_version: u64,
    now_ms: u64,
    window_ms: u64,
) -> Result<Decision, Conflict> {
    let mut seen = HashSet::new();
    let mut fresh = Vec::with_capacity(keys.len());
    let mut repeats = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let Some(key) = key else {
            fresh.push(i);
            continue;
        };
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Conflict::BadKey(key.len()));
        }
        if !seen.insert(*key) {
            return Err(Conflict::RepeatedKey((*key).to_owned()));
        }
        match window.get(key, now_ms, window_ms) {
            Some(original) => repeats.push((i, original)),
            None => fresh.push(i),
        }
    }
    if fresh.is_empty() && !repeats.is_empty() {
        return Ok(Decision::AllDuplicates(
            repeats.into_iter().map(|(_, o)| o).collect(),
        ));
    }
    let offset_ok = expect.offset.is_none_or(|o| o == last_offset);
    let version_ok = expect.version.is_none_or(|v| v == last_version);
    if !(offset_ok && version_ok) {
        return Err(Conflict::PositionMismatch {
            current_offset: last_offset,
            current_version: last_version,
        });
    }
    Ok(Decision::Append { fresh, repeats })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 120_000;

    fn original(offset: u64, at_ms: u64) -> Original {
        Original {
            offset,
            version: offset,
            at_ms,
        }
    }

    #[test]
    fn a_repeated_key_inside_the_window_returns_the_original() {
        let mut w = Window::default();
        w.insert("k1".into(), original(7, 1_000));
        let d = decide(&w, &[Some("k1")], Expect::default(), 9, 9, 2_000, WINDOW).unwrap();
        assert_eq!(d, Decision::AllDuplicates(vec![original(7, 1_000)]));
        // Past the window the key is new again.
        let d = decide(
            &w,
            &[Some("k1")],
            Expect::default(),
            9,
            9,
            1_000 + WINDOW,
            WINDOW,
        )
        .unwrap();
        assert_eq!(
            d,
            Decision::Append {
                fresh: vec![0],
                repeats: vec![]
            }
        );
    }

    #[test]
    fn the_retry_of_a_stored_batch_succeeds_although_its_expectation_moved() {
        let mut w = Window::default();
        w.insert("a".into(), original(1, 0));
        w.insert("b".into(), original(2, 0));
        let expect = Expect {
            offset: Some(0),
            version: None,
        };
        let d = decide(&w, &[Some("a"), Some("b")], expect, 2, 2, 10, WINDOW).unwrap();
        assert!(matches!(d, Decision::AllDuplicates(o) if o.len() == 2));
    }

    #[test]
    fn a_wrong_expectation_is_a_mismatch_with_the_current_values() {
        let w = Window::default();
        let expect = Expect {
            offset: Some(4),
            version: Some(1),
        };
        assert_eq!(
            decide(&w, &[None], expect, 5, 1, 0, WINDOW),
            Err(Conflict::PositionMismatch {
                current_offset: 5,
                current_version: 1
            })
        );
        assert!(decide(
            &w,
            &[None],
            Expect {
                offset: Some(5),
                version: Some(1)
            },
            5,
            1,
            0,
            WINDOW
        )
        .is_ok());
        // 0 = the topic must be new.
        assert!(decide(
            &w,
            &[None],
            Expect {
                offset: Some(0),
                version: None
            },
            0,
            0,
            0,
            WINDOW
        )
        .is_ok());
    }

    #[test]
    fn bad_and_repeated_keys_refuse_the_whole_batch() {
        let w = Window::default();
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            decide(&w, &[Some(&long)], Expect::default(), 0, 0, 0, WINDOW),
            Err(Conflict::BadKey(MAX_KEY_LEN + 1))
        );
        assert_eq!(
            decide(
                &w,
                &[Some("k"), None, Some("k")],
                Expect::default(),
                0,
                0,
                0,
                WINDOW
            ),
            Err(Conflict::RepeatedKey("k".into()))
        );
    }

    #[test]
    fn expiry_forgets_keys_in_time_order_and_only_old_ones() {
        let mut w = Window::default();
        for (i, at) in [0_u64, 10, 20].into_iter().enumerate() {
            w.insert(format!("k{i}").into(), original(i as u64 + 1, at));
        }
        assert_eq!(w.expire(WINDOW + 15, WINDOW), 2);
        assert_eq!(w.len(), 1);
        assert!(w.get("k2", WINDOW + 15, WINDOW).is_some());
    }
}
