// Test helper: headless Chromium without WebDriver. The test serves a page
// from a small Node HTTP server (startPageServer); the page POSTs what
// happens to it back to that server, and the test awaits those reports
// (server.waitFor) — no polling of the browser, no fixed sleeps.
//
//   const server = await startPageServer({ files: { "/": pageHtml, "/dist/browser.js": built } });
//   const chrome = await launchChromium(server.url("/?cfg=..."));
//   const report = await server.waitFor((r) => r.kind === "ready", 60_000, "the stream opened");
//   await chrome.close(); await server.close();

import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import http from "node:http";
import os from "node:os";
import path from "node:path";

/** Most bytes of Chromium's stderr kept for error messages. */
const LOG_KEEP = 64 * 1024;

function executable(p) {
  try {
    accessSync(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The Chromium binary: $CHROMIUM, else `chromium` (Debian's package) or
 * `chromium-browser` on PATH; undefined when there is none.
 */
export function chromiumPath() {
  if (process.env.CHROMIUM) return executable(process.env.CHROMIUM) ? process.env.CHROMIUM : undefined;
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (!dir) continue;
    for (const name of ["chromium", "chromium-browser"]) {
      const p = path.join(dir, name);
      if (executable(p)) return p;
    }
  }
  return undefined;
}

/** Whether a Chromium to launch is installed. */
export function chromiumAvailable() {
  return chromiumPath() !== undefined;
}

/**
 * Opens `url` in a fresh headless Chromium (its own temp profile). Resolves
 * `{ close(), log, pid }` once the process runs; close() ends it (its whole
 * process group) and removes the profile. `log` is the tail of Chromium's
 * stderr (the page's console messages included).
 */
export async function launchChromium(url, { args = [] } = {}) {
  const bin = chromiumPath();
  if (!bin) throw new Error("no Chromium: install Debian's chromium package (apt-get install -y chromium) or set CHROMIUM");
  const profile = await mkdtemp(path.join(os.tmpdir(), "ringcast-chromium-"));
  const child = spawn(
    bin,
    [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-background-networking",
      "--disable-background-timer-throttling",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
      "--no-first-run",
      "--no-default-browser-check",
      "--enable-logging=stderr",
      "--v=0",
      `--user-data-dir=${profile}`,
      ...args,
      url,
    ],
    // Its own process group: close() ends the renderers and helpers too.
    { detached: true, stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (c) => {
    log = (log + c).slice(-LOG_KEEP);
  });
  const exited = new Promise((resolve) => child.on("close", (code, signal) => resolve({ code, signal })));
  let running = true;
  exited.then(() => {
    running = false;
  });
  await new Promise((resolve, reject) => {
    child.once("spawn", resolve);
    child.once("error", (e) => reject(new Error(`cannot run ${bin}: ${e.message}`)));
  });
  const signalGroup = (sig) => {
    try {
      process.kill(-child.pid, sig);
    } catch {
      // already gone
    }
  };
  return {
    pid: child.pid,
    get log() {
      return log;
    },
    get running() {
      return running;
    },
    exited,
    async close() {
      if (running) {
        signalGroup("SIGTERM");
        const timer = setTimeout(() => signalGroup("SIGKILL"), 5_000);
        await exited;
        clearTimeout(timer);
      }
      signalGroup("SIGKILL"); // helpers that outlived the browser process
      await rm(profile, { recursive: true, force: true, maxRetries: 3 });
    },
  };
}

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".map": "application/json",
  ".json": "application/json",
  ".css": "text/css",
};

/**
 * A static server for the test page, on 127.0.0.1:0 (an origin of its own,
 * never the broker's), that also collects what the page reports.
 *
 * opts:
 * - files: { "/path": "/absolute/file" | { body, type } }; "/" serves the
 *   page. Files are read at each request (a rebuilt dist/ is picked up).
 * - routes: { "/path": (req, res, url) => void }: handlers of their own
 *   (e.g. a token endpoint).
 *
 * POST /report with a JSON object or an array of them appends each to
 * `reports` (in the order received; a page should send them one request at
 * a time to keep its order).
 *
 * Resolves `{ port, origin, url(path), reports, mark(), waitFor(), close() }`.
 */
export async function startPageServer({ files = {}, routes = {} } = {}) {
  const reports = [];
  const waiters = new Set();
  const notify = () => {
    for (const w of [...waiters]) w.check();
  };
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    try {
      if (req.method === "POST" && url.pathname === "/report") {
        const chunks = [];
        for await (const c of req) chunks.push(c);
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        for (const r of Array.isArray(body) ? body : [body]) reports.push(r);
        res.writeHead(204, { "cache-control": "no-store" }).end();
        notify();
        return;
      }
      const route = routes[url.pathname];
      if (route) {
        await route(req, res, url);
        return;
      }
      const file = files[url.pathname];
      if (req.method === "GET" && file !== undefined) {
        const { body, type } =
          typeof file === "string"
            ? { body: await readFile(file), type: TYPES[path.extname(file)] ?? "application/octet-stream" }
            : file;
        res.writeHead(200, { "content-type": type ?? "text/plain", "cache-control": "no-store" }).end(body);
        return;
      }
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
    } catch (e) {
      if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain" });
      res.end(String(e && e.stack ? e.stack : e));
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const port = server.address().port;
  const origin = `http://127.0.0.1:${port}`;
  return {
    port,
    origin,
    url: (p = "/") => origin + p,
    reports,
    /** The number of reports so far: pass it as waitFor's `from`. */
    mark: () => reports.length,
    /**
     * Resolves with the first report (index >= `from`, already received
     * or still to come) for which `predicate(report, reportsSoFar)` holds;
     * rejects after `timeoutMs` with `what` and the last reports.
     */
    waitFor(predicate, timeoutMs = 60_000, what = "a report", { from = 0 } = {}) {
      return new Promise((resolve, reject) => {
        let next = from;
        const waiter = {
          check() {
            while (next < reports.length) {
              const r = reports[next];
              next += 1;
              let ok;
              try {
                ok = predicate(r, reports.slice(0, next));
              } catch (e) {
                done();
                reject(e);
                return;
              }
              if (ok) {
                done();
                resolve(r);
                return;
              }
            }
          },
        };
        const timer = setTimeout(() => {
          done();
          const last = reports.slice(-15).map((r) => JSON.stringify(r));
          reject(
            new Error(
              `timed out after ${timeoutMs} ms waiting for ${what}; ${reports.length} reports, ` +
                `last report: ${last.at(-1) ?? "none"}\nlast reports:\n${last.join("\n")}`,
            ),
          );
        }, timeoutMs);
        const done = () => {
          clearTimeout(timer);
          waiters.delete(waiter);
        };
        waiter.cancel = done;
        waiters.add(waiter);
        waiter.check();
      });
    },
    close() {
      for (const w of [...waiters]) w.cancel(); // left pending: the test is over
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
