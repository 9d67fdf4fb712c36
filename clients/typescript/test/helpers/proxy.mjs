// Test helper: a TCP relay on 127.0.0.1:0 in front of a broker port, so a
// test can cut its clients' connections mid-stream and keep them from
// reconnecting for as long as it needs.
//
//   const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
//   client connects to 127.0.0.1:proxy.port
//   proxy.pause(); proxy.cutAll();   // drop everything; reconnects are refused
//   ... publish while the client is away ...
//   proxy.resume();                  // the client's next reconnect gets through
//   await proxy.close();

import net from "node:net";

/**
 * Starts a relay to `upstreamHost:upstreamPort` (looked up again for each
 * connection: the broker may restart on the same port meanwhile).
 *
 * Resolves `{ port, cutAll(), pause(), resume(), paused, connections,
 * accepted, blackhole(), closedByClient, until(), close() }`:
 * - cutAll(): destroys every live pair at once (both sides see a reset/EOF).
 * - pause(): from now on every new connection is closed as soon as it is
 *   accepted (the client sees a connection error, as with a broker that is
 *   down) until resume(). Live pairs are left alone: cutAll() for them.
 * - connections: the number of live pairs; accepted: connections accepted
 *   so far, paused ones included; relayed: those passed to the upstream.
 * - blackhole(): every live pair stops forwarding both ways, and the
 *   client's side is never closed by the proxy (a silent peer);
 *   closedByClient counts such pairs the client gave up on.
 * - until(pred): resolves once pred(proxy) holds after a connection change.
 * - close(): stops listening and destroys every pair.
 */
export async function startProxy(upstreamHost, upstreamPort) {
  const pairs = new Set();
  let paused = false;
  const state = { accepted: 0, relayed: 0, closedByClient: 0 };
  const waiters = new Set();
  const notify = () => {
    for (const w of [...waiters]) w();
  };
  const server = net.createServer((down) => {
    state.accepted += 1;
    notify();
    if (paused) {
      down.destroy();
      return;
    }
    state.relayed += 1;
    down.pause();
    const up = net.connect({ host: upstreamHost, port: upstreamPort });
    const pair = { down, up, holed: false };
    pairs.add(pair);
    const end = () => {
      if (pair.holed) {
        // A black hole: the broker's side may go, the client sees nothing.
        up.destroy();
        return;
      }
      pairs.delete(pair);
      down.destroy();
      up.destroy();
      notify();
    };
    down.on("error", () => undefined);
    up.on("error", end);
    up.on("close", end);
    down.on("close", () => {
      if (pair.holed) {
        state.closedByClient += 1;
        pairs.delete(pair);
        up.destroy();
        notify();
      } else {
        end();
      }
    });
    up.on("connect", () => {
      down.pipe(up);
      up.pipe(down);
      down.resume();
    });
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const destroyAll = () => {
    for (const { down, up } of [...pairs]) {
      down.destroy();
      up.destroy();
    }
    pairs.clear();
    notify();
  };
  return {
    port: server.address().port,
    host: "127.0.0.1",
    cutAll: destroyAll,
    pause() {
      paused = true;
    },
    resume() {
      paused = false;
    },
    get paused() {
      return paused;
    },
    get connections() {
      return pairs.size;
    },
    get live() {
      return pairs.size;
    },
    get accepted() {
      return state.accepted;
    },
    get relayed() {
      return state.relayed;
    },
    get closedByClient() {
      return state.closedByClient;
    },
    /** Live pairs stop forwarding (both ways) and the client's side is never closed by the proxy. */
    blackhole() {
      let n = 0;
      for (const pair of pairs) {
        if (pair.holed) continue;
        pair.holed = true;
        n += 1;
        pair.down.unpipe(pair.up);
        pair.up.unpipe(pair.down);
        // Keep reading the client's side (so its writes never block) and drop it.
        pair.down.removeAllListeners("data");
        pair.down.on("data", () => undefined);
        pair.down.resume();
        pair.up.pause();
      }
      return n;
    },
    /** Resolves once `pred(proxy)` holds (checked on every connection change), or rejects after `timeoutMs`. */
    until(pred, { timeoutMs = 30_000, what = "proxy condition" } = {}) {
      return new Promise((resolve, reject) => {
        const check = () => {
          if (pred(this)) {
            clearTimeout(timer);
            waiters.delete(check);
            resolve();
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    close() {
      destroyAll();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
