// The browser helper (src/browser.ts, built to dist/browser.js) in a real
// headless Chromium against the real ringcastd.
//
//   npx tsc -p tsconfig.json && node --test test/browser.test.mjs
//
// Needs Chromium (Debian's `chromium`, or $CHROMIUM); without it every test
// here is skipped with a message saying so. The page (test/browser/page.html)
// is served by a Node server of its own — another origin than the broker,
// which lists it in server.cors_origins — and reports everything it sees
// back to that server; the tests await those reports, never a timer.
//
// RINGCAST_BROWSER_JS=<file> tests another build of the helper than
// dist/browser.js (e.g. a deliberately broken copy, to see a test fail).
//
// Scenarios, each asserting every event exactly once and in offset order
// per topic:
//   (a) one EventSource over two named topics and a pattern, across a
//       broker kill -9 and restart, with events published while the page
//       cannot reconnect (a proxy refuses it), a matching topic created
//       meanwhile included;
//   (b) a retention gap while away: onGap once, for that topic only, and
//       the page's refetch gets the state;
//   (c) JWT auth with short-lived tokens (query token, then cookie): on
//       token_expired the helper renews and resumes exactly;
//   (d) a sealed single topic: onEnd, the stream closes, no reconnect; a
//       later stream after the last id gets 204 and closes too.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { jwtClaims, mintJwt, randomSecret, startBroker } from "./helpers/broker.mjs";
import { chromiumAvailable, launchChromium, startPageServer } from "./helpers/chromium.mjs";
import { startProxy } from "./helpers/proxy.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
/** The helper as built by tsc; RINGCAST_BROWSER_JS may name another build of it. */
const BUILT = process.env.RINGCAST_BROWSER_JS
  ? path.resolve(process.env.RINGCAST_BROWSER_JS)
  : path.resolve(here, "../dist/browser.js");
/** How long the browser may take to reach each awaited state (a loaded 2-core machine). */
const WAIT = 60_000;
/** Each test: several WAITs at most. */
const TEST_TIMEOUT = 300_000;

const skip = chromiumAvailable()
  ? false
  : "Chromium not found: install Debian's chromium (sudo apt-get install -y chromium) or set CHROMIUM; skipping the real-browser tests";
if (skip) console.log(skip);

// ------------------------------------------------------------ fixtures

/**
 * Everything one scenario runs: the page server (with a /token endpoint
 * that hands out tokens only as the test allows), the broker, an optional
 * proxy in front of its HTTP port, and Chromium once `openPage` is called.
 * `t.after` tears it all down, also when the test fails.
 */
async function setup(t, { broker: brokerOpts = {}, proxy: withProxy = false, jwt } = {}) {
  assert.ok(
    existsSync(BUILT),
    `${BUILT} is missing: build first (npx tsc -p tsconfig.json; npm test does it)`,
  );
  const tokens = tokenEndpoint(jwt);
  const server = await startPageServer({
    files: {
      "/": path.join(here, "browser/page.html"),
      "/dist/browser.js": BUILT,
    },
    routes: { "/token": tokens.route },
  });
  const fx = { server, tokens, broker: undefined, proxy: undefined, chrome: undefined };
  t.after(async () => {
    await fx.chrome?.close();
    await fx.proxy?.close();
    await fx.broker?.cleanup();
    await server.close();
  });
  const config = brokerOpts.config ?? {};
  fx.broker = await startBroker({
    ...brokerOpts,
    jwt: jwt ? { secret: jwt.secret, audience: jwt.audience } : undefined,
    config: { ...config, server: { ...config.server, cors_origins: [server.origin] } },
  });
  if (withProxy) fx.proxy = await startProxy("127.0.0.1", fx.broker.httpPort);
  const streamBase = withProxy ? `http://127.0.0.1:${fx.proxy.port}` : fx.broker.httpUrl;
  fx.openPage = async (cfg) => {
    const full = { broker: streamBase, api: fx.broker.httpUrl, tokenPath: "/token", ...cfg };
    fx.chrome = await launchChromium(server.url(`/?cfg=${encodeURIComponent(JSON.stringify(full))}`));
  };
  /** Waits for a report; on timeout the error also shows Chromium's log tail. */
  fx.waitFor = async (predicate, what, opts) => {
    try {
      return await server.waitFor(predicate, WAIT, what, opts);
    } catch (e) {
      const log = (fx.chrome?.log ?? "").split("\n").filter((l) => !/dbus|D-Bus/i.test(l));
      e.message += `\nChromium log tail:\n${log.join("\n").slice(-3000)}`;
      throw e;
    }
  };
  return fx;
}

