#!/usr/bin/env node
// Load generator for the TypeScript client: the `publish` and `resume`
// scenarios of the Rust load generator (crates/bench), through this
// package, printing the same JSON record shape (one line on stdout, and
// appended to --out). benches/compare.sh --typescript runs both side by side.
//
//   node bench/bench.mjs publish --addr 127.0.0.1:7411 --n 100000 --payload 128 --window 1024 \
//        [--server-pid PID] [--label L] [--repeat 3] [--out results.jsonl]
//   node bench/bench.mjs resume  --addr 127.0.0.1:7411 --n 100000 --payload 128 [...]
//   node bench/bench.mjs table results.jsonl      # the side-by-side table

import { appendFileSync, readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";

import { Client } from "../dist/index.js";

const CLK_TCK = 100; // Linux USER_HZ

function serverCpuSeconds(pid) {
  if (!pid) return null;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

const clientCpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;

/** Publishes `n` events keeping `window` unacknowledged at once, as the Rust `publish_n` does. */
async function publishN(client, topic, n, window, payload) {
  let sent = 0;
  let acked = 0;
  await new Promise((resolve, reject) => {
    const pump = () => {
      while (sent < n && sent - acked < window) {
        sent++;
        client.publish(topic, "b", payload).then(() => {
          acked++;
          if (acked === n) resolve();
          else pump();
        }, reject);
      }
    };
    if (n === 0) resolve();
    else pump();
  });
}

function measure(serverPid) {
  const server0 = serverCpuSeconds(serverPid);
  const client0 = clientCpuSeconds();
  const t0 = performance.now();
  return (rec, per) => {
    const elapsed = (performance.now() - t0) / 1000;
    const client = clientCpuSeconds() - client0;
    const server1 = serverCpuSeconds(serverPid);
    rec.elapsed_s = round(elapsed, 3);
    rec.client_cpu_s = round(client, 3);
    rec.client_cpu_us_per_msg = round((client * 1e6) / per, 3);
    if (server0 !== null && server1 !== null) {
      rec.server_cpu_s = round(server1 - server0, 3);
      rec.server_cpu_us_per_msg = round(((server1 - server0) * 1e6) / per, 3);
    }
    return elapsed;
  };
}

async function publishRun(o, run) {
  const client = await Client.connect(o.addr, { clientName: "ts-bench" });
  const topic = `bench.ts.${process.pid}.${run}.p${o.payload}`;
  const payload = new Uint8Array(o.payload).fill(0x78);
  await publishN(client, topic, Math.min(5000, Math.max(100, Math.floor(o.n / 20))), o.window, payload);
  const done = measure(o.serverPid);
  await publishN(client, topic, o.n, o.window, payload);
  const rec = { scenario: "publish", target: "ringcast-ts", label: o.label, payload: o.payload, n: o.n, window: o.window };
  const elapsed = done(rec, o.n);
  rec.msgs_per_s = Math.round(o.n / elapsed);
  await client.close();
  return rec;
}

async function resumeRun(o, run) {
  const topic = `bench.ts.${process.pid}.${run}.resume`;
  const payload = new Uint8Array(o.payload).fill(0x78);
  const publisher = await Client.connect(o.addr, { clientName: "ts-bench" });
  await publishN(publisher, topic, o.n, 1024, payload);
  await publisher.close();

  const client = await Client.connect(o.addr, { clientName: "ts-bench", maxBufferedEvents: o.buffer });
  const done = measure(o.serverPid);
  const sub = await client.subscribe(topic, { start: "earliest" });
  let count = 0;
  let gaps = 0;
  for await (const item of sub) {
    if (item.kind === "event") {
      if (++count >= o.n) break;
    } else if (item.kind === "gap") {
      gaps += item.current - item.requested;
    } else {
      break;
    }
  }
  const rec = { scenario: "resume", target: "ringcast-ts", label: o.label, payload: o.payload, n: o.n, received: count, gap_events: gaps };
  const elapsed = done(rec, count);
  rec.events_per_s = Math.round(count / elapsed);
  await client.close();
  return rec;
}

function median(records, key) {
  const sorted = [...records].sort((a, b) => a[key] - b[key]);
  const mid = sorted[Math.floor(sorted.length / 2)];
  return { ...mid, runs: records.map((r) => r[key]) };
}

function table(path) {
  const rows = readFileSync(path, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l));
  const byLabel = new Map(rows.map((r) => [r.label, r]));
  const out = [
    "| scenario | Rust SDK | TypeScript | TS / Rust | client CPU µs/event Rust | TS | TS / Rust | broker CPU µs/event Rust | TS |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const r of rows) {
    if (!r.label.startsWith("rust.")) continue;
    const t = byLabel.get(`ts.${r.label.slice(5)}`);
    if (!t) continue;
    const key = r.scenario === "resume" ? "events_per_s" : "msgs_per_s";
    const per = (x) => (x.client_cpu_us_per_msg ?? (x.client_cpu_s * 1e6) / (x.received ?? x.n)).toFixed(2);
    const rustClient = Number(per(r));
    const tsClient = Number(per(t));
    out.push(
      `| ${r.label.slice(5)} | ${r[key].toLocaleString("en")}/s | ${t[key].toLocaleString("en")}/s | ${(t[key] / r[key]).toFixed(2)}× | ${rustClient} | ${tsClient} | ${(tsClient / rustClient).toFixed(2)}× | ${r.server_cpu_us_per_msg ?? "-"} | ${t.server_cpu_us_per_msg ?? "-"} |`,
    );
  }
  console.log(out.join("\n"));
}

async function main() {
  const [scenario, ...rest] = process.argv.slice(2);
  if (scenario === "table") {
    table(rest[0]);
    return;
  }
  const { values } = parseArgs({
    args: rest,
    options: {
      addr: { type: "string", default: "127.0.0.1:7411" },
      n: { type: "string", default: "100000" },
      payload: { type: "string", default: "128" },
      window: { type: "string", default: "1024" },
      buffer: { type: "string", default: "10000" },
      "server-pid": { type: "string" },
      label: { type: "string", default: "" },
      repeat: { type: "string", default: "1" },
      out: { type: "string" },
    },
  });
  const o = {
    addr: values.addr,
    n: Number(values.n),
    payload: Number(values.payload),
    window: Number(values.window),
    buffer: Number(values.buffer),
    serverPid: values["server-pid"] ? Number(values["server-pid"]) : null,
    label: values.label,
  };
  const runs = [];
  for (let i = 0; i < Number(values.repeat); i++) {
    if (scenario === "publish") runs.push(await publishRun(o, i));
    else if (scenario === "resume") runs.push(await resumeRun(o, i));
    else throw new Error(`unknown scenario ${scenario} (publish, resume, table)`);
  }
  const rec = median(runs, scenario === "resume" ? "events_per_s" : "msgs_per_s");
  const line = JSON.stringify(rec);
  console.log(line);
  if (values.out) appendFileSync(values.out, `${line}\n`);
}

await main();
