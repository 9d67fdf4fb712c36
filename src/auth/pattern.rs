//! Topic patterns in grants: `orders.*`, `division-?`, `user:{sub}`, `*`.
//!
//! Syntax (documented in the README, "Security"):
//! - topic characters (`A-Z a-z 0-9 . _ : -`) match themselves;
//! - `*` matches any run of topic characters, `.` included, the empty run too
//!   (`orders.*` matches `orders.` and `orders.eu.1`, not `orders`);
//! - `?` matches exactly one topic character;
//! - `{sub}` is replaced by the credential's subject, taken literally: a
//!   subject holding `*` or `?` matches only those characters, and one
//!   holding characters a topic cannot have makes the pattern match nothing.
//!   A credential without a subject has no `{sub}` patterns.

use std::fmt;

/// One compiled pattern, `{sub}` already substituted.
#[derive(Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(u8),
    One,
    Any,
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("a topic pattern must not be empty")]
    Empty,
    /// The pattern has a character no topic name can have.
    #[error("{pattern:?}: {bad:?} can never match a topic name (allowed: A-Z a-z 0-9 . _ : -, the wildcards * ?, and {{sub}})")]
    BadChar {
        /// The pattern as written.
        pattern: String,
        /// The offending character.
        bad: char,
    },
    /// The pattern is longer than any topic name could need.
    #[error("a topic pattern may have at most 512 bytes")]
    TooLong,
}

const SUB: &str = "{sub}";

impl TopicPattern {
    /// Checks a pattern's syntax without a subject (for config validation).
    pub fn check(pattern: &str) -> Result<(), PatternError> {
        Self::compile(pattern, Some("x")).map(|_| ())
    }

    /// Compiles `pattern` for a credential whose subject is `subject`.
    /// `Ok(None)` when the pattern names `{sub}` and there is no usable
    /// subject: such a pattern grants nothing.
    pub fn compile(pattern: &str, subject: Option<&str>) -> Result<Option<Self>, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern.len() > 512 {
            return Err(PatternError::TooLong);
        }
        let mut parts = Vec::with_capacity(pattern.len());
        let mut rest = pattern;
        let mut usable = true;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix(SUB) {
                match subject {
                    Some(s) if !s.is_empty() && s.chars().all(crate::engine::is_topic_char) => {
                        parts.extend(s.bytes().map(Part::Literal));
                    }
                    _ => usable = false,
                }
                rest = after;
                continue;
            }
            let c = rest.chars().next().unwrap_or('*');
            parts.push(match c {
                '*' => Part::Any,
                '?' => Part::One,
                // Topic characters are ASCII.
                c if crate::engine::is_topic_char(c) => Part::Literal(c as u8),
                bad => {
                    return Err(PatternError::BadChar {
                        pattern: pattern.to_owned(),
                        bad,
                    })
                }
            });
            rest = &rest[c.len_utf8()..];
        }
        Ok(usable.then(|| Self {
            source: pattern.to_owned(),
            parts,
        }))
    }

    /// Whether `topic` matches. Allocation-free: patterns hold only
    /// ASCII (topic characters and wildcards), so a byte walk suffices; a
    /// non-ASCII byte in `topic` matches no literal.
    pub fn matches(&self, topic: &str) -> bool {
        // Greedy wildcard matching with one backtrack point: linear in
        // practice, O(n·m) at worst, no recursion.
        let t = topic.as_bytes();
        let p = &self.parts;
        let (mut ti, mut pi) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some(Part::Literal(c)) if *c == t[ti] => {
                    ti += 1;
                    pi += 1;
                }
                Some(Part::One) => {
                    ti += 1;
                    pi += 1;
                }
                Some(Part::Any) => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|part| *part == Part::Any)
    }

    /// Whether the pattern matches every topic name (it is all `*`).
    pub fn matches_everything(&self) -> bool {
        !self.parts.is_empty() && self.parts.iter().all(|part| *part == Part::Any)
    }

    /// The pattern as written (before `{sub}` substitution).
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pattern: &str) -> TopicPattern {
        TopicPattern::compile(pattern, Some("u1")).unwrap().unwrap()
    }

    #[test]
    fn wildcards_match_runs_and_single_characters() {
        assert!(p("orders.*").matches("orders.eu.1"));
        assert!(p("orders.*").matches("orders."));
        assert!(!p("orders.*").matches("orders"));
        assert!(!p("orders.*").matches("ordersx"));
        assert!(p("*").matches("anything:at-all"));
        assert!(p("division-?").matches("division-a"));
        assert!(!p("division-?").matches("division-ab"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exact2"));
        assert!(p("*").matches_everything());
        assert!(p("**").matches_everything());
        assert!(!p("?").matches_everything());
        assert!(!p("orders.*").matches_everything());
    }

    #[test]
    fn sub_is_substituted_literally() {
        assert!(p("user:{sub}").matches("user:u1"));
        assert!(!p("user:{sub}").matches("user:u2"));
        assert!(p("user:{sub}.*").matches("user:u1.inbox"));
        // A subject that looks like a wildcard widens nothing.
        let star = TopicPattern::compile("user:{sub}", Some("*")).unwrap();
        assert!(
            star.is_none(),
            "a subject with non-topic characters grants nothing"
        );
        let q = TopicPattern::compile("user:{sub}", Some("a.b"))
            .unwrap()
            .unwrap();
        assert!(q.matches("user:a.b"));
        assert!(!q.matches("user:aXb"));
        assert!(TopicPattern::compile("user:{sub}", None).unwrap().is_none());
        assert!(TopicPattern::compile("user:{sub}", Some(""))
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert_eq!(TopicPattern::check(""), Err(PatternError::Empty));
        let e = TopicPattern::check("a/b").unwrap_err().to_string();
        assert!(e.contains("'/'"), "{e}");
        assert!(TopicPattern::check("{user}").is_err());
        assert!(TopicPattern::check("user:{sub}").is_ok());
        assert!(TopicPattern::check(&"a".repeat(600)).is_err());
    }
}