/**
 * GET /token as a site's backend: each request waits for a permit the test
 * hands out (allow), then mints a JWT for subject "page" that may read
 * page.* for `ttlSeconds` — as the body, or with ?cookie=1 as the
 * ringcast_token cookie.
 */
function tokenEndpoint(jwt) {
  let permits = 0;
  const waiting = [];
  const requested = [];
  let issued = 0;
  const listeners = new Set();
  const serve = () => {
    while (permits > 0 && waiting.length) {
      permits -= 1;
      const { res, url } = waiting.shift();
      issued += 1;
      const token = mintJwt(
        jwt.secret,
        jwtClaims({ sub: "page", ttlSeconds: jwt.ttlSeconds, subscribe: ["page.*"], audience: jwt.audience }),
      );
      const headers = { "cache-control": "no-store", "content-type": "text/plain" };
      if (url.searchParams.has("cookie")) {
        // Cookies do not tell ports apart: set on 127.0.0.1 here, sent to the broker's port too.
        headers["set-cookie"] = `ringcast_token=${token}; Path=/; SameSite=Lax; HttpOnly`;
        res.writeHead(200, headers).end("cookie set");
      } else {
        res.writeHead(200, headers).end(token);
      }
    }
  };
  return {
    route(req, res, url) {
      if (!jwt) {
        res.writeHead(404).end();
        return;
      }
      requested.push(Date.now());
      waiting.push({ res, url });
      for (const l of [...listeners]) l();
      serve();
    },
    allow(n) {
      permits += n;
      serve();
    },
    get issued() {
      return issued;
    },
    get requested() {
      return requested.length;
    },
    /** Resolves once `n` tokens were asked for in all. */
    requestedAtLeast(n) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          listeners.delete(check);
          reject(new Error(`the page asked for ${requested.length} tokens, not ${n}, within ${WAIT} ms`));
        }, WAIT);
        const check = () => {
          if (requested.length >= n) {
            clearTimeout(timer);
            listeners.delete(check);
            resolve();
          }
        };
        listeners.add(check);
        check();
      });
    },
  };
}

// ------------------------------------------------------------ report queries

const of = (reports, kind, stream = "main") => reports.filter((r) => r.kind === kind && r.stream === stream);
const eventsOf = (reports, stream) => of(reports, "event", stream);
/** Each topic's offsets in arrival order. */
function byTopic(events) {
  const out = {};
  for (const e of events) (out[e.topic] ??= []).push(e.offset);
  return out;
}
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const countIs = (kind, n, stream = "main") => (_, all) => of(all, kind, stream).length >= n;
const show = (reports) => reports.map((r) => JSON.stringify(r)).join("\n");

async function publishRange(broker, topic, from, to) {
  for (let n = from; n <= to; n++) {
    const ack = await broker.publish(topic, "token", { n });
    assert.equal(ack.offset, n, `${topic}: publish ${n} got offset ${ack.offset}`);
  }
}

/** The page's reports must be in the order it sent them (one POST at a time). */
function assertOrdered(reports) {
  reports.forEach((r, i) => assert.equal(r.seq, i, `report ${i} has seq ${r.seq}`));
}

// ------------------------------------------------------------ (a)

const ALPHA = "page.alpha";
const BETA = "page.beta";
const ORDERS = "page.orders.*";
const EU = "page.orders.eu"; // exists before the page connects
const US = "page.orders.us"; // created while it is connected
const APAC = "page.orders.apac"; // created while it is away

