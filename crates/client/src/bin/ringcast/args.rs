//! Command-line arguments of `ringcast`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringcast_client::{Compression, GroupOptions, GroupStart, Start, DEFAULT_ADDR};

/// Command-line client for the ringcast broker. Output is JSON, one value
/// per line; errors go to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "ringcast",
    version,
    about,
    max_term_width = 100,
    after_help = "Access control: when the broker requires credentials, pass a JWT or an API key with \
                  --token (or RINGCAST_TOKEN). `ringcast token` mints an HS256 token for a broker \
                  configured with [auth.jwt] secret_file."
)]
pub struct Cli {
    /// Broker TCP address (host:port).
    #[arg(
        long,
        short = 's',
        global = true,
        env = "RINGCAST_SERVER",
        default_value = DEFAULT_ADDR,
        value_name = "ADDR"
    )]
    pub server: String,

    /// Credentials sent in the handshake when the broker requires them: a
    /// JWT (e.g. from `ringcast token`) or an API key. `--credentials` and
    /// RINGCAST_CREDENTIALS are older names.
    #[arg(
        long,
        global = true,
        env = "RINGCAST_TOKEN",
        hide_env_values = true,
        alias = "credentials",
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Payload compression to offer the broker: `none`, `lz4` (payloads
    /// from 1 KiB) or `lz4:BYTES` (payloads from BYTES). Saves bandwidth on
    /// slow links; events print the same either way.
    #[arg(
        long,
        global = true,
        env = "RINGCAST_COMPRESSION",
        default_value = "none",
        value_name = "CODEC",
        value_parser = parse_compression
    )]
    pub compression: Compression,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish an event: DATA as the payload, or with `-` one event per
    /// stdin line (pipelined); prints one JSON ack per event.
    Pub(PubArgs),
    /// Subscribe and print one JSON line per delivery (events, gaps, end).
    /// A TOPIC with `*` or `?` (quote it for the shell) is a pattern: one
    /// subscription over every matching topic, also those created later.
    Sub(SubArgs),
    /// List topics.
    Topics,
    /// Describe a topic.
    Info {
        /// Topic name.
        topic: String,
    },
    /// Print retained events, one JSON line each, following pages.
    History(HistoryArgs),
    /// Seal a topic: no more publishes; subscribers get `end`.
    Seal {
        /// Topic name.
        topic: String,
    },
    /// Delete a topic and its history.
    Delete {
        /// Topic name.
        topic: String,
    },
    /// Measure the round trip to the broker.
    Ping,
    /// Consumer groups: create, inspect, consume, redrive dead letters.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List the broker's live connections (TCP and SSE) and their
    /// subscriptions — position, lag, events delivered — as a table (or one
    /// JSON array with --json); or close one with `conns close ID`. Needs
    /// the admin grant on every topic.
    Conns(ConnsArgs),
    /// Mint an HS256 token (printed on stdout, no broker contacted).
    ///
    /// Claims: sub, iat, exp (now + --ttl), aud and iss when given, and
    /// {"ringcast": {"publish": [...], "subscribe": [...], "admin": bool}}.
    /// Patterns: `*` any run of topic characters, `?` one, `{sub}` the
    /// subject. The secret file is the broker's auth.jwt.secret_file (a
    /// trailing newline is ignored; at least 32 bytes). Example:
    /// `export RINGCAST_TOKEN=$(ringcast token --secret-file jwt.secret --sub u1 --subscribe 'user:{sub}')`
    #[command(verbatim_doc_comment)]
    Token(TokenArgs),
}

/// `ringcast conns`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConnsArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Close connection ID instead of listing (as `conns close ID`).
    #[arg(long, value_name = "ID", conflicts_with = "json")]
    pub close: Option<u64>,
    /// `close ID`; none lists.
    #[command(subcommand)]
    pub command: Option<ConnsCommand>,
}

impl ConnsArgs {
    /// The connection to close, if this is a close.
    pub fn to_close(&self) -> Option<u64> {
        match &self.command {
            Some(ConnsCommand::Close { id }) => Some(*id),
            None => self.close,
        }
    }
}

/// `ringcast conns ...`.
#[derive(Debug, Subcommand)]
pub enum ConnsCommand {
    /// Close a connection: its client is told the broker is going away,
    /// reconnects and resumes its subscriptions. Prints {"ok":true,"closed":ID}.
    Close {
        /// The connection's id, as listed.
        id: u64,
    },
}

