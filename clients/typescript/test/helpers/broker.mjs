// Test helper: runs the real `ringcastd` binary on ephemeral ports.
//
//   const broker = await startBroker({ config: { topics: { max_events: 3 } } });
//   await broker.publish("orders", "created", { id: 1 });
//   ... broker.tcpHost, broker.tcpPort, broker.httpUrl ...
//   await broker.kill(); await broker.restart();   // same ports, same data dir
//   await broker.cleanup();
//
// Broker: tcpHost, tcpPort, httpPort, httpUrl, dataDir, adminToken (with
// opts.jwt), log (stderr tail), running; stop(), kill(), restart(),
// cleanup(); request(method, path, {body, headers, token}), publish(topic,
// type, body, headers, {token, idempotencyKey}), history(topic, {after,
// types, token}), info(topic), seal(topic), deleteTopic(topic), stats().
// Also exported: mintJwt(secret, claims), jwtClaims({...}), randomSecret(),
// toToml(obj), httpRequest(url, {...}), ringcastdPath().
//
// Plain ESM, Node >= 20 standard library only. The binary is
// $RINGCAST_BIN, else <CARGO_TARGET_DIR or repo/target>/debug/ringcastd,
// built with `cargo build --bin ringcastd` when missing.

import { spawn, spawnSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, rmSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (clients/typescript/test/helpers → ../../../..). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");

/** How long a start may take before it is an error (a cold debug build recovering storage). */
const START_TIMEOUT_MS = 60_000;
/** How long restart() keeps retrying while the old port is still busy. */
const REBIND_MS = 10_000;
/** Most bytes of the child's stderr kept for error messages. */
const STDERR_KEEP = 64 * 1024;

/** The ringcastd binary, built first when missing. */
export function ringcastdPath() {
  if (process.env.RINGCAST_BIN) return process.env.RINGCAST_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO_ROOT, "target");
  const bin = path.join(target, "debug", "ringcastd");
  if (!existsSync(bin)) {
    const built = spawnSync("cargo", ["build", "--bin", "ringcastd"], {
      cwd: REPO_ROOT,
      stdio: "inherit",
    });
    if (built.status !== 0 || !existsSync(bin)) {
      throw new Error(
        `cannot build ringcastd (cargo build --bin ringcastd in ${REPO_ROOT}: ` +
          `${built.error ? built.error.message : `exit ${built.status}`}); set RINGCAST_BIN to use another binary`,
      );
    }
  }
  return bin;
}

// ---------------------------------------------------------------- TOML

const BARE_KEY = /^[A-Za-z0-9_-]+$/;
const key = (k) => (BARE_KEY.test(k) ? k : JSON.stringify(k));
const isTable = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isTableArray = (v) => Array.isArray(v) && v.length > 0 && v.every(isTable);

function scalar(v, where) {
  if (typeof v === "string") return JSON.stringify(v); // JSON escapes are TOML basic-string escapes
  if (typeof v === "boolean") return String(v);
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw new Error(`TOML: ${where} is not a finite number`);
    return String(v);
  }
  if (typeof v === "bigint") return v.toString();
  if (Array.isArray(v)) return `[${v.map((x, i) => scalar(x, `${where}[${i}]`)).join(", ")}]`;
  if (isTable(v)) {
    const items = Object.entries(v)
      .filter(([, x]) => x !== undefined)
      .map(([k, x]) => `${key(k)} = ${scalar(x, `${where}.${k}`)}`);
    return `{ ${items.join(", ")} }`;
  }
  throw new Error(`TOML: ${where} has an unsupported value ${String(v)}`);
}

/**
 * A plain object as TOML: scalars and arrays of scalars as `key = value`,
 * nested objects as `[a.b]` tables, arrays of objects as `[[a.b]]`.
 * `undefined` values are left out.
 */
export function toToml(obj) {
  const out = [];
  const emit = (table, prefix) => {
    const entries = Object.entries(table).filter(([, v]) => v !== undefined);
    for (const [k, v] of entries) {
      if (!isTable(v) && !isTableArray(v)) out.push(`${key(k)} = ${scalar(v, [...prefix, k].join("."))}`);
    }
    for (const [k, v] of entries) {
      const name = [...prefix, k];
      if (isTable(v)) {
        out.push("", `[${name.map(key).join(".")}]`);
        emit(v, name);
      } else if (isTableArray(v)) {
        for (const item of v) {
          out.push("", `[[${name.map(key).join(".")}]]`);
          emit(item, name);
        }
      }
    }
  };
  emit(obj, []);
  return out.join("\n").trimStart() + "\n";
}