test("(a) one stream over two topics and a pattern resumes each exactly across kill -9 and restart", { skip, timeout: TEST_TIMEOUT }, async (t) => {
  // fsync: a kill -9 loses nothing acknowledged and keeps the epochs.
  const fx = await setup(t, { broker: { durability: "fsync" }, proxy: true });
  const { broker, proxy, server } = fx;
  for (const topic of [ALPHA, BETA, EU]) await publishRange(broker, topic, 1, 3);
  const epochs = {};
  for (const topic of [ALPHA, BETA, EU]) epochs[topic] = (await broker.info(topic)).epoch;

  await fx.openPage({ topics: [ALPHA, BETA, ORDERS], types: ["token"], earliest: true });
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 9, "the 9 retained events");
  for (const topic of [ALPHA, BETA, EU]) await publishRange(broker, topic, 4, 6);
  await publishRange(broker, US, 1, 3);
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 21, "the 12 live events");

  // The crash. The proxy refuses every reconnect until the test lets it
  // through, so what follows is certainly published while the page is away.
  const beforeCrash = server.mark();
  proxy.pause();
  await broker.kill();
  await fx.waitFor((r) => r.kind === "state" && r.state === "reconnecting", "the page saw the connection drop", { from: beforeCrash });
  const refusedFrom = proxy.relayed;
  await broker.restart();
  for (const topic of [ALPHA, BETA, EU]) {
    assert.equal((await broker.info(topic)).epoch, epochs[topic], `${topic}: the epoch survives kill -9 in fsync mode`);
  }
  for (const topic of [ALPHA, BETA, EU]) await publishRange(broker, topic, 7, 9);
  await publishRange(broker, US, 4, 6);
  await publishRange(broker, APAC, 1, 3);
  assert.equal(eventsOf(server.reports, "main").length, 21, "nothing arrived while the proxy refused the page");
  assert.equal(proxy.relayed, refusedFrom, "no reconnect got through the paused proxy");
  const beforeResume = server.mark();
  proxy.resume();
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 36, "the 15 events published while the page was away");
  const resumedReady = of(server.reports.slice(beforeResume), "ready");
  assert.equal(resumedReady.length, 1, `one reconnect:\n${show(server.reports.slice(beforeResume))}`);
  assert.deepEqual(
    resumedReady[0].ready.topics.map((x) => x.topic).sort(),
    [ALPHA, APAC, BETA, EU, US].sort(),
    "the resumed stream holds every topic, the one created while away included",
  );

  // Live again, then every topic ends.
  for (const topic of [ALPHA, BETA, EU]) await publishRange(broker, topic, 10, 12);
  await publishRange(broker, US, 7, 9);
  await publishRange(broker, APAC, 4, 6);
  const all = [ALPHA, BETA, EU, US, APAC];
  for (const topic of all) await broker.seal(topic);
  await fx.waitFor(countIs("end", 5), "an end for each topic");

  const reports = server.reports;
  assertOrdered(reports);
  const events = eventsOf(reports, "main");
  assert.deepEqual(
    byTopic(events),
    { [ALPHA]: range(1, 12), [BETA]: range(1, 12), [EU]: range(1, 12), [US]: range(1, 9), [APAC]: range(1, 6) },
    `every event of every topic exactly once, in order:\n${show(events)}`,
  );
  assert.equal(new Set(events.map((e) => e.id)).size, events.length, "every event has an id of its own");
  assert.deepEqual(events.map((e) => e.data.n), events.map((e) => e.offset), "the payload is the JSON published");
  assert.equal(of(reports, "gap").length, 0, `no gap:\n${show(of(reports, "gap"))}`);
  assert.deepEqual(of(reports, "end").map((e) => e.topic).sort(), [...all].sort(), "one end per topic");
  assert.equal(of(reports, "ready").length, 2, "connected, then reconnected once");
  // EventSource resumed by itself (its Last-Event-ID): the helper made one
  // EventSource, and with a pattern in it the stream stays open after the ends.
  assert.equal(of(reports, "es-new").length, 1, `one EventSource:\n${show(of(reports, "es-new"))}`);
  assert.ok(of(reports, "es-error").every((e) => e.readyState === 0), "EventSource never gave up");
  assert.equal(of(reports, "state").at(-1)?.state, "open");
  assert.deepEqual(of(reports, "page-error", "page"), []);
});

// ------------------------------------------------------------ (b)

const GAP_A = "page.gap.a";
const GAP_B = "page.gap.b";

