//! An SSE client-side parser (WHATWG "event stream interpretation"), as a
//! browser's `EventSource` reads a stream: for tests that assert what a page
//! would see.

use std::collections::VecDeque;

use serde_json::Value;

/// One dispatched event: the fields of one blank-line-terminated block.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `id:` field of this block, if it had one.
    pub id: Option<String>,
    /// The `event:` field; `message` when absent.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `retry:` field of this block, in milliseconds.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// `data` as JSON (panics when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data of {self:?} is not JSON: {e}"))
    }

    /// The offset its envelope names.
    pub fn offset(&self) -> u64 {
        self.json()["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("{self:?} has no offset"))
    }

    /// The topic its envelope (or gap, or end) names.
    pub fn topic(&self) -> String {
        self.json()["topic"]
            .as_str()
            .unwrap_or_else(|| panic!("{self:?} names no topic"))
            .to_owned()
    }

    /// Whether this is a message about the stream rather than an event.
    pub fn is_control(&self) -> bool {
        matches!(
            self.event.as_str(),
            "ready" | "gap" | "end" | "error" | "shutdown"
        )
    }
}

/// What the stream yields: events and comments (heartbeats), in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// A dispatched event.
    Event(SseEvent),
    /// A comment line (a heartbeat), without its `:`.
    Comment(String),
}

#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    retry: Option<u64>,
    /// The last event id buffer, as `EventSource.lastEventId` keeps it:
    /// set by every `id:` field, kept across events without one.
    pub last_event_id: String,
}

impl SseParser {
    /// Parses `bytes`, appending what they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<Msg>) {
        for &b in bytes {
            // A line ends with CRLF, LF or CR.
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            if b == b'\r' || b == b'\n' {
                self.after_cr = b == b'\r';
                let line = String::from_utf8(std::mem::take(&mut self.line))
                    .expect("an event stream is UTF-8");
                self.process(&line, out);
            } else {
                self.line.push(b);
            }
        }
    }

    fn process(&mut self, line: &str, out: &mut VecDeque<Msg>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push_back(Msg::Comment(comment.trim_start().to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "id" if !value.contains('\0') => {
                self.id = Some(value.to_owned());
                self.last_event_id = value.to_owned();
            }
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            "retry" => {
                self.retry = Some(
                    value
                        .parse()
                        .unwrap_or_else(|_| panic!("retry {value:?} is not a number")),
                )
            }
            _ => {} // ignored, as EventSource does
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<Msg>) {
        let id = self.id.take();
        let event = self.event.take();
        let retry = self.retry.take();
        let data = std::mem::take(&mut self.data);
        // EventSource dispatches nothing for a block without data.
        if !data.is_empty() {
            out.push_back(Msg::Event(SseEvent {
                id,
                event: event.unwrap_or_else(|| "message".into()),
                data: data.join("\n"),
                retry,
            }));
        }
    }

    /// [`feed`](Self::feed), keeping the events only (comments dropped).
    pub fn feed_events(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
        let mut msgs = VecDeque::new();
        self.feed(bytes, &mut msgs);
        out.extend(msgs.into_iter().filter_map(|m| match m {
            Msg::Event(e) => Some(e),
            Msg::Comment(_) => None,
        }));
    }
}
