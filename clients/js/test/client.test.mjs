// @herald/client against a real gateway (`herald serve`), over a real
// WebSocket (the `ws` package stands in for the browser's WebSocket class,
// which Node 20 lacks): stats, the offline queue, rpc/publish rejections,
// timeouts, and giving up after maxAttempts.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WebSocket } from "ws";

import { HeraldClient, HeraldError, STATES } from "../dist/index.js";
import { Gateway, freePort, rejection, sleep, token, until } from "./gateway.mjs";

globalThis.WebSocket = WebSocket;

let gw;
before(async () => { gw = await Gateway.start(); });
after(async () => { await gw.stop(); });

const FAST = { backoffInitialMs: 20, backoffMaxMs: 100, openTimeoutMs: 2000 };

function client(sub, options = {}) {
  return new HeraldClient({ url: gw.url, token: token(sub), ...FAST, ...options });
}

test("stats: connectedAt, lastMessageAt and the ping round trip", async () => {
  const c = client("stats-user");
  const seen = [];
  c.subscribe("user:stats-user", { onMessage: (m) => seen.push(m.offset) });
  const before = Date.now();
  c.connect();
  try {
    await until(() => c.state === "connected", { what: "connected" });
    assert.ok(c.stats.connectedAt >= before);
    assert.equal(c.stats.lastMessageAt, null);
    await until(() => c.stats.latency !== null, { what: "a pong" }); // the first ping goes at once
    assert.ok(c.stats.latency >= 0 && c.stats.latency < 5000);
    const { status } = await gw.post("/api/v1/publish", { channel: "user:stats-user", event: "e", data: { n: 1 } });
    assert.equal(status, 200);
    await until(() => seen.length === 1, { what: "the publication" });
    assert.ok(c.stats.lastMessageAt >= c.stats.connectedAt);
    assert.equal(c.stats.reconnects, 0);
  } finally {
    c.close();
  }
});

test("rpc and publish made before connecting wait, then go out and settle on the gateway's answer", async () => {
  const c = client("queue-user");
  const rpc = rejection(c.rpc("jobs.cancel", { id: 1 }));
  const pub = c.publish("room:1", "chat", { text: "hi" });
  const settled = pub.then(() => "resolved", (err) => err);
  await sleep(50);
  assert.equal(c.state, "offline"); // nothing sent: there is no connection yet
  c.connect();
  try {
    const err = await rpc;
    assert.ok(err instanceof HeraldError, String(err));
    // The gateway's own answers (`error` frames with the requests' ids), not the client's:
    assert.equal(err.code, "not_found"); // no RPC hook configured
    const outcome = await settled;
    assert.ok(outcome instanceof HeraldError);
    assert.equal(outcome.code, "forbidden"); // room: does not allow client publish here
    assert.equal(c.state, "connected");
  } finally {
    c.close();
  }
});

test("the offline queue is bounded: the call beyond maxQueue rejects with queue_full", async () => {
  const c = client("overflow-user", { maxQueue: 2 });
  const first = c.rpc("a").catch((err) => err);
  const second = c.rpc("b").catch((err) => err);
  const err = await rejection(c.rpc("c"));
  assert.equal(err.code, "queue_full");
  c.close(); // the queued ones are not left hanging
  assert.equal((await first).code, "closed");
  assert.equal((await second).code, "closed");
});

test("a sent call with no answer times out; one in flight when the link drops is `disconnected`", async () => {
  const own = await Gateway.start();
  const c = new HeraldClient({ url: own.url, token: token("stall-user"), ...FAST, maxAttempts: 1 });
  c.connect();
  try {
    await until(() => c.state === "connected", { what: "connected" });
    own.signal("SIGSTOP"); // a gateway that hears nothing and says nothing
    const timedOut = await rejection(c.rpc("slow", {}, { timeoutMs: 300 }));
    assert.equal(timedOut.code, "timeout");
    const inFlight = rejection(c.rpc("slow", {}, { timeoutMs: 30000 }));
    await own.stop(); // SIGKILL: the socket closes with the call unanswered
    assert.equal((await inFlight).code, "disconnected");
  } finally {
    c.close();
    await own.stop();
  }
});

test("maxAttempts: after N failed tries the client stops in state `failed` and rejects what waits", async () => {
  assert.ok(STATES.includes("failed"));
  const port = await freePort(); // nothing listens there
  const c = new HeraldClient({ url: `http://127.0.0.1:${port}`, token: token("u"), ...FAST, maxAttempts: 3 });
  const errors = [];
  const states = [];
  c.on("error", (e) => errors.push(e));
  c.on("state", (s) => states.push(s));
  const queued = rejection(c.rpc("x"));
  c.connect();
  await until(() => c.state === "failed", { what: "failed" });
  assert.equal((await queued).code, "failed");
  assert.deepEqual(errors.map((e) => e.code), ["failed"]);
  assert.equal(states.filter((s) => s === "reconnecting").length, 1); // tries 2 and 3 follow it
  await sleep(300);
  assert.equal(c.state, "failed"); // and it stays there
  assert.equal((await rejection(c.publish("room:1", "e", {}))).code, "failed"); // not queued
});

test("reconnects counts successful re-connections, not attempts", async () => {
  const own = await Gateway.start();
  const c = new HeraldClient({ url: own.url, token: token("again-user"), ...FAST });
  let tries = 0;
  c.on("state", (s) => { if (s === "reconnecting") tries += 1; });
  c.connect();
  try {
    await until(() => c.state === "connected", { what: "connected" });
    const first = c.stats.connectedAt;
    await own.stop();
    await until(() => c.state === "reconnecting", { what: "reconnecting" });
    await sleep(400); // several failed tries (backoff <= 100 ms) against a closed port
    await own.start();
    await until(() => c.state === "connected", { timeoutMs: 15000, what: "connected again" });
    assert.equal(c.stats.reconnects, 1);
    assert.ok(c.stats.connectedAt > first);
    assert.ok(tries >= 1);
  } finally {
    c.close();
    await own.stop();
  }
});

test("debug: states, retries and frames go to console.debug; silent without it", async () => {
  const calls = [];
  const original = console.debug;
  console.debug = (...args) => calls.push(args);
  try {
    const quiet = client("quiet-user");
    quiet.connect();
    await until(() => quiet.state === "connected", { what: "connected" });
    quiet.close();
    assert.deepEqual(calls, []);
    const loud = client("loud-user", { debug: true });
    loud.connect();
    await until(() => loud.state === "connected", { what: "connected" });
    await until(() => loud.stats.latency !== null, { what: "a pong" });
    loud.close();
  } finally {
    console.debug = original;
  }
  assert.ok(calls.every((args) => args[0] === "herald:"));
  assert.ok(calls.some((args) => args.slice(1).join(" ") === "state offline -> connecting"));
  assert.ok(calls.some((args) => args[1] === "frame" && args[2].type === "subscribed"));
  assert.ok(calls.some((args) => args[1] === "frame" && args[2].type === "pong"));
});