test("(b) a retention gap while away: one onGap for that topic, the refetch gets its state, the other topic resumes exactly", { skip, timeout: TEST_TIMEOUT }, async (t) => {
  const fx = await setup(t, {
    broker: { durability: "memory", config: { topics: { override: [{ pattern: "page.gap.*", max_events: 3 }] } } },
    proxy: true,
  });
  const { broker, proxy, server } = fx;
  await publishRange(broker, GAP_A, 1, 2);
  await publishRange(broker, GAP_B, 1, 2);
  await fx.openPage({ topics: [GAP_A, GAP_B], types: ["token"], earliest: true });
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 4, "the 4 retained events");

  // Away: the proxy cuts the stream and refuses reconnects. A moves on
  // past its retention (3 events), B stays within it.
  const beforeCut = server.mark();
  proxy.pause();
  proxy.cutAll();
  await fx.waitFor((r) => r.kind === "state" && r.state === "reconnecting", "the page saw the cut", { from: beforeCut });
  await publishRange(broker, GAP_A, 3, 10);
  await publishRange(broker, GAP_B, 3, 4);
  assert.equal((await broker.info(GAP_A)).first_offset, 8, "A retains only 8..10");
  proxy.resume();
  // A gap means: the events of A after offset 2 up to gap.current are lost
  // to this stream, which goes on live after them (README "Concepts"); the
  // page refetches A's state.
  await fx.waitFor(
    (_, all) => of(all, "refetched").length >= 1 && eventsOf(all, "main").length >= 6,
    "the gap, the refetch and B's events published while away",
  );

  // Live after the gap, on both topics.
  await publishRange(broker, GAP_A, 11, 11);
  await publishRange(broker, GAP_B, 5, 5);
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 8, "the live events after the gap");

  const reports = server.reports;
  assertOrdered(reports);
  const gaps = of(reports, "gap");
  assert.equal(gaps.length, 1, `one gap:\n${show(gaps)}`);
  assert.deepEqual(
    { topic: gaps[0].topic, reason: gaps[0].reason, requested: gaps[0].requested, first_available: gaps[0].first_available, current: gaps[0].current },
    { topic: GAP_A, reason: "retention", requested: 2, first_available: 8, current: 10 },
  );
  assert.match(gaps[0].id, /^[A-Za-z0-9_-]+$/, "the gap has an id (a reconnect does not repeat it)");
  const events = eventsOf(reports, "main");
  assert.deepEqual(
    byTopic(events),
    { [GAP_A]: [1, 2, 11], [GAP_B]: range(1, 5) },
    `A: up to the gap, then live; B: everything, exactly once:\n${show(events)}`,
  );
  const gapAt = reports.indexOf(gaps[0]);
  const liveA = reports.findIndex((r) => r.kind === "event" && r.topic === GAP_A && r.offset === 11);
  const lastBeforeA = reports.findIndex((r) => r.kind === "event" && r.topic === GAP_A && r.offset === 2);
  assert.ok(lastBeforeA < gapAt && gapAt < liveA, "A's gap comes between its events 2 and 11");
  const [refetched] = of(reports, "refetched");
  assert.deepEqual(
    { status: refetched.status, topic: refetched.topic, offsets: refetched.offsets, last_offset: refetched.last_offset },
    { status: 200, topic: GAP_A, offsets: [8, 9, 10], last_offset: 10 },
    "the refetch (history, cross-origin) got A's state up to the gap's current offset",
  );
  assert.equal(of(reports, "es-new").length, 1, "EventSource resumed by itself");
  assert.deepEqual(of(reports, "page-error", "page"), []);
});

// ------------------------------------------------------------ (c)

for (const auth of ["query", "cookie"]) {
  test(`(c) token_expired (${auth} token): the helper renews and resumes exactly`, { skip, timeout: TEST_TIMEOUT }, async (t) => {
    // Tokens live 5 s (exp has whole seconds, leeway 0): long enough to
    // connect on a loaded machine, short enough to expire mid-test.
    const jwt = { secret: randomSecret(), audience: "ringcast-tests", ttlSeconds: 5 };
    const fx = await setup(t, { broker: { durability: "memory" }, jwt });
    const { broker, server, tokens } = fx;
    const topic = `page.secure-${auth}`;
    await publishRange(broker, topic, 1, 3);

    tokens.allow(1);
    await fx.openPage({ topics: topic, types: ["token"], earliest: true, auth });
    await fx.waitFor((_, all) => eventsOf(all, "main").length >= 3, "the 3 retained events");
    // Live, or after the renewal if the token expires first: either way once.
    await publishRange(broker, topic, 4, 5);

    // The token expires; the helper asks for a new one, which the test holds
    // back while more events are published.
    await tokens.requestedAtLeast(2);
    assert.equal(tokens.issued, 1);
    await publishRange(broker, topic, 6, 8);
    const beforeRenewal = server.mark();
    tokens.allow(1);
    await fx.waitFor((_, all) => eventsOf(all, "main").length >= 8, "the events published while it had no token");
    assert.ok(of(server.reports.slice(beforeRenewal), "ready").length >= 1, "a new stream after the renewal");

    // From now on every renewal is served at once; the stream may expire
    // and renew again meanwhile.
    tokens.allow(1000);
    await publishRange(broker, topic, 9, 10);
    await broker.seal(topic);
    await fx.waitFor((r) => r.kind === "state" && r.state === "closed", "the end and the close");

    const reports = server.reports;
    assertOrdered(reports);
    const events = eventsOf(reports, "main");
    assert.deepEqual(events.map((e) => e.offset), range(1, 10), `every offset exactly once, in order, across the expiry:\n${show(events)}`);
    assert.equal(of(reports, "gap").length, 0);
    assert.deepEqual(of(reports, "end").map((e) => e.last_offset), [10]);
    const last = of(reports, "state").at(-1);
    assert.deepEqual([last.state, last.reason], ["closed", "ended"]);
    assert.deepEqual(of(reports, "error"), [], "token_expired is handled, not passed on");
    assert.match(broker.log, /SSE stream ended: the token expired/, "the broker ended a stream at the token's expiry");

    // Each renewal is the helper's own reopen after token_expired, with a
    // fresh credential and the last id: never EventSource's reconnect with
    // the expired one (which the broker refuses with 401, after which
    // EventSource gives up).
    const made = of(reports, "es-new");
    assert.ok(made.length >= 2, `renewed at least once:\n${show(made)}`);
    assert.deepEqual(of(reports, "es-error").filter((e) => e.readyState === 2), [], "EventSource never gave up");
    assert.equal(of(reports, "ready").length, made.length, "every EventSource was accepted, each once");
    made.forEach((m, i) => {
      const url = new URL(m.url);
      if (i === 0) {
        assert.equal(url.searchParams.get("earliest"), "true");
        assert.equal(url.searchParams.get("last_event_id"), null);
      } else {
        assert.match(url.searchParams.get("last_event_id") ?? "", /^\d+:\d+$/, m.url);
      }
      if (auth === "query") assert.equal(url.searchParams.get("access_token"), `token#${i + 1}`, "a fresh token each time");
      else assert.equal(url.searchParams.get("access_token"), null);
      assert.equal(m.withCredentials, auth === "cookie");
    });
    assert.equal(tokens.issued, made.length, "one token per EventSource");
    assert.deepEqual(of(reports, "page-error", "page"), []);
  });
}