/// `ringcast group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group (idempotent: an existing one is printed unchanged),
    /// or with --update change an existing group's settings (those given;
    /// the start never changes). Prints the group.
    Create(GroupCreateArgs),
    /// List a topic's groups (one JSON array, without pending samples).
    Ls {
        /// Topic name.
        topic: String,
    },
    /// Describe a group: settings, position, lag, pending, members, counters.
    Info(GroupRef),
    /// Print a group's oldest pending events (up to 100; one JSON array).
    Pending(GroupRef),
    /// Join a group and print one JSON line per job (the event envelope plus
    /// `attempt`) or gap. Each job is acked once its line is handed to
    /// stdout, unless --no-ack; on exit the member leaves cleanly, so what it
    /// holds unacked is redelivered at once.
    Consume(GroupConsumeArgs),
    /// Delete a group and its pending work.
    Delete(GroupRef),
    /// Publish the group's dead letters back to its topic (each once).
    Redrive(GroupRef),
}

/// A topic and one of its groups.
#[derive(Debug, Args)]
pub struct GroupRef {
    /// Topic name.
    pub topic: String,
    /// Group name.
    pub group: String,
}

/// `ringcast group create`.
#[derive(Debug, Args)]
pub struct GroupCreateArgs {
    /// Topic name.
    pub topic: String,
    /// Group name.
    pub group: String,
    /// Where a new group starts: `earliest` (every retained event, the
    /// default), `live` (events published from now on) or `after:N`.
    #[arg(long, value_name = "earliest|live|after:N", value_parser = parse_group_start)]
    pub start: Option<GroupStart>,
    /// How long a delivery may stay unsettled before it is redelivered
    /// (e.g. 30s, 500ms; default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_millis)]
    pub ack_wait: Option<u64>,
    /// Deliveries per event before it is dead-lettered (default 5).
    #[arg(long, value_name = "N")]
    pub max_deliver: Option<u32>,
    /// Delays before redelivery, per failed attempt, the last repeating
    /// (e.g. 1s,5s,30s; default none: at once).
    #[arg(long, value_name = "DURATION,...", value_delimiter = ',', value_parser = parse_millis)]
    pub backoff: Option<Vec<u64>>,
    /// Most events handed out and not done over the whole group (default 1000).
    #[arg(long, value_name = "N")]
    pub max_ack_pending: Option<u32>,
    /// Where given-up events go (default `TOPIC.dlq`).
    #[arg(long, value_name = "TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Change an existing group: the settings given replace its current
    /// ones, the others stay (needs the admin grant).
    #[arg(long, conflicts_with = "start")]
    pub update: bool,
}

impl GroupCreateArgs {
    /// `base` with the settings given on the command line.
    pub fn options(&self, base: GroupOptions) -> GroupOptions {
        let mut o = base;
        if let Some(start) = self.start {
            o.start = start;
        }
        if let Some(ms) = self.ack_wait {
            o.ack_wait_ms = ms;
        }
        if let Some(n) = self.max_deliver {
            o.max_deliver = n;
        }
        if let Some(backoff) = &self.backoff {
            o.backoff_ms = backoff.clone();
        }
        if let Some(n) = self.max_ack_pending {
            o.max_ack_pending = n;
        }
        if let Some(t) = &self.dead_letter_topic {
            o.dead_letter_topic = Some(t.clone());
        }
        o
    }
}

/// `ringcast group consume`.
#[derive(Debug, Args)]
pub struct GroupConsumeArgs {
    /// Topic name.
    pub topic: String,
    /// Group name.
    pub group: String,
    /// This member's name: a worker that comes back under the same name
    /// takes over what its earlier session held.
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// Print jobs without acking them: they are redelivered when this
    /// command exits (or after the group's ack_wait).
    #[arg(long)]
    pub no_ack: bool,
    /// Exit after this many jobs (holding at most N at once; a job the
    /// broker pushed meanwhile is handed back at the exit, which counts as
    /// one of its deliveries).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Most jobs held unsettled at once (0 = the group's max_ack_pending).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_in_flight: u32,
}

