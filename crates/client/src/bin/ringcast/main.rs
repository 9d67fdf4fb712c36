//! `ringcast`: the command-line client of the ringcast broker, built on the
//! `ringcast_client` SDK.
//!
//! Prints JSON (one value per line) on stdout, one-line human-readable errors
//! on stderr; exits 0 on success, 1 on a failure, 2 on bad arguments.
//! `RUST_LOG` controls diagnostics on stderr (default: warnings, such as
//! reconnects and gaps).

mod args;
mod render;
mod token;

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::Parser;
use ringcast_client::{
    AppendEvent, Client, ClientOptions, ConsumeOptions, ConsumerItem, Delivery, Error, Expected,
    GroupOptions, PendingAck,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use args::{
    Cli, Command, ConnsArgs, GroupCommand, GroupConsumeArgs, GroupCreateArgs, GroupRef,
    HistoryArgs, PubArgs, SubArgs,
};

/// Publishes from stdin keep at most this many acks outstanding.
const PUBLISH_WINDOW: usize = 256;
/// Events asked for per history page.
const HISTORY_PAGE: u64 = 1000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Sub(args) = &cli.command {
        if let Err(e) = args.check() {
            e.exit();
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringcast: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token(args) = &cli.command {
        // Needs no broker.
        let token = token::mint(args, std::time::SystemTime::now())?;
        let mut out = Output::new();
        let printed = out.raw_line(token.into_bytes()).await;
        let flushed = out.finish().await;
        printed?;
        return Ok(flushed?);
    }
    let mut options = ClientOptions::new(cli.server.clone());
    // RINGCAST_CREDENTIALS: the variable's older name.
    options.credentials = cli
        .token
        .clone()
        .or_else(|| std::env::var("RINGCAST_CREDENTIALS").ok())
        .filter(|t| !t.is_empty());
    options.compression = cli.compression;
    let client = Client::connect_with(options)
        .await
        .map_err(|e| anyhow!("cannot connect to {}: {}", cli.server, describe(&e)))?;
    let mut out = Output::new();
    let result = match cli.command {
        Command::Pub(args) => publish(&client, args, &mut out).await,
        Command::Sub(args) => subscribe(&client, args, &mut out).await,
        Command::Topics => {
            let topics = client.topics().await.map_err(fail("listing topics"))?;
            out.line(&Value::Array(
                topics.iter().map(render::topic_summary).collect(),
            ))
            .await
        }
        Command::Info { topic } => {
            let info = client
                .info(topic.as_str())
                .await
                .map_err(fail(&format!("describing {topic}")))?;
            out.line(&render::topic_info(&info)).await
        }
        Command::History(args) => history(&client, args, &mut out).await,
        Command::Seal { topic } => {
            client
                .seal(topic.as_str())
                .await
                .map_err(fail(&format!("sealing {topic}")))?;
            out.line(&serde_json::json!({ "ok": true, "topic": topic }))
                .await
        }
        Command::Delete { topic } => {
            client
                .delete(topic.as_str())
                .await
                .map_err(fail(&format!("deleting {topic}")))?;
            out.line(&serde_json::json!({ "ok": true, "topic": topic }))
                .await
        }
        Command::Ping => {
            let rtt = client.ping().await.map_err(fail("ping"))?;
            out.line(&serde_json::json!({ "rtt_us": rtt.as_micros() as u64 }))
                .await
        }
        Command::Group(command) => group(&client, command, &mut out).await,
        Command::Conns(args) => conns(&client, args, &mut out).await,
        Command::Token(_) => Ok(()),
    };
    // Flushes what was queued; errors here change nothing for the user.
    let _ = client.close().await;
    let flushed = out.finish().await;
    result?;
    Ok(flushed?)
}

async fn publish(client: &Client, args: PubArgs, out: &mut Output) -> anyhow::Result<()> {
    let what = format!("publishing to {}", args.topic);
    let make = |payload: Vec<u8>, key: Option<String>| AppendEvent {
        event_type: args.event_type.clone(),
        headers: args.headers.clone(),
        payload: payload.into(),
        idempotency_key: key,
    };
    let expected = Expected {
        offset: args.expect_offset,
        version: args.expect_version,
    };
    if args.data.as_deref() != Some("-") {
        let payload = args.data.clone().unwrap_or_default().into_bytes();
        let acks = client
            .publish_expecting(
                args.topic.as_str(),
                vec![make(payload, args.key.clone())],
                expected,
            )
            .await
            .map_err(fail(&what))?;
        for ack in &acks {
            out.line(&render::append_ack(ack)).await?;
        }
        return Ok(());
    }
    if expected != Expected::default() {
        return Err(anyhow!(
            "--expect-offset and --expect-version take one event, not stdin lines"
        ));
    }
    // One event per stdin line, pipelined: queued in order, acks printed in
    // order as they come, at most PUBLISH_WINDOW outstanding.
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut acks: VecDeque<PendingAck> = VecDeque::new();
    let mut line = Vec::new();
    let mut lines = 0u64;
    loop {
        line.clear();
        let n = stdin
            .read_until(b'\n', &mut line)
            .await
            .context("reading stdin")?;
        if n == 0 {
            break;
        }
        let payload = strip_newline(&line);
        if payload.is_empty() {
            continue;
        }
        lines += 1;
        let key = args.key.as_ref().map(|k| format!("{k}-{lines}"));
        if acks.len() >= PUBLISH_WINDOW {
            if let Some(ack) = acks.pop_front() {
                out.line(&render::ack(&ack.await.map_err(fail(&what))?))
                    .await?;
            }
        }
        let ack = client
            .queue_publish(args.topic.as_str(), make(payload.to_vec(), key))
            .await
            .map_err(fail(&what))?;
        acks.push_back(ack);
    }
    while let Some(ack) = acks.pop_front() {
        out.line(&render::ack(&ack.await.map_err(fail(&what))?))
            .await?;
    }
    Ok(())
}

fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

async fn subscribe(client: &Client, args: SubArgs, out: &mut Output) -> anyhow::Result<()> {
    if args.pattern().is_some() {
        return subscribe_pattern(client, args, out).await;
    }
    let what = format!("subscribing to {}", args.topic);
    let mut subscription = client
        .subscribe(args.topic.as_str())
        .types(args.types.iter().cloned())
        .start(args.start())
        .send()
        .await
        .map_err(fail(&what))?;
    let mut events = 0u64;
    if args.count == Some(0) {
        return Ok(());
    }
    while let Some(delivery) = subscription.next_delivery().await {
        match delivery.map_err(fail(&what))? {
            Delivery::Event(event) => {
                out.line(&render::event(&event, subscription.epoch()))
                    .await?;
                events += 1;
                if args.count.is_some_and(|n| events >= n) {
                    return Ok(());
                }
            }
            Delivery::Gap(gap) => out.line(&render::gap(&gap)).await?,
            Delivery::End { topic, last_offset } => {
                return out.line(&render::end(&topic, last_offset)).await;
            }
        }
    }
    Ok(())
}

/// `sub` with a pattern: lines as for one topic, each naming its topic;
/// an `end` line ends only its topic, so this runs until `--count` events,
/// an error, or a kill.
async fn subscribe_pattern(client: &Client, args: SubArgs, out: &mut Output) -> anyhow::Result<()> {
    let what = format!("subscribing to {}", args.topic);
    let builder = client
        .subscribe_pattern(args.topic.as_str())
        .types(args.types.iter().cloned());
    let builder = if args.earliest {
        builder.earliest()
    } else {
        builder.live()
    };
    let mut subscription = builder.send().await.map_err(fail(&what))?;
    if args.count == Some(0) {
        return Ok(());
    }
    let mut events = 0u64;
    while let Some(delivery) = subscription.next_delivery().await {
        match delivery.map_err(fail(&what))? {
            Delivery::Event(event) => {
                let epoch = subscription.position(&event.topic).map_or(0, |p| p.epoch);
                out.line(&render::event(&event, epoch)).await?;
                events += 1;
                if args.count.is_some_and(|n| events >= n) {
                    return Ok(());
                }
            }
            Delivery::Gap(gap) => out.line(&render::gap(&gap)).await?,
            Delivery::End { topic, last_offset } => {
                out.line(&render::end(&topic, last_offset)).await?
            }
        }
    }
    Ok(())
}

/// The group's state, or an error line naming it.
async fn describe_group(
    client: &Client,
    g: &GroupRef,
) -> anyhow::Result<ringcast_client::WireGroupInfo> {
    client
        .group_info(g.topic.as_str(), g.group.as_str())
        .await
        .map_err(fail(&format!(
            "describing group {} of {}",
            g.group, g.topic
        )))
}

async fn group(client: &Client, command: GroupCommand, out: &mut Output) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create(args) => create_group(client, args, out).await,
        GroupCommand::Ls { topic } => {
            let groups = client
                .groups(topic.as_str())
                .await
                .map_err(fail(&format!("listing the groups of {topic}")))?;
            out.line(&Value::Array(
                groups.iter().map(render::group_summary).collect(),
            ))
            .await
        }
        GroupCommand::Info(g) => {
            let info = describe_group(client, &g).await?;
            out.line(&render::group_info(&info)).await
        }
        GroupCommand::Pending(g) => {
            let info = describe_group(client, &g).await?;
            out.line(&Value::Array(
                info.pending_sample.iter().map(render::pending).collect(),
            ))
            .await
        }
        GroupCommand::Consume(args) => consume(client, args, out).await,
        GroupCommand::Delete(g) => {
            client
                .delete_group(g.topic.as_str(), g.group.as_str())
                .await
                .map_err(fail(&format!("deleting group {} of {}", g.group, g.topic)))?;
            out.line(&serde_json::json!({ "ok": true, "topic": g.topic, "group": g.group }))
                .await
        }
        GroupCommand::Redrive(g) => {
            let count = client
                .redrive(g.topic.as_str(), g.group.as_str())
                .await
                .map_err(fail(&format!(
                    "redriving the dead letters of group {} of {}",
                    g.group, g.topic
                )))?;
            out.line(&serde_json::json!({ "topic": g.topic, "group": g.group, "redriven": count }))
                .await
        }
    }
}