// ------------------------------------------------------------ (d)

test("(d) a sealed single topic: onEnd, the stream closes without reconnecting; resuming after its end gets 204", { skip, timeout: TEST_TIMEOUT }, async (t) => {
  const fx = await setup(t, { broker: { durability: "memory" }, proxy: true });
  const { broker, proxy, server } = fx;
  const topic = "page.answer";
  await publishRange(broker, topic, 1, 3);
  await fx.openPage({ topics: topic, types: ["token"], earliest: true, reopenAfterEnd: true, quietMs: 5000 });
  await fx.waitFor((_, all) => eventsOf(all, "main").length >= 3, "the 3 retained events");
  await publishRange(broker, topic, 4, 5);
  await broker.seal(topic);

  // "main" ends; the page then opens "again" after main's last id, which
  // the broker answers with 204 (EventSource stops: closed, refused).
  const closed = await fx.waitFor((r) => r.kind === "state" && r.stream === "again" && r.state === "closed", "the second stream closed");
  const relayedAtClose = proxy.relayed;
  // The page reports "quiet" 5 s (more than the broker's retry: 2000) after
  // that close: any reconnect loop would have shown by then.
  await fx.waitFor((r) => r.kind === "quiet", "the quiet period after the close");

  const reports = server.reports;
  assertOrdered(reports);
  assert.deepEqual(eventsOf(reports, "main").map((e) => e.offset), range(1, 5), "every event once");
  assert.deepEqual(of(reports, "end").map((e) => [e.topic, e.last_offset]), [[topic, 5]]);
  const mainStates = of(reports, "state").map((s) => [s.state, s.reason]);
  assert.deepEqual(mainStates, [["open", null], ["closed", "ended"]], "main: open, then closed by its end");
  assert.equal(of(reports, "es-new").length, 1);
  assert.deepEqual(of(reports, "es-error"), [], "main closed at its end: EventSource never reconnected");

  const mainLast = of(reports, "state").at(-1).lastEventId;
  assert.equal(mainLast, eventsOf(reports, "main").at(-1).id, "lastEventId is the last event's id");
  const again = reports.filter((r) => r.stream === "again");
  assert.deepEqual(
    again.filter((r) => r.kind !== "quiet").map((r) => (r.kind === "state" ? `state:${r.state}:${r.reason}` : r.kind === "es-error" ? `es-error:${r.readyState}` : r.kind)),
    ["es-new", "es-error:2", "state:closed:refused"],
    `again: 204, closed, nothing else:\n${show(again)}`,
  );
  assert.equal(new URL(again[0].url).searchParams.get("last_event_id"), mainLast);
  assert.equal(closed.reason, "refused");
  assert.equal(proxy.relayed, relayedAtClose, "no connection after the close");
  assert.deepEqual(of(reports, "page-error", "page"), []);
});