/// Parses a group start: `earliest`, `live` or `after:N`.
pub fn parse_group_start(s: &str) -> Result<GroupStart, String> {
    match s {
        "earliest" => Ok(GroupStart::Earliest),
        "live" => Ok(GroupStart::Live),
        _ => match s.strip_prefix("after:") {
            Some(n) => n
                .parse()
                .map(GroupStart::AfterOffset)
                .map_err(|_| format!("offset {n:?} is not an unsigned integer")),
            None => Err(format!("expected earliest, live or after:N, got {s:?}")),
        },
    }
}

/// Parses a duration (`humantime` syntax: 30s, 500ms, 1m) into milliseconds.
pub fn parse_millis(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

/// `ringcast token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// File holding the HMAC secret (the broker's auth.jwt.secret_file).
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
    /// The token's subject (`sub`), substituted for `{sub}` in patterns.
    #[arg(long, value_name = "SUBJECT")]
    pub sub: String,
    /// A topic pattern the bearer may subscribe to (read: subscribe,
    /// history, info); repeatable.
    #[arg(long = "subscribe", value_name = "PATTERN")]
    pub subscribe: Vec<String>,
    /// A topic pattern the bearer may publish to; repeatable.
    #[arg(long = "publish", value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Let the bearer seal and delete every topic.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime: `exp` = now + this (e.g. 90s, 15m, 1h, 7d).
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Audience (`aud`), when the broker requires one (auth.jwt.audience).
    #[arg(long, value_name = "AUDIENCE")]
    pub aud: Option<String>,
    /// Issuer (`iss`), when the broker requires one (auth.jwt.issuer).
    #[arg(long, value_name = "ISSUER")]
    pub iss: Option<String>,
}

/// Parses a token lifetime (`humantime` syntax), refusing zero.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("{s:?}: a token must live at least 1s"));
    }
    Ok(ttl)
}

/// `ringcast pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    /// Topic name.
    pub topic: String,
    /// Event type.
    #[arg(value_name = "TYPE")]
    pub event_type: String,
    /// Payload; `-` reads one event per line from stdin (empty lines are
    /// skipped); absent means an empty payload.
    pub data: Option<String>,
    /// A header `name=value`; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Idempotency key (default: a random one): within the topic's dedup
    /// window a publish with a key already stored is not stored again, and
    /// the ack is the original's (`"duplicate": true`). With `-`, line N of
    /// stdin (counting non-empty lines from 1) gets `KEY-N`, so re-running
    /// an import stores nothing twice.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Publish only if the topic's last offset is N (0 = an empty topic);
    /// otherwise fail with `position_mismatch` and the current offset.
    #[arg(long, value_name = "N", conflicts_with = "expect_version")]
    pub expect_offset: Option<u64>,
    /// Publish only if the last version of TYPE is N (0 = none yet);
    /// otherwise fail with `position_mismatch` and the current version.
    #[arg(long, value_name = "N")]
    pub expect_version: Option<u64>,
}

/// `ringcast sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    /// Topic name, or a pattern (`orders.*`: `*` any run of topic
    /// characters, `?` one): every matching topic, each line naming its
    /// topic; an `end` line ends only that topic.
    pub topic: String,
    /// Only these event types (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "TYPE,...")]
    pub types: Vec<String>,
    /// Start with every retained event (default: live).
    #[arg(long, conflicts_with_all = ["after_offset", "after_versions"])]
    pub earliest: bool,
    /// Resume after an offset: `EPOCH:OFFSET`.
    #[arg(long, value_name = "EPOCH:N", value_parser = parse_after_offset, conflicts_with = "after_versions")]
    pub after_offset: Option<Start>,
    /// Resume after per-type versions: `EPOCH:type=5,type2=3`.
    #[arg(long, value_name = "EPOCH:TYPE=V,...", value_parser = parse_after_versions)]
    pub after_versions: Option<Start>,
    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

impl SubArgs {
    /// The pattern, when the topic argument is one.
    pub fn pattern(&self) -> Option<&str> {
        self.topic
            .contains(['*', '?'])
            .then_some(self.topic.as_str())
    }

    /// Refuses flags a pattern subscription cannot take (it resumes per
    /// topic, by itself).
    pub fn check(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        if self.pattern().is_some()
            && (self.after_offset.is_some() || self.after_versions.is_some())
        {
            return Err(Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{:?} is a pattern: it starts live or --earliest, not --after-offset or --after-versions",
                    self.topic
                ),
            ));
        }
        Ok(())
    }

    /// The start these flags ask for.
    pub fn start(&self) -> Start {
        if self.earliest {
            Start::Earliest
        } else if let Some(start) = self.after_offset.as_ref().or(self.after_versions.as_ref()) {
            start.clone()
        } else {
            Start::Live
        }
    }
}

