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
 * accepted, close() }`:
 * - cutAll(): destroys every live pair at once (both sides see a reset/EOF).
 * - pause(): from now on every new connection is closed as soon as it is
 *   accepted (the client sees a connection error, as with a broker that is
 *   down) until resume(). Live pairs are left alone: cutAll() for them.
 * - connections: the number of live pairs; accepted: connections accepted
 *   so far, paused ones included; relayed: those passed to the upstream.
 * - close(): stops listening and destroys every pair.
 */
export async function startProxy(upstreamHost, upstreamPort) {
  const pairs = new Set();
  let paused = false;
  let accepted = 0;
  let relayed = 0;
  const server = net.createServer((down) => {
    accepted += 1;
    if (paused) {
      down.destroy();
      return;
    }
    relayed += 1;
    down.pause();
    const up = net.connect({ host: upstreamHost, port: upstreamPort });
    const pair = { down, up };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on("error", end);
    up.on("error", end);
    down.on("close", end);
    up.on("close", end);
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
  const port = server.address().port;
  return {
    port,
    host: "127.0.0.1",
    cutAll() {
      for (const { down, up } of [...pairs]) {
        down.destroy();
        up.destroy();
      }
      pairs.clear();
    },
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
    get accepted() {
      return accepted;
    },
    get relayed() {
      return relayed;
    },
    close() {
      for (const { down, up } of [...pairs]) {
        down.destroy();
        up.destroy();
      }
      pairs.clear();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
