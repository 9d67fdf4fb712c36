//! The SSE event id of a multi-topic stream (`GET /v1/events`): the
//! position of every topic of the stream, so that `Last-Event-ID` resumes
//! each of them exactly.
//!
//! The id is base64url (no padding) of:
//!
//! | bytes | what |
//! |---|---|
//! | 1 | format, `1` |
//! | 4 | CRC-32 (little-endian) of the stream's selection: each `topic` parameter, then each pattern, `\n`-terminated, in URL order, duplicates dropped |
//! | per named topic, in URL order | varint `offset << 1 \| ended`, then the epoch (8 bytes little-endian) |
//! | per pattern match | varint pattern index (in URL order among the patterns), varint length and the bytes of the name after the pattern's literal prefix, then varint `offset << 1 \| ended` and the epoch as above |
//!
//! Varints are LEB128 (7 bits per byte, low first). The epoch is whole, as
//! in single-topic ids: a topic re-created since is always recognised.
//! Size: 5 bytes, plus 9 to 18 per named topic (offsets below 2^20 take
//! 3 bytes: 11 per topic), plus about 12 and the name's suffix per pattern
//! match; base64 adds a third. 50 named topics with offsets below a million:
//! 555 bytes, an id of 740 characters (compressed streams carry consecutive
//! ids for a few bytes each: they differ in one offset).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::auth::TopicPattern;
use crate::engine::{validate_topic, Position};

/// The format byte of ids this version writes.
const FORMAT: u8 = 1;

/// What a stream reads, as its URL names it.
#[derive(Debug, Clone)]
pub(crate) struct StreamSelection {
    /// Named topics, in URL order, without duplicates.
    pub topics: Vec<String>,
    /// Patterns, in URL order, without duplicates.
    pub patterns: Vec<TopicPattern>,
    /// CRC-32 of the above (see the module docs).
    pub check: u32,
}

impl StreamSelection {
    /// The selection of `topics` and `patterns` (already deduplicated).
    pub(crate) fn new(topics: Vec<String>, patterns: Vec<TopicPattern>) -> Self {
        let mut crc = crc32fast::Hasher::new();
        for t in &topics {
            crc.update(t.as_bytes());
            crc.update(b"\n");
        }
        for p in &patterns {
            crc.update(p.as_str().as_bytes());
            crc.update(b"\n");
        }
        Self {
            topics,
            patterns,
            check: crc.finalize(),
        }
    }
}

/// The literal start of a pattern: every name it matches begins with it.
fn literal_prefix(pattern: &TopicPattern) -> &str {
    let source = pattern.as_str();
    let end = source.find(['*', '?', '{']).unwrap_or(source.len());
    &source[..end]
}

/// One entry of an id: a topic and its position.
pub(crate) struct Entry<'a> {
    /// The topic.
    pub name: &'a str,
    /// The pattern that brought it in (`None`: a named topic).
    pub pattern: Option<usize>,
    /// Where it stands.
    pub position: Position,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_position(out: &mut Vec<u8>, p: Position) {
    put_varint(out, (p.offset << 1) | u64::from(p.ended));
    out.extend_from_slice(&p.epoch.to_le_bytes());
}

/// Encodes an id into `out` (cleared first); `entries` holds every named
/// topic (in selection order) before the pattern matches. `bytes` is scratch
/// space a stream keeps, so that an id per event allocates nothing.
pub(crate) fn encode<'a>(
    selection: &StreamSelection,
    entries: impl IntoIterator<Item = Entry<'a>>,
    bytes: &mut Vec<u8>,
    out: &mut String,
) {
    bytes.clear();
    out.clear();
    bytes.push(FORMAT);
    bytes.extend_from_slice(&selection.check.to_le_bytes());
    for e in entries {
        if let Some(p) = e.pattern {
            let suffix = &e.name[literal_prefix(&selection.patterns[p]).len()..];
            put_varint(bytes, p as u64);
            put_varint(bytes, suffix.len() as u64);
            bytes.extend_from_slice(suffix.as_bytes());
        }
        put_position(bytes, e.position);
    }
    URL_SAFE_NO_PAD.encode_string(&*bytes, out);
}

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IdError {
    /// Not base64url, or cut short, or with bytes left over.
    #[error("the event id is not one of this stream's (malformed)")]
    Malformed,
    /// A format this broker does not read.
    #[error("the event id has format {0}; this broker reads format 1")]
    Format(u8),
    /// Taken from a stream over other topics or patterns.
    #[error("the event id belongs to a stream over other topics or patterns")]
    OtherSelection,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], IdError> {
        if self.0.len() < n {
            return Err(IdError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, IdError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f)
                .checked_shl(shift)
                .ok_or(IdError::Malformed)?;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(IdError::Malformed)
    }

    fn position(&mut self) -> Result<Position, IdError> {
        let v = self.varint()?;
        let epoch = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| IdError::Malformed)?);
        Ok(Position {
            epoch,
            offset: v >> 1,
            ended: v & 1 == 1,
        })
    }
}