async fn create_group(
    client: &Client,
    args: GroupCreateArgs,
    out: &mut Output,
) -> anyhow::Result<()> {
    let what = format!("creating group {} of {}", args.group, args.topic);
    // An update changes the settings given and keeps the others.
    let base = if args.update {
        client
            .group_info(args.topic.as_str(), args.group.as_str())
            .await
            .map_err(fail(&what))?
            .options
    } else {
        GroupOptions::default()
    };
    let info = client
        .create_group(
            args.topic.as_str(),
            args.group.as_str(),
            args.options(base),
            args.update,
        )
        .await
        .map_err(fail(&what))?;
    out.line(&render::group_info(&info)).await
}

async fn consume(client: &Client, args: GroupConsumeArgs, out: &mut Output) -> anyhow::Result<()> {
    let what = format!("consuming group {} of {}", args.group, args.topic);
    if args.count == Some(0) {
        return Ok(());
    }
    // With --count, take no more jobs than will be printed: a job taken and
    // handed back at the leave would spend one of its attempts.
    let window = match (args.count, args.max_in_flight) {
        (Some(n), room) => {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            // 0 = the group's max_ack_pending: no smaller than n either.
            if room == 0 {
                n
            } else {
                room.min(n)
            }
        }
        (None, room) => room,
    };
    let options = ConsumeOptions::new(args.consumer.as_str()).max_in_flight(window);
    let mut consumer = client
        .consume(args.topic.as_str(), args.group.as_str(), options)
        .await
        .map_err(fail(&what))?;
    let epoch = consumer.epoch();
    let mut jobs = 0u64;
    let result = async {
        while let Some(item) = consumer.next().await {
            match item.map_err(fail(&what))? {
                ConsumerItem::Job(job) => {
                    out.line(&render::job(job.event(), epoch, job.attempt()))
                        .await?;
                    if !args.no_ack {
                        job.ack().await.map_err(fail(&what))?;
                    }
                    jobs += 1;
                    if args.count.is_some_and(|n| jobs >= n) {
                        break;
                    }
                }
                ConsumerItem::Gap(gap) => out.line(&render::gap(&gap)).await?,
            }
        }
        Ok(())
    }
    .await;
    // Unacked jobs go back to the group at once, not after ack_wait.
    let _ = consumer.leave().await;
    result
}

