// rpc() and publish() round trips through a real gateway to a real backend
// (a node:http server answering Herald's hooks, docs/hooks.md): over the
// WebSocket, queued while offline, and over HTTP in the polling fallback.
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { after, before, test } from "node:test";

import { WebSocket } from "ws";

import { HeraldClient, HeraldError } from "../dist/index.js";
import { Gateway, freePort, rejection, token, until } from "./gateway.mjs";

globalThis.WebSocket = WebSocket;

let gw;
let backend;
const calls = [];

before(async () => {
  backend = createServer(async (req, res) => {
    let raw = "";
    for await (const chunk of req) raw += chunk;
    const body = JSON.parse(raw);
    calls.push(body);
    let answer;
    if (body.hook !== "rpc") answer = { result: {} };
    else if (body.method === "jobs.cancel") answer = { result: { cancelled: body.params.job, by: body.user, via: body.transport } };
    else answer = { error: { code: "forbidden", message: `no ${body.method} for you` } };
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(JSON.stringify(answer));
  });
  const port = await freePort();
  backend.listen(port, "127.0.0.1");
  await once(backend, "listening");
  gw = await Gateway.start({
    HERALD_HOOK_URL: `http://127.0.0.1:${port}`,
    HERALD_HOOK_RPC_PATH: "rpc",
    HERALD_NAMESPACES: JSON.stringify({ room: { access: "authenticated", client_publish: true } }),
  });
});

after(async () => {
  await gw.stop();
  backend.close();
});

function client(sub, options = {}) {
  return new HeraldClient({ url: gw.url, token: token(sub), backoffMaxMs: 100, ...options });
}

test("rpc over the WebSocket: the backend's result, or its error code", async () => {
  const c = client("rpc-user");
  const early = c.rpc("jobs.cancel", { job: "42" }); // made offline: queued, sent once connected
  c.connect();
  try {
    assert.deepEqual(await early, { cancelled: "42", by: "rpc-user", via: "ws" });
    const err = await rejection(c.rpc("jobs.delete", { job: "42" }));
    assert.ok(err instanceof HeraldError);
    assert.deepEqual([err.code, err.detail], ["forbidden", "no jobs.delete for you"]);
  } finally {
    c.close();
  }
});

test("publish over the WebSocket: the position, seen by a subscriber; forbidden where not allowed", async () => {
  const watcher = client("room-watcher");
  const seen = [];
  watcher.subscribe("room:1", { onMessage: (m) => seen.push(m) });
  watcher.connect();
  const c = client("room-user");
  c.connect();
  try {
    await until(() => watcher.state === "connected" && watcher._channels.get("room:1").epoch, { what: "watching" });
    const pos = await c.publish("room:1", "chat", { text: "hi" });
    assert.equal(pos.channel, "room:1");
    assert.equal(typeof pos.epoch, "string");
    await until(() => seen.length === 1, { what: "the chat message" });
    assert.deepEqual([seen[0].event, seen[0].data, seen[0].offset], ["chat", { text: "hi" }, pos.offset]);
    const err = await rejection(c.publish("system:news", "x", {}));
    assert.equal(err.code, "forbidden");
  } finally {
    c.close();
    watcher.close();
  }
});

test("in the polling fallback, rpc and publish go over HTTP", async () => {
  const c = client("poll-user", { transports: ["poll"], pollIntervalMs: 200 });
  c.connect();
  try {
    await until(() => c.state === "fallback:poll", { what: "polling" });
    assert.deepEqual(await c.rpc("jobs.cancel", { job: "7" }), { cancelled: "7", by: "poll-user", via: "http" });
    const pos = await c.publish("room:2", "chat", { text: "over http" });
    assert.equal(pos.channel, "room:2");
    const err = await rejection(c.rpc("nope"));
    assert.equal(err.code, "forbidden");
  } finally {
    c.close();
  }
});