/// Decodes an id of a stream over `selection`: the position of every topic
/// it names.
pub(crate) fn decode(
    selection: &StreamSelection,
    id: &str,
) -> Result<HashMap<String, Position>, IdError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(id.trim())
        .map_err(|_| IdError::Malformed)?;
    let mut r = Reader(&bytes);
    let format = r.take(1)?[0];
    if format != FORMAT {
        return Err(IdError::Format(format));
    }
    let check = u32::from_le_bytes(r.take(4)?.try_into().map_err(|_| IdError::Malformed)?);
    if check != selection.check {
        return Err(IdError::OtherSelection);
    }
    let mut positions = HashMap::new();
    for t in &selection.topics {
        positions.insert(t.clone(), r.position()?);
    }
    while !r.0.is_empty() {
        let p = usize::try_from(r.varint()?).map_err(|_| IdError::Malformed)?;
        let pattern = selection.patterns.get(p).ok_or(IdError::Malformed)?;
        let len = usize::try_from(r.varint()?).map_err(|_| IdError::Malformed)?;
        let suffix = std::str::from_utf8(r.take(len)?).map_err(|_| IdError::Malformed)?;
        let name = format!("{}{suffix}", literal_prefix(pattern));
        if validate_topic(&name).is_err() || !pattern.matches(&name) {
            return Err(IdError::Malformed);
        }
        let position = r.position()?;
        if positions.insert(name, position).is_some() {
            return Err(IdError::Malformed);
        }
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn selection(topics: &[&str], patterns: &[&str]) -> StreamSelection {
        StreamSelection::new(
            topics.iter().map(|t| t.to_string()).collect(),
            patterns
                .iter()
                .map(|p| TopicPattern::compile(p, None).unwrap().unwrap())
                .collect(),
        )
    }

    fn position() -> impl Strategy<Value = Position> {
        (any::<u64>(), 0..(1u64 << 62), any::<bool>()).prop_map(|(epoch, offset, ended)| Position {
            epoch,
            offset,
            ended,
        })
    }

    #[test]
    fn fifty_named_topics_fit_the_documented_size() {
        let names: Vec<String> = (0..50).map(|i| format!("division.{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let sel = selection(&refs, &[]);
        let mut id = String::new();
        let entries = names.iter().map(|n| Entry {
            name: n,
            pattern: None,
            position: Position {
                epoch: u64::MAX - 7,
                offset: 999_999,
                ended: false,
            },
        });
        encode(&sel, entries, &mut Vec::new(), &mut id);
        assert_eq!(id.len(), 740);
        assert_eq!(decode(&sel, &id).unwrap().len(), 50);
    }

    #[test]
    fn ids_of_another_selection_or_format_are_refused() {
        let a = selection(&["a", "b"], &["orders.*"]);
        let b = selection(&["b", "a"], &["orders.*"]);
        let mut id = String::new();
        let entries = ["a", "b"].map(|name| Entry {
            name,
            pattern: None,
            position: Position::default(),
        });
        encode(&a, entries, &mut Vec::new(), &mut id);
        assert!(decode(&a, &id).is_ok());
        assert_eq!(decode(&b, &id), Err(IdError::OtherSelection));
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
        bytes[0] = 2;
        assert_eq!(
            decode(&a, &URL_SAFE_NO_PAD.encode(&bytes)),
            Err(IdError::Format(2))
        );
        for bad in ["", "!!", "AQ", "7:12", &id[..id.len() - 2]] {
            assert!(decode(&a, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pattern_entry_must_match_its_pattern() {
        let sel = selection(&[], &["orders.*", "users.*"]);
        let mut id = String::new();
        encode(
            &sel,
            [Entry {
                name: "orders.7",
                pattern: Some(0),
                position: Position::default(),
            }],
            &mut Vec::new(),
            &mut id,
        );
        let positions = decode(&sel, &id).unwrap();
        assert!(positions.contains_key("orders.7"));
        // The same bytes with the pattern index of `users.*`: "users.7"
        // would match, so patch the suffix to a name it cannot take.
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
        bytes[5] = 1;
        bytes[7] = b'!';
        assert_eq!(
            decode(&sel, &URL_SAFE_NO_PAD.encode(&bytes)),
            Err(IdError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn ids_round_trip(
            named in proptest::collection::vec(position(), 3),
            matched in proptest::collection::btree_map("[a-z0-9.]{1,20}", (0usize..2, position()), 0..20),
        ) {
            let sel = selection(&["a", "b", "c"], &["orders.*", "*"]);
            let names = ["a", "b", "c"];
            let matched: Vec<(String, usize, Position)> = matched
                .into_iter()
                .map(|(suffix, (p, pos))| {
                    let name = if p == 0 { format!("orders.{suffix}") } else { format!("x{suffix}") };
                    (name, p, pos)
                })
                .collect();
            let entries = names
                .iter()
                .zip(&named)
                .map(|(n, p)| Entry { name: n, pattern: None, position: *p })
                .chain(matched.iter().map(|(n, p, pos)| Entry { name: n, pattern: Some(*p), position: *pos }));
            let mut id = String::new();
            encode(&sel, entries, &mut Vec::new(), &mut id);
            let positions = decode(&sel, &id).unwrap();
            for (n, p) in names.iter().zip(&named) {
                prop_assert_eq!(positions[*n], *p);
            }
            for (n, _, pos) in &matched {
                prop_assert_eq!(positions[n], *pos);
            }
            prop_assert_eq!(positions.len(), 3 + matched.len());
        }

        #[test]
        fn decoding_never_panics(s in "\\PC{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let sel = selection(&["a"], &["orders.*"]);
            let _ = decode(&sel, &s);
            let _ = decode(&sel, &URL_SAFE_NO_PAD.encode(&bytes));
            let mut framed = vec![FORMAT];
            framed.extend_from_slice(&sel.check.to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode(&sel, &URL_SAFE_NO_PAD.encode(&framed));
        }
    }
}