/// `ringcast conns`: the listing as a table (or JSON), or a close.
async fn conns(client: &Client, args: ConnsArgs, out: &mut Output) -> anyhow::Result<()> {
    if let Some(id) = args.to_close() {
        client
            .close_connection(id)
            .await
            .map_err(fail(&format!("closing connection {id}")))?;
        return out
            .line(&serde_json::json!({ "ok": true, "closed": id }))
            .await;
    }
    let list = client
        .connections()
        .await
        .map_err(fail("listing connections"))?;
    if args.json {
        return out
            .line(&Value::Array(list.iter().map(render::connection).collect()))
            .await;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let table = render::connections_table(&list, now_ms);
    out.raw_line(table.trim_end().as_bytes().to_vec()).await
}

async fn history(client: &Client, args: HistoryArgs, out: &mut Output) -> anyhow::Result<()> {
    let what = format!("reading the history of {}", args.topic);
    let types: Vec<&str> = args.types.iter().map(String::as_str).collect();
    let mut after = args.after;
    let mut left = args.limit.unwrap_or(u64::MAX);
    // The epoch is not part of a history page; `info` gives it once.
    let epoch = client
        .info(args.topic.as_str())
        .await
        .map_err(fail(&what))?
        .epoch;
    while left > 0 {
        let limit = u32::try_from(left.min(HISTORY_PAGE)).unwrap_or(u32::MAX);
        let page = client
            .history(args.topic.as_str(), after, &types, limit)
            .await
            .map_err(fail(&what))?;
        if page.events.is_empty() {
            break;
        }
        for event in &page.events {
            out.line(&render::event(event, epoch)).await?;
        }
        left = left.saturating_sub(page.events.len() as u64);
        if page.next_after <= after {
            break;
        }
        after = page.next_after;
    }
    Ok(())
}

/// Wraps an SDK error with what was being done.
fn fail(what: &str) -> impl Fn(Error) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {}", describe(&e))
}