/// `ringcast history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Topic name.
    pub topic: String,
    /// Only events with an offset greater than this.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub after: u64,
    /// Only these event types (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "TYPE,...")]
    pub types: Vec<String>,
    /// Print at most this many events (default: all retained).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

/// Parses `name=value` (the value may contain `=`).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.split_once(':') {
        None if s == "none" => Ok(Compression::None),
        None if s == "lz4" => Ok(Compression::lz4()),
        Some(("lz4", n)) => n
            .parse()
            .map(|min_size| Compression::Lz4 { min_size })
            .map_err(|_| format!("{n:?} is not a size in bytes")),
        _ => Err(format!("{s:?}: expected none, lz4 or lz4:BYTES")),
    }
}

fn parse_epoch(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("epoch {s:?} is not an unsigned integer"))
}

/// Parses `EPOCH:OFFSET` into `Start::AfterOffset`.
pub fn parse_after_offset(s: &str) -> Result<Start, String> {
    let (epoch, offset) = s
        .split_once(':')
        .ok_or_else(|| format!("expected EPOCH:OFFSET, got {s:?}"))?;
    let offset = offset
        .parse()
        .map_err(|_| format!("offset {offset:?} is not an unsigned integer"))?;
    Ok(Start::AfterOffset {
        epoch: parse_epoch(epoch)?,
        offset,
    })
}