/** `b` merged into `a` (objects recursively; anything else replaced). */
function merge(a, b) {
  const out = { ...a };
  for (const [k, v] of Object.entries(b ?? {})) {
    out[k] = isTable(v) && isTable(out[k]) ? merge(out[k], v) : v;
  }
  return out;
}

// ---------------------------------------------------------------- JWT

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT of `claims`, signed with `secret` (a string or bytes). */
export function mintJwt(secret, claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/**
 * Claims the broker accepts (README "Security"): subject `sub`, `exp` in
 * `ttlSeconds` (negative: already expired), the `ringcast` grants claim,
 * and `aud` when given.
 */
export function jwtClaims({ sub = "test", ttlSeconds = 3600, subscribe = [], publish = [], admin = false, audience } = {}) {
  const claims = {
    sub,
    exp: Math.floor(Date.now() / 1000) + ttlSeconds,
    ringcast: { subscribe, publish, admin },
  };
  if (audience) claims.aud = audience;
  return claims;
}

// ---------------------------------------------------------------- HTTP

/**
 * One HTTP request on a connection of its own (no keep-alive pool that a
 * killed broker would leave dead). Resolves `{ status, headers, text, json }`.
 */
export function httpRequest(url, { method = "GET", headers = {}, body, timeoutMs = 30_000 } = {}) {
  return new Promise((resolve, reject) => {
    const payload =
      body === undefined ? undefined : typeof body === "string" || body instanceof Uint8Array ? body : JSON.stringify(body);
    const req = http.request(url, { method, headers, agent: false, timeout: timeoutMs }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("error", reject);
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        let json;
        try {
          json = text ? JSON.parse(text) : undefined;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    req.on("timeout", () => req.destroy(new Error(`${method} ${url}: no answer within ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end(payload);
  });
}

// ---------------------------------------------------------------- Broker

/** Temp dirs not yet removed: removed when the process exits. */
const leftBehind = new Set();
/** Brokers still running: killed when the process exits. */
const alive = new Set();
process.on("exit", () => {
  for (const child of alive) child.kill("SIGKILL");
  for (const dir of leftBehind) rmSync(dir, { recursive: true, force: true });
});

/** A clean environment: ours minus every RINGCAST_* variable and RUST_LOG. */
function cleanEnv(extra) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("RINGCAST_") && k !== "RUST_LOG" && k !== "JOURNAL_STREAM") env[k] = v;
  }
  return { ...env, ...extra };
}

/**
 * Starts `ringcastd` on 127.0.0.1 ephemeral ports and resolves once it
 * logged "ringcastd started".
 *
 * opts:
 * - config: a plain object written as the TOML config file (see toToml);
 *   `[log] format` is forced to "json" (the helper reads the bound ports
 *   from that log line).
 * - dataDir: the data directory (default: one in a fresh temp dir, removed
 *   by cleanup(), or when the test process exits; stop() and kill() keep it
 *   for restart()).
 * - durability: "fsync" | "interval" | "memory" (default "interval", for
 *   speed). NB: in "interval" mode a kill() loses what was acknowledged in
 *   the last flush_interval (200 ms) and the topics get a new epoch; a test
 *   that kills the broker and expects exact resume needs "fsync".
 * - env: extra environment variables (the inherited RINGCAST_* ones are dropped).
 * - jwt: { secret, audience?, issuer? } turns on HS256 auth: the secret is
 *   written to a file, `auth.leeway` defaults to "0s", and the broker gets
 *   `adminToken`, a token with every grant that publish()/history()/...
 *   use by default.
 */
export async function startBroker(opts = {}) {
  const workDir = await mkdtemp(path.join(os.tmpdir(), "ringcast-test-"));
  leftBehind.add(workDir);
  const broker = new Broker(workDir, opts);
  try {
    await broker._configure();
    await broker._start({ tcp: "127.0.0.1:0", http: "127.0.0.1:0" });
  } catch (e) {
    await broker.cleanup();
    throw e;
  }
  return broker;
}

export class Broker {
  constructor(workDir, opts) {
    this.workDir = workDir;
    this.opts = opts;
    this.dataDir = opts.dataDir ?? path.join(workDir, "data");
    this.configPath = path.join(workDir, "ringcast.toml");
    this.durability = opts.durability ?? "interval";
    this.tcpHost = "127.0.0.1";
    this.tcpPort = 0;
    this.httpPort = 0;
    this.httpUrl = "";
    this.adminToken = undefined;
    this.child = undefined;
    this.exited = undefined; // a promise of { code, signal } for the running child
    this.stderr = "";
    this.starts = 0;
  }

  async _configure() {
    let config = merge(this.opts.config ?? {}, {});
    const filter = config.log?.filter ?? "info";
    config = merge(config, {
      log: {
        format: "json",
        // The start line is logged at info by target ringcastd.
        filter: /ringcastd/.test(filter) ? filter : `${filter},ringcastd=info`,
      },
    });
    const jwt = this.opts.jwt;
    if (jwt) {
      const secretFile = path.join(this.workDir, "jwt.secret");
      await writeFile(secretFile, jwt.secret, { mode: 0o600 });
      config = merge({ auth: { leeway: "0s" } }, config);
      config = merge(config, {
        auth: {
          jwt: {
            secret_file: secretFile,
            ...(jwt.audience !== undefined ? { audience: jwt.audience } : {}),
            ...(jwt.issuer !== undefined ? { issuer: jwt.issuer } : {}),
          },
        },
      });
      const claims = jwtClaims({ sub: "test-admin", ttlSeconds: 24 * 3600, subscribe: ["*"], publish: ["*"], admin: true, audience: jwt.audience });
      if (jwt.issuer) claims.iss = jwt.issuer;
      this.adminToken = mintJwt(jwt.secret, claims);
    }
    this.config = config;
    await writeFile(this.configPath, toToml(config));
  }

  /** Whether the process is running. */
  get running() {
    return this.child !== undefined;
  }

  /** The last bytes the broker wrote to stderr (its JSON log). */
  get log() {
    return this.stderr;
  }

  async _start({ tcp, http: httpAddr }) {
    const bin = ringcastdPath();
    const args = [
      "--config", this.configPath,
      "--data-dir", this.dataDir,
      "--tcp-listen", tcp,
      "--http-listen", httpAddr,
      "--durability", this.durability,
    ];
    const child = spawn(bin, args, {
      env: cleanEnv(this.opts.env),
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.starts += 1;
    this.stderr = "";
    let exit;
    this.exited = new Promise((resolve) => {
      exit = resolve;
    });
    alive.add(child);
    // "close": after the exit and the end of stderr, so that an error
    // message has all of it.
    child.on("close", (code, signal) => {
      alive.delete(child);
      if (this.child === child) this.child = undefined;
      exit({ code, signal });
    });
    this.child = child;
    const started = new Promise((resolve, reject) => {
      let line = "";
      const timer = setTimeout(() => {
        reject(new Error(`ringcastd did not start within ${START_TIMEOUT_MS} ms; stderr:\n${this.stderr}`));
      }, START_TIMEOUT_MS);
      child.on("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot run ${bin}: ${e.message}`));
      });
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (chunk) => {
        this.stderr = (this.stderr + chunk).slice(-STDERR_KEEP);
        line += chunk;
        let nl;
        while ((nl = line.indexOf("\n")) >= 0) {
          const text = line.slice(0, nl);
          line = line.slice(nl + 1);
          let rec;
          try {
            rec = JSON.parse(text);
          } catch {
            continue;
          }
          const f = rec.fields ?? rec;
          if (f.message === "ringcastd started" && f.tcp && f.http) {
            clearTimeout(timer);
            resolve({ tcp: f.tcp, http: f.http });
          }
        }
      });
      this.exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(
          Object.assign(
            new Error(`ringcastd exited before it started (code ${code}, signal ${signal}); stderr:\n${this.stderr}`),
            { stderr: this.stderr },
          ),
        );
      });
    });
    const addrs = await started;
    const [tcpHost, tcpPort] = splitAddr(addrs.tcp);
    const [, httpPort] = splitAddr(addrs.http);
    this.tcpHost = tcpHost;
    this.tcpPort = tcpPort;
    this.httpPort = httpPort;
    this.httpUrl = `http://127.0.0.1:${httpPort}`;
  }

  async _signal(signal) {
    const child = this.child;
    if (!child) return;
    const exited = this.exited;
    child.kill(signal);
    await exited;
  }

  /**
   * SIGTERM (graceful: clients are told `shutdown`), then waits for the
   * exit. Keeps the data dir, so that restart() resumes it; cleanup()
   * removes it (and a temp dir left behind is removed when the test
   * process exits).
   */
  async stop() {
    await this._signal("SIGTERM");
  }

  /** SIGKILL (a crash), then waits for the exit. Keeps the data dir. */
  async kill() {
    await this._signal("SIGKILL");
  }

  /**
   * Starts the broker again on the same ports and data dir (after stop()
   * of a caller-given dataDir, or kill()). Retries for a few seconds while
   * a port is still busy.
   */
  async restart() {
    if (this.child) throw new Error("restart(): the broker is still running; stop() or kill() it first");
    const deadline = Date.now() + REBIND_MS;
    for (;;) {
      try {
        await this._start({ tcp: `127.0.0.1:${this.tcpPort}`, http: `127.0.0.1:${this.httpPort}` });
        return;
      } catch (e) {
        const busy = /address already in use|AddrInUse|os error 98/i.test(e.stderr ?? "");
        if (!busy || Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 100)); // backoff before the next bind attempt
      }
    }
  }

  /** Kills the broker if it runs and removes the temp dir (the default data dir with it). */
  async cleanup() {
    await this._signal("SIGKILL");
    await this._removeWorkDir();
  }

  async _removeWorkDir() {
    await rm(this.workDir, { recursive: true, force: true });
    leftBehind.delete(this.workDir);
  }

  _auth(token) {
    const t = token ?? this.adminToken;
    return t ? { authorization: `Bearer ${t}` } : {};
  }

  /**
   * Any HTTP request to the broker: `path` like "/v1/topics". Resolves
   * `{ status, headers, text, json }` whatever the status.
   */
  request(method, urlPath, { body, headers = {}, token } = {}) {
    return httpRequest(this.httpUrl + urlPath, { method, body, headers: { ...this._auth(token), ...headers } });
  }

  async _ok(what, reply) {
    if (reply.status < 200 || reply.status > 299) {
      const err = new Error(`${what}: HTTP ${reply.status} ${reply.text}`);
      err.status = reply.status;
      err.body = reply.json;
      throw err;
    }
    return reply.json;
  }

  /**
   * POST /v1/topics/{topic}/events?type=…: `body` a string or bytes as is,
   * anything else as JSON; `headers` become event headers. Resolves the ack
   * `{ epoch, offset, version, duplicate }`; throws on an error status.
   * opts: { token, idempotencyKey }.
   */
  async publish(topic, type, body, headers = {}, { token, idempotencyKey } = {}) {
    const h = {};
    for (const [k, v] of Object.entries(headers)) h[`x-ringcast-header-${k}`] = String(v);
    if (idempotencyKey) h["idempotency-key"] = idempotencyKey;
    const payload = typeof body === "string" || body instanceof Uint8Array ? body : JSON.stringify(body);
    const reply = await this.request(
      "POST",
      `/v1/topics/${encodeURIComponent(topic)}/events?type=${encodeURIComponent(type)}`,
      { body: payload, headers: h, token },
    );
    return this._ok(`publish ${topic}/${type}`, reply);
  }

  /**
   * GET /v1/topics/{topic}/history, every page from `after` (default 0):
   * `{ epoch, events, first_available, last_offset }`.
   * opts: { after, types: [], token }.
   */
  async history(topic, { after = 0, types, token } = {}) {
    const events = [];
    let page;
    for (;;) {
      const q = new URLSearchParams({ after: String(after), limit: "1000" });
      if (types?.length) q.set("types", types.join(","));
      page = await this._ok(
        `history ${topic}`,
        await this.request("GET", `/v1/topics/${encodeURIComponent(topic)}/history?${q}`, { token }),
      );
      events.push(...page.events);
      if (page.events.length === 0 || page.next_after >= page.last_offset) break;
      after = page.next_after;
    }
    return { epoch: page.epoch, events, first_available: page.first_available, last_offset: page.last_offset };
  }

  /** GET /v1/topics/{topic}. */
  async info(topic, { token } = {}) {
    return this._ok(`info ${topic}`, await this.request("GET", `/v1/topics/${encodeURIComponent(topic)}`, { token }));
  }

  /** POST /v1/topics/{topic}/seal. */
  async seal(topic, { token } = {}) {
    return this._ok(`seal ${topic}`, await this.request("POST", `/v1/topics/${encodeURIComponent(topic)}/seal`, { token }));
  }

  /** DELETE /v1/topics/{topic}. */
  async deleteTopic(topic, { token } = {}) {
    return this._ok(`delete ${topic}`, await this.request("DELETE", `/v1/topics/${encodeURIComponent(topic)}`, { token }));
  }

  /** GET /v1/stats. */
  async stats({ token } = {}) {
    return this._ok("stats", await this.request("GET", "/v1/stats", { token }));
  }
}

function splitAddr(addr) {
  const i = addr.lastIndexOf(":");
  return [addr.slice(0, i).replace(/^\[|\]$/g, ""), Number(addr.slice(i + 1))];
}

/** A random secret for HS256 (48 bytes, base64). */
export function randomSecret() {
  return randomBytes(48).toString("base64");
}