/// A short human description of an SDK error.
fn describe(e: &Error) -> String {
    match e {
        // "connection refused", not "Connection refused (os error 111)".
        Error::Io(io) if io.raw_os_error().is_some() => io.kind().to_string(),
        Error::Io(io) => io.to_string(),
        Error::Timeout => "timed out".to_owned(),
        Error::Handshake(reason) => reason.clone(),
        other => other.to_string(),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

/// Stdout, one JSON value per line.
///
/// Lines go through a bounded queue to a thread that writes them, flushing
/// whenever the queue runs dry, so that pipes see deliveries as they happen
/// without a syscall per line. A stalled reader of our stdout thus stalls
/// only the command (and, through the SDK's bounded queues, the broker's view
/// of this subscriber: a slow consumer), never the connection's heartbeats.
struct Output {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<std::thread::JoinHandle<io::Result<()>>>,
}

/// Lines queued for the stdout thread.
const OUTPUT_QUEUE: usize = 1024;

impl Output {
    fn new() -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTPUT_QUEUE);
        let writer = std::thread::spawn(move || -> io::Result<()> {
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            while let Some(line) = rx.blocking_recv() {
                out.write_all(&line)?;
                for _ in 0..OUTPUT_QUEUE {
                    match rx.try_recv() {
                        Ok(line) => out.write_all(&line)?,
                        Err(_) => break,
                    }
                }
                out.flush()?;
            }
            out.flush()
        });
        Output {
            tx: Some(tx),
            writer: Some(writer),
        }
    }

    async fn line(&mut self, value: &Value) -> anyhow::Result<()> {
        self.raw_line(serde_json::to_vec(value)?).await
    }

    /// Writes `line` and a newline as they are.
    async fn raw_line(&mut self, mut line: Vec<u8>) -> anyhow::Result<()> {
        line.push(b'\n');
        let sent = match &self.tx {
            Some(tx) => tx.send(line).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer stopped: report why.
            self.finish().await?;
            Err(io::Error::from(io::ErrorKind::BrokenPipe).into())
        }
    }

    /// Writes out what is queued and stops the writer.
    async fn finish(&mut self) -> io::Result<()> {
        self.tx = None;
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(result)) => result,
            _ => Err(io::Error::other("the stdout writer panicked")),
        }
    }
}