/// Parses `EPOCH:type=5,type2=3` into `Start::AfterVersions` (`EPOCH:`
/// alone names no type: everything starts live, within that epoch).
pub fn parse_after_versions(s: &str) -> Result<Start, String> {
    let (epoch, list) = s
        .split_once(':')
        .ok_or_else(|| format!("expected EPOCH:TYPE=VERSION,..., got {s:?}"))?;
    let mut versions = Vec::new();
    for item in list.split(',').filter(|item| !item.is_empty()) {
        let (event_type, version) = item
            .rsplit_once('=')
            .filter(|(t, _)| !t.is_empty())
            .ok_or_else(|| format!("expected TYPE=VERSION, got {item:?}"))?;
        let version = version.parse().map_err(|_| {
            format!("version {version:?} of {event_type:?} is not an unsigned integer")
        })?;
        versions.push((event_type.to_owned(), version));
    }
    Ok(Start::AfterVersions {
        epoch: parse_epoch(epoch)?,
        versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ringcast").chain(args.iter().copied()))
    }

    #[test]
    fn compression_is_none_lz4_or_lz4_with_a_threshold() {
        let compression = |args: &[&str]| parse(args).map(|cli| cli.compression);
        assert_eq!(compression(&["topics"]).unwrap(), Compression::None);
        assert_eq!(
            compression(&["--compression", "lz4", "topics"]).unwrap(),
            Compression::lz4()
        );
        assert_eq!(
            compression(&["topics", "--compression", "lz4:300"]).unwrap(),
            Compression::Lz4 { min_size: 300 }
        );
        assert!(compression(&["--compression", "zstd", "topics"]).is_err());
        assert!(compression(&["--compression", "lz4:big", "topics"]).is_err());
    }

    #[test]
    fn a_topic_with_a_wildcard_is_a_pattern_that_takes_no_resume_start() {
        let sub = |args: &[&str]| match parse(args).unwrap().command {
            Command::Sub(sub) => sub,
            other => panic!("not sub: {other:?}"),
        };
        assert_eq!(sub(&["sub", "orders.*"]).pattern(), Some("orders.*"));
        assert_eq!(sub(&["sub", "order?"]).pattern(), Some("order?"));
        assert_eq!(sub(&["sub", "orders"]).pattern(), None);
        assert!(sub(&["sub", "orders.*", "--earliest"]).check().is_ok());
        let err = sub(&["sub", "orders.*", "--after-offset", "1:2"])
            .check()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        assert!(sub(&["sub", "orders", "--after-offset", "1:2"])
            .check()
            .is_ok());
    }

    fn sub_start(args: &[&str]) -> Start {
        match parse(args).unwrap().command {
            Command::Sub(sub) => sub.start(),
            other => panic!("not sub: {other:?}"),
        }
    }

    #[test]
    fn after_offset_is_epoch_colon_offset() {
        assert_eq!(
            parse_after_offset("18446744073709551615:42"),
            Ok(Start::AfterOffset {
                epoch: u64::MAX,
                offset: 42
            })
        );
        for bad in ["42", "x:1", "1:x", "1:", ":1", "1:-1", "1:2:3"] {
            assert!(parse_after_offset(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn after_versions_is_epoch_colon_type_version_pairs() {
        assert_eq!(
            parse_after_versions("7:created=5,order.paid=3"),
            Ok(Start::AfterVersions {
                epoch: 7,
                versions: vec![("created".into(), 5), ("order.paid".into(), 3)]
            })
        );
        assert_eq!(
            parse_after_versions("7:"),
            Ok(Start::AfterVersions {
                epoch: 7,
                versions: vec![]
            })
        );
        for bad in ["7", "x:a=1", "7:a", "7:=1", "7:a=x", "7:a=1,b"] {
            assert!(parse_after_versions(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sub_starts_live_unless_told_otherwise() {
        assert_eq!(sub_start(&["sub", "t"]), Start::Live);
        assert_eq!(sub_start(&["sub", "t", "--earliest"]), Start::Earliest);
        assert_eq!(
            sub_start(&["sub", "t", "--after-offset", "3:9"]),
            Start::AfterOffset {
                epoch: 3,
                offset: 9
            }
        );
        assert_eq!(
            sub_start(&["sub", "t", "--after-versions", "3:a=1"]),
            Start::AfterVersions {
                epoch: 3,
                versions: vec![("a".into(), 1)]
            }
        );
    }

    #[test]
    fn start_flags_exclude_each_other() {
        for args in [
            &["sub", "t", "--earliest", "--after-offset", "1:2"][..],
            &["sub", "t", "--earliest", "--after-versions", "1:a=2"],
            &[
                "sub",
                "t",
                "--after-offset",
                "1:2",
                "--after-versions",
                "1:a=2",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{args:?}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn bad_values_are_argument_errors_with_exit_code_2() {
        let err = parse(&["sub", "t", "--after-offset", "nope"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["pub", "t", "x", "-H", "novalue"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn types_are_comma_separated() {
        match parse(&["sub", "t", "--types", "a,b", "--types", "c"])
            .unwrap()
            .command
        {
            Command::Sub(sub) => assert_eq!(sub.types, ["a", "b", "c"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pub_takes_repeated_headers_and_optional_data() {
        match parse(&["pub", "t", "created", "{}", "--header", "a=b=c", "-H", "x="])
            .unwrap()
            .command
        {
            Command::Pub(p) => {
                assert_eq!(p.data.as_deref(), Some("{}"));
                assert_eq!(
                    p.headers,
                    [("a".into(), "b=c".into()), ("x".into(), String::new())]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pub_takes_a_key_and_one_expected_position() {
        match parse(&[
            "pub",
            "t",
            "created",
            "{}",
            "--key",
            "k1",
            "--expect-offset",
            "0",
        ])
        .unwrap()
        .command
        {
            Command::Pub(p) => {
                assert_eq!(p.key.as_deref(), Some("k1"));
                assert_eq!(p.expect_offset, Some(0));
                assert_eq!(p.expect_version, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&[
            "pub",
            "t",
            "created",
            "--expect-offset",
            "1",
            "--expect-version",
            "2"
        ])
        .is_err());
    }

    #[test]
    fn server_defaults_to_the_standard_port_and_can_follow_the_command() {
        let cli = parse(&["topics"]).unwrap();
        // RINGCAST_SERVER may be set in the environment running the tests.
        if std::env::var_os("RINGCAST_SERVER").is_none() {
            assert_eq!(cli.server, "127.0.0.1:7411");
        }
        let cli = parse(&["topics", "--server", "h:1"]).unwrap();
        assert_eq!(cli.server, "h:1");
    }

    #[test]
    fn token_takes_repeated_patterns_and_a_human_ttl() {
        match parse(&[
            "token",
            "--secret-file",
            "s",
            "--sub",
            "u1",
            "--subscribe",
            "user:{sub}",
            "--subscribe",
            "public.*",
            "--publish",
            "user:{sub}",
            "--ttl",
            "15m",
        ])
        .unwrap()
        .command
        {
            Command::Token(t) => {
                assert_eq!(t.subscribe, ["user:{sub}", "public.*"]);
                assert_eq!(t.publish, ["user:{sub}"]);
                assert_eq!(t.ttl, Duration::from_secs(900));
                assert!(!t.admin);
                assert_eq!((t.aud, t.iss), (None, None));
            }
            other => panic!("{other:?}"),
        }
        let err = parse(&["token", "--secret-file", "s", "--sub", "u", "--ttl", "0s"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            parse(&["token", "--sub", "u"]).is_err(),
            "the secret file is required"
        );
    }

    #[test]
    fn the_token_flag_has_an_older_name() {
        let cli = parse(&["topics", "--credentials", "k"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("k"));
        let cli = parse(&["--token", "t", "topics"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("t"));
    }

    fn group(args: &[&str]) -> GroupCommand {
        let mut all = vec!["group"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Group(g) => g,
            other => panic!("not group: {other:?}"),
        }
    }

    #[test]
    fn group_create_takes_every_setting() {
        let GroupCommand::Create(c) = group(&[
            "create",
            "orders",
            "billing",
            "--start",
            "after:41",
            "--ack-wait",
            "300ms",
            "--max-deliver",
            "3",
            "--backoff",
            "1s,5s",
            "--max-ack-pending",
            "50",
            "--dead-letter-topic",
            "orders.failed",
        ]) else {
            panic!("not create")
        };
        assert_eq!((c.topic.as_str(), c.group.as_str()), ("orders", "billing"));
        assert!(!c.update);
        assert_eq!(
            c.options(GroupOptions::default()),
            GroupOptions {
                start: GroupStart::AfterOffset(41),
                ack_wait_ms: 300,
                max_deliver: 3,
                backoff_ms: vec![1000, 5000],
                max_ack_pending: 50,
                dead_letter_topic: Some("orders.failed".into()),
            }
        );
    }

    #[test]
    fn group_create_leaves_settings_not_given_as_they_were() {
        let GroupCommand::Create(c) =
            group(&["create", "t", "g", "--update", "--max-deliver", "9"])
        else {
            panic!("not create")
        };
        assert!(c.update);
        let current = GroupOptions {
            start: GroupStart::Live,
            ack_wait_ms: 1234,
            backoff_ms: vec![7],
            ..GroupOptions::default()
        };
        assert_eq!(
            c.options(current.clone()),
            GroupOptions {
                max_deliver: 9,
                ..current
            }
        );
        let GroupCommand::Create(c) = group(&["create", "t", "g"]) else {
            panic!("not create")
        };
        assert_eq!(c.options(GroupOptions::default()), GroupOptions::default());
    }

    #[test]
    fn bad_group_settings_are_argument_errors() {
        for args in [
            &["group", "create", "t", "g", "--start", "after:x"][..],
            &["group", "create", "t", "g", "--start", "latest"],
            &["group", "create", "t", "g", "--ack-wait", "soon"],
            &["group", "create", "t", "g", "--backoff", "1s,x"],
            &["group", "create", "t", "g", "--max-deliver", "-1"],
            &["group", "create", "t", "g", "--update", "--start", "live"],
            &["group", "consume", "t", "g"],
            &["group", "info", "t"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn group_starts_parse() {
        assert_eq!(parse_group_start("earliest"), Ok(GroupStart::Earliest));
        assert_eq!(parse_group_start("live"), Ok(GroupStart::Live));
        assert_eq!(parse_group_start("after:0"), Ok(GroupStart::AfterOffset(0)));
        assert!(parse_group_start("after:").is_err());
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("1m 5ms"), Ok(60_005));
    }

    #[test]
    fn group_consume_acks_by_default() {
        let GroupCommand::Consume(c) = group(&["consume", "t", "g", "--consumer", "w1"]) else {
            panic!("not consume")
        };
        assert_eq!(c.consumer, "w1");
        assert!(!c.no_ack);
        assert_eq!((c.count, c.max_in_flight), (None, 64));
        let GroupCommand::Consume(c) = group(&[
            "consume",
            "t",
            "g",
            "--consumer",
            "w1",
            "--no-ack",
            "--count",
            "3",
        ]) else {
            panic!("not consume")
        };
        assert!(c.no_ack);
        assert_eq!(c.count, Some(3));
        assert!(matches!(group(&["ls", "t"]), GroupCommand::Ls { topic } if topic == "t"));
        for sub in ["info", "pending", "delete", "redrive"] {
            group(&[sub, "t", "g"]);
        }
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
