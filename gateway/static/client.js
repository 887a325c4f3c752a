// Herald browser client: an ES module with no dependencies.
//
//   import { HeraldClient } from "/client.js";
//   const herald = new HeraldClient({ url: "https://rt.example.com", getToken });
//   herald.on("state", (state) => console.log(state));
//   herald.subscribe("job:42", { onMessage: (m) => ..., onState: (s) => ... });
//   herald.connect();
//   const result = await herald.rpc("jobs.cancel", { id: 42 });   // queued while offline
//   await herald.publish("room:1", "chat", { text: "hi" });
//
// This file is both the gateway's `/client.js` and the npm package
// `@herald/client` (clients/js builds its dist/ from it): one source, so the
// two cannot drift. Its types are clients/js/src/index.d.ts.
//
// What it guarantees (see docs/client.md): every channel's messages reach
// the callbacks once each, in offset order, across reconnects; when the
// server says the history is gone (`recovered: false` or a new epoch), the
// channel's `onState` gets the fresh snapshot instead. It prefers a
// WebSocket, falls back to Server-Sent Events when WebSockets cannot open
// although the gateway answers, and to polling the HTTP reads when neither
// streams.

export const STATES = Object.freeze([
  "connecting", "connected", "reconnecting", "fallback:sse", "fallback:poll", "offline", "failed",
]);

const TRANSPORTS = ["ws", "sse", "poll"];
const DEFAULTS = {
  transports: TRANSPORTS,
  backoffInitialMs: 500,    // first retry waits up to this (full jitter)
  backoffMaxMs: 30000,      // cap of the exponential backoff
  refreshBeforeMs: 60000,   // ask getToken() this long before the token expires
  pollIntervalMs: 3000,     // fallback:poll cadence per channel
  openTimeoutMs: 8000,      // a transport that has not said `connected` by then failed
  retryWebSocketMs: 300000, // in a fallback, try the WebSocket again after this
  historyLimit: 1000,
  maxAttempts: Infinity,    // consecutive failed tries before giving up (state `failed`)
  maxQueue: 100,            // rpc/publish calls held while offline; more reject with `queue_full`
  requestTimeoutMs: 10000,  // an rpc/publish sent without an answer by then rejects with `timeout`
  debug: false,             // log states, retries and frames to the console
};

/**
 * A refused or failed `rpc`/`publish` (or a client that gave up): `code` is
 * the protocol's error code (`forbidden`, `not_found`, `unavailable`...) or
 * one of the client's own: `queue_full`, `timeout`, `disconnected` (sent,
 * then the connection dropped: outcome unknown), `closed`, `failed`.
 */
export class HeraldError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "HeraldError";
    this.code = code;
    this.detail = message;
  }
}

/** Decode a JWT's payload without verifying it (the server verifies). */
function jwtPayload(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
  } catch {
    return {};
  }
}

/** Capped exponential backoff with full jitter: uniform in [0, min(cap, base*2^n)]. */
export function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
  return Math.floor(random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30)));
}

class Channel {
  constructor(name) {
    this.name = name;
    this.epoch = null;     // position of the last message handed to callbacks
    this.offset = null;
    this.listeners = new Set();
    this.filling = false;  // catching up over HTTP; live messages wait in `held`
    this.held = [];
  }
}

export class HeraldClient {
  /**
   * @param {object} options
   * @param {string} [options.url] gateway base URL (http/https); default: this page's origin
   * @param {string} [options.token] a JWT
   * @param {() => Promise<string>} [options.getToken] returns a fresh JWT (refresh, 4001)
   */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    // Outside browsers (Node with the `ws` package as WebSocket) there may be no EventSource.
    this.options.transports = this.options.transports.filter((t) => t !== "sse" || typeof EventSource !== "undefined");
    this.url = (options.url || globalThis.location.origin).replace(/\/$/, "");
    this.token = options.token || null;
    this.user = null;
    this.state = "offline";
    this.transport = null;
    this.stats = {
      reconnects: 0, duplicates: 0, gapsFilled: 0, resets: 0, refreshes: 0, toldToReconnect: 0,
      latency: null, connectedAt: null, lastMessageAt: null,
    };
    this._channels = new Map();
    this._handlers = new Map();
    this._transportIndex = 0;
    this._attempt = 0;
    this._plannedDelay = null;
    this._conn = null;       // the open transport: {kind, close(), send?()}
    this._timers = new Set();
    this._refreshTimer = null;
    this._stopped = true;
    this._nextId = 1;
    this._pending = new Map(); // request id -> channel, to route errors
    this._requests = new Map(); // rpc/publish id -> {frame, resolve, reject, timer}, sent
    this._queue = [];           // rpc/publish calls waiting for a connection
    this._failures = 0;         // consecutive tries that did not connect (maxAttempts)
    this._retriedWhileUp = false; // a try failed while the gateway answered: retried once at once
    this._pings = new Map();    // ping id -> sent at (latency)
    this._onOnline = () => { if (!this._stopped) this._reopen(0); };
    this._onOffline = () => { if (!this._stopped) this._down(null, "offline"); };
  }

  // -- public API -------------------------------------------------------

  /** Listen to client events: "state" (state, previous), "message", "error", "connected". */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this._handlers.get(event).delete(fn);
  }

  /**
   * Watch a channel. Callbacks: onMessage(msg) for each publication, in order, once;
   * onState(state, info) with the snapshot on first subscribe and after a reset;
   * onError(error) for a refused subscribe ({code, message}).
   * Returns {unsubscribe()}.
   */
  subscribe(name, callbacks = {}) {
    let ch = this._channels.get(name);
    const fresh = !ch;
    if (fresh) {
      ch = new Channel(name);
      this._channels.set(name, ch);
    }
    ch.listeners.add(callbacks);
    if (fresh) this._addToTransport(ch);
    return { unsubscribe: () => this._unsubscribe(ch, callbacks) };
  }

  /**
   * Call the application's RPC hook (PROTOCOL.md: `rpc`). Resolves with its
   * `result`; rejects with a HeraldError. Made while offline, the call waits
   * in a bounded queue (`maxQueue`) and is sent once connected.
   */
  rpc(method, params = {}, { timeoutMs } = {}) {
    return this._request({ type: "rpc", method, params }, timeoutMs);
  }

  /**
   * Publish from the browser where the channel's namespace allows it.
   * Resolves with `{channel, epoch, offset}`; rejects with a HeraldError.
   */
  publish(channel, event, data, { timeoutMs } = {}) {
    return this._request({ type: "publish", channel, event, data }, timeoutMs);
  }

  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._failures = 0;
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("offline", this._onOffline);
    this._setState("connecting");
    this._open();
    return this;
  }

  close() {
    this._stopped = true;
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    this._clearTimers();
    this._closeConn();
    this._rejectAll("closed", "the client was closed");
    this._setState("offline");
  }

  // -- state and events -------------------------------------------------

  _emit(event, ...args) {
    for (const fn of this._handlers.get(event) || []) {
      try { fn(...args); } catch (err) { console.error("herald: handler failed", err); }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._log("state", previous, "->", state);
    this._emit("state", state, previous);
  }

  _log(...args) {
    if (this.options.debug) console.debug("herald:", ...args);
  }

  _callListeners(ch, method, ...args) {
    for (const cb of ch.listeners) {
      if (typeof cb[method] !== "function") continue;
      try { cb[method](...args); } catch (err) { console.error("herald: callback failed", err); }
    }
  }

  _later(ms, fn) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._refreshTimer = null;
  }

  // -- opening and losing a transport -----------------------------------

  async _open() {
    if (this._stopped) return;
    if (!this.token && this.options.getToken) {
      try { this.token = await this.options.getToken(); } catch (err) { this._emit("error", err); }
    }
    if (!this.token) {
      if (!this.options.getToken) { this._fail("unauthorized", "no token"); return; }
      if (this._failed()) return;
      this._setState("reconnecting"); // getToken failed: try again later
      this._reopen(null);
      return;
    }
    if (!this.user) this.user = jwtPayload(this.token).sub || null;
    const kind = this.options.transports[this._transportIndex] || "poll";
    this.transport = kind;
    if (kind === "ws") this._openWs();
    else if (kind === "sse") this._openSse();
    else this._openPoll();
  }

  _closeConn() {
    const conn = this._conn;
    this._conn = null;
    if (conn) conn.close();
    this._pings.clear();
    // Sent but unanswered: the outcome is unknown, so the caller decides (never re-sent).
    for (const [id, req] of this._requests) {
      this._requests.delete(id);
      clearTimeout(req.timer);
      req.reject(new HeraldError("disconnected", "the connection dropped before the answer; outcome unknown"));
    }
  }

  /** Reopen after `delay` ms (null: exponential backoff with full jitter). */
  _reopen(delay) {
    this._closeConn();
    if (this._stopped) return;
    if (delay === null && this._plannedDelay !== null) {
      delay = this._plannedDelay; // the server's `reconnect.after_ms`, already jittered
      this.stats.toldToReconnect += 1;
    } else if (delay === null) {
      delay = backoffDelay(this._attempt, this.options.backoffInitialMs, this.options.backoffMaxMs);
      this._attempt += 1;
    }
    this._plannedDelay = null;
    this._log("reconnecting in", delay, "ms");
    this._later(delay, () => this._open());
  }

  /**
   * The transport went down. `opened`: it had said `connected`. `code`: the
   * close code (WebSocket, or the SSE `closed` event) when known.
   */
  async _down(conn, reason, { opened = false, code = null } = {}) {
    if (conn && conn !== this._conn) return; // an old transport's late news
    this._closeConn();
    if (this._stopped) return;
    this._log("transport down:", reason, code ?? "");
    if (reason === "offline" || globalThis.navigator?.onLine === false) {
      this._setState("offline");
      return; // the "online" event reopens
    }
    const exp = this.token ? jwtPayload(this.token).exp : 0;
    if (code === 4001 || (exp && exp * 1000 <= Date.now())) {
      // Unauthorized or expired: only a fresh token helps.
      if (!this.options.getToken) { this._fail("unauthorized", "unauthorized"); return; }
      this.token = null;
      this._setState("reconnecting");
      this._reopen(null);
      return;
    }
    const up = !opened && this._plannedDelay === null && await this._gatewayAnswers();
    if (up && !this._retriedWhileUp) {
      // The gateway is up, yet this transport did not open: a proxy in the way,
      // or a gateway that came up just after the try (a restart). Try once more
      // at once; only a second failure while it answers means a proxy.
      this._retriedWhileUp = true;
      if (this._failed()) return;
      this._setState("reconnecting");
      this._reopen(0);
      return;
    }
    this._retriedWhileUp = false;
    if (up) {
      if (this._transportIndex < this.options.transports.length - 1) {
        this._transportIndex += 1;
        this._reopen(0);
        this._later(this.options.retryWebSocketMs, () => this._retryFirstTransport());
        return;
      }
    }
    if (!opened && this._failed()) return;
    this._setState("reconnecting");
    this._reopen(null);
  }

  /** Count one failed try; true when that was the last one `maxAttempts` allows. */
  _failed() {
    this._failures += 1;
    if (this._failures < this.options.maxAttempts) return false;
    this._fail("failed", `gave up after ${this._failures} failed attempts`, "failed");
    return true;
  }

  _retryFirstTransport() {
    if (this._stopped || this._transportIndex === 0) return;
    this._transportIndex = 0;
    this._reopen(0);
  }

  async _gatewayAnswers() {
    try {
      // readyz, not healthz: a draining gateway refuses upgrades on purpose.
      const res = await fetch(`${this.url}/readyz`, { cache: "no-store" });
      return res.ok;
    } catch {
      return false;
    }
  }

  _fail(code, message, state = "offline") {
    this._emit("error", { code, message });
    this._stopped = true;
    this._clearTimers();
    this._closeConn();
    this._rejectAll(code, message);
    this._setState(state);
  }

  _onConnected(frame, stateName) {
    this._attempt = 0;
    this._failures = 0;
    this._retriedWhileUp = false;
    if (this.stats.connectedAt !== null) this.stats.reconnects += 1; // a successful re-connection
    this.stats.connectedAt = Date.now();
    this.user = frame.user || this.user;
    this._setState(stateName);
    this._scheduleRefresh(frame.expires);
    this._emit("connected", frame);
    this._flushQueue();
  }

  _scheduleRefresh(expires) {
    if (this._refreshTimer) { clearTimeout(this._refreshTimer); this._timers.delete(this._refreshTimer); }
    this._refreshTimer = null;
    if (!expires || !this.options.getToken) return;
    const wait = Math.max(0, expires * 1000 - Date.now() - this.options.refreshBeforeMs);
    this._refreshTimer = this._later(wait, () => this._refresh());
  }

  async _refresh() {
    let token;
    try { token = await this.options.getToken(); } catch (err) { this._emit("error", err); }
    if (!token || this._stopped) { this._later(5000, () => this._refresh()); return; }
    this.token = token;
    const conn = this._conn;
    if (conn && conn.kind === "ws") conn.send({ type: "auth", token });
    else if (conn && conn.kind === "sse") this._reopen(0); // a stream cannot re-auth: resume with since
    else this._scheduleRefresh(jwtPayload(token).exp);
  }

  // -- WebSocket ----------------------------------------------------------

  _openWs() {
    const ws = new WebSocket(this.url.replace(/^http/, "ws") + "/ws");
    let opened = false;
    let lastFrame = Date.now();
    let pinger = null;
    const conn = {
      kind: "ws",
      send: (obj) => {
        if (ws.readyState !== 1) return false;
        ws.send(JSON.stringify(obj));
        return true;
      },
      close: () => { clearInterval(pinger); clearTimeout(timeout); ws.onclose = null; try { ws.close(1000); } catch { /* closing */ } },
    };
    this._conn = conn;
    const timeout = setTimeout(() => this._down(conn, "open timeout"), this.options.openTimeoutMs);
    ws.onopen = () => conn.send({ type: "auth", token: this.token });
    ws.onerror = () => {}; // `close` follows and says what happened (an unheard error throws in Node's ws)
    ws.onclose = (ev) => { clearInterval(pinger); clearTimeout(timeout); this._down(conn, "closed", { opened, code: ev.code }); };
    ws.onmessage = (ev) => {
      lastFrame = Date.now();
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame.type === "connected") {
        opened = true;
        clearTimeout(timeout);
        const beat = Math.max(1, frame.heartbeat || 25) * 1000;
        // Browsers hide WebSocket pings: an application ping shows a dead link.
        pinger = setInterval(() => {
          if (Date.now() - lastFrame > 2 * beat + 5000) ws.close(4000, "no answer");
          else this._ping(conn);
        }, beat);
        conn.ready = true;
        this._ping(conn); // a first latency figure now, not a heartbeat later
        this._onConnected(frame, "connected");
        for (const ch of this._channels.values()) {
          if (ch.name !== `user:${this.user}`) this._sendSubscribe(ch); // that one is automatic
        }
        return;
      }
      this._onFrame(frame);
    };
  }

  _ping(conn) {
    const id = this._nextId++;
    this._pings.set(id, Date.now());
    if (this._pings.size > 8) this._pings.delete(this._pings.keys().next().value); // unanswered
    conn.send({ type: "ping", id });
  }

  _sendSubscribe(ch) {
    const id = this._nextId++;
    this._pending.set(id, ch.name);
    const frame = { type: "subscribe", channel: ch.name, id };
    if (ch.epoch !== null && ch.offset !== null) frame.since = { epoch: ch.epoch, offset: ch.offset };
    this._conn.send(frame);
  }

  // -- Server-Sent Events -------------------------------------------------

  _openSse() {
    const params = new URLSearchParams();
    for (const ch of this._channels.values()) {
      params.append("channel", ch.name);
      if (ch.epoch !== null && ch.offset !== null) params.append("since", `${ch.name}|${ch.epoch}|${ch.offset}`);
    }
    if (!this.options.sseCookie) params.append("token", this.token); // EventSource cannot send headers
    const es = new EventSource(`${this.url}/sse?${params}`, { withCredentials: !!this.options.sseCookie });
    let opened = false;
    const conn = { kind: "sse", close: () => { clearTimeout(timeout); es.close(); } };
    this._conn = conn;
    const timeout = setTimeout(() => this._down(conn, "open timeout"), this.options.openTimeoutMs);
    // We reconnect ourselves (with fresh `since` for every channel), not EventSource.
    es.onerror = () => { clearTimeout(timeout); this._down(conn, "error", { opened }); };
    es.onmessage = (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame.type === "connected") {
        opened = true;
        clearTimeout(timeout);
        this._onConnected(frame, "fallback:sse");
        return;
      }
      if (frame.type === "closed") { this._down(conn, "closed", { opened, code: frame.code }); return; }
      this._onFrame(frame);
    };
  }

  // -- polling ------------------------------------------------------------

  _openPoll() {
    let running = true;
    const conn = { kind: "poll", close: () => { running = false; } };
    this._conn = conn;
    const tick = async () => {
      if (!running) return;
      let ok = true;
      for (const ch of [...this._channels.values()]) {
        const result = await this._catchUp(ch);
        if (result === "unauthorized") { this._down(conn, "unauthorized", { code: 4001 }); return; }
        if (result === "failed") ok = false;
      }
      if (!running) return;
      if (ok) {
        this._attempt = 0;
        if (this.state !== "fallback:poll") this._onConnected({ expires: jwtPayload(this.token).exp }, "fallback:poll");
        this._later(this.options.pollIntervalMs, tick);
      } else if (!(await this._gatewayAnswers())) {
        if (this.state !== "fallback:poll" && this._failed()) return;
        this._setState("reconnecting");
        const wait = backoffDelay(this._attempt++, this.options.backoffInitialMs, this.options.backoffMaxMs);
        this._later(Math.max(wait, this.options.pollIntervalMs), tick);
      } else {
        this._later(this.options.pollIntervalMs, tick);
      }
    };
    const own = this.user && `user:${this.user}`;
    if (own && !this._channels.has(own)) this._channels.set(own, new Channel(own));
    tick();
  }

  // -- frames -------------------------------------------------------------

  _onFrame(frame) {
    if (this.options.debug && frame.type !== "message") this._log("frame", frame);
    switch (frame.type) {
      case "message": this._onMessage(frame); break;
      case "pong": this._onPong(frame); break;
      case "rpc": this._settle(frame.id, (req) => req.resolve(frame.result)); break;
      case "published":
        this._settle(frame.id, (req) => req.resolve({ channel: frame.channel, epoch: frame.epoch, offset: frame.offset }));
        break;
      case "subscribed": this._onSubscribed(frame); break;
      case "authenticated": this.stats.refreshes += 1; this._scheduleRefresh(frame.expires); break;
      case "reconnect": this._plannedDelay = Math.max(0, frame.after_ms || 0); break;
      case "error": this._onError(frame); break;
      default: break; // unsubscribed, and types added later
    }
  }

  _onPong(frame) {
    const sentAt = this._pings.get(frame.id);
    if (sentAt === undefined) return;
    this._pings.delete(frame.id);
    this.stats.latency = Date.now() - sentAt;
  }

  _onError(frame) {
    if (this._settle(frame.id, (req) => req.reject(new HeraldError(frame.code, frame.message || "")))) return;
    const name = frame.channel || this._pending.get(frame.id);
    this._pending.delete(frame.id);
    const ch = name && this._channels.get(name);
    if (ch) this._callListeners(ch, "onError", frame);
    this._emit("error", frame);
  }

  _onSubscribed(frame) {
    this._pending.delete(frame.id);
    let ch = this._channels.get(frame.channel);
    if (!ch) { ch = new Channel(frame.channel); this._channels.set(frame.channel, ch); }
    if (frame.recovered === true) return; // the replay follows, then live messages
    const known = ch.epoch !== null && ch.offset !== null;
    if (frame.recovered !== false && known && frame.epoch === ch.epoch) {
      // A plain subscribe (the automatic user:{sub} one) on a channel we were
      // following: fetch whatever happened in between.
      if (frame.offset > ch.offset) this._fill(ch);
      return;
    }
    this._reset(ch, frame.epoch, frame.offset, frame.state ?? null, known);
    if (!ch.filling) this._flushHeld(ch);
  }

  _reset(ch, epoch, offset, state, wasKnown) {
    ch.epoch = epoch;
    ch.offset = offset;
    if (wasKnown) this.stats.resets += 1;
    this._callListeners(ch, "onState", state, { epoch, offset, reset: wasKnown });
  }

  /** Hand over the live messages that waited while the channel caught up. */
  _flushHeld(ch) {
    const held = ch.held.sort((a, b) => a.offset - b.offset);
    ch.held = [];
    for (const msg of held) this._onMessage(msg);
  }

  _onMessage(msg) {
    const ch = this._channels.get(msg.channel);
    if (!ch) return;
    if (ch.filling) { ch.held.push(msg); return; }
    if (ch.epoch !== msg.epoch) {
      // A new epoch we were not told about: everything before is void.
      ch.epoch = msg.epoch;
      ch.offset = 0;
    }
    if (ch.offset !== null && msg.offset <= ch.offset) { this.stats.duplicates += 1; return; }
    if (ch.offset !== null && msg.offset > ch.offset + 1) {
      ch.held.push(msg);
      this._fill(ch);
      return;
    }
    this._deliver(ch, msg);
  }

  _deliver(ch, msg) {
    ch.offset = msg.offset;
    this.stats.lastMessageAt = Date.now();
    this._callListeners(ch, "onMessage", msg);
    this._emit("message", msg);
  }

  /** Catch a channel up over HTTP while live messages wait; retried while connected. */
  async _fill(ch) {
    if (ch.filling) return;
    ch.filling = true;
    this.stats.gapsFilled += 1;
    const result = await this._catchUp(ch);
    ch.filling = false;
    if (result !== "ok") {
      if (this._conn && this._channels.get(ch.name) === ch) this._later(2000, () => this._fill(ch));
      return;
    }
    this._flushHeld(ch);
  }

  /** One HTTP catch-up: history after our offset, or the state when that is gone. */
  async _catchUp(ch) {
    const base = `${this.url}/api/v1/channels/${ch.name}`;
    const headers = { Authorization: `Bearer ${this.token}` };
    try {
      if (ch.epoch !== null && ch.offset !== null) {
        const res = await fetch(`${base}/history?since=${ch.offset}&limit=${this.options.historyLimit}`, { headers, cache: "no-store" });
        if (res.status === 401) return "unauthorized";
        if (!res.ok) return res.status === 403 || res.status === 404 ? this._refused(ch, res) : "failed";
        const body = await res.json();
        if (body.epoch === ch.epoch && body.complete) {
          for (const msg of body.messages) this._deliverCaughtUp(ch, msg);
          return "ok";
        }
      }
      const res = await fetch(`${base}/state`, { headers, cache: "no-store" });
      if (res.status === 401) return "unauthorized";
      if (!res.ok) return res.status === 403 || res.status === 404 ? this._refused(ch, res) : "failed";
      const body = await res.json();
      this._reset(ch, body.epoch, body.offset, body.state ?? null, ch.epoch !== null);
      return "ok";
    } catch {
      return "failed";
    }
  }

  _deliverCaughtUp(ch, msg) {
    if (msg.epoch !== ch.epoch || msg.offset <= ch.offset) return;
    this._deliver(ch, msg);
  }

  async _refused(ch, res) {
    let body = {};
    try { body = await res.json(); } catch { /* not JSON */ }
    this._callListeners(ch, "onError", { code: body.error || "forbidden", message: body.message || "" });
    return "refused";
  }

  // -- rpc and publish ----------------------------------------------------

  _request(frame, timeoutMs) {
    return new Promise((resolve, reject) => {
      const req = { frame, resolve, reject, timeoutMs: timeoutMs ?? this.options.requestTimeoutMs, timer: null };
      if (this.state === "failed") {
        reject(new HeraldError("failed", "the client gave up (maxAttempts); connect() starts over"));
        return;
      }
      if (this._sendRequest(req)) return;
      if (this._queue.length >= this.options.maxQueue) {
        reject(new HeraldError("queue_full", `${this._queue.length} calls already wait for a connection (maxQueue)`));
        return;
      }
      this._queue.push(req);
      this._log("queued", frame.type, `(${this._queue.length} waiting)`);
    });
  }

  /** Send now if a transport can carry it (WebSocket frame, or HTTP in a fallback). */
  _sendRequest(req) {
    const conn = this._conn;
    if (!conn || this._stopped) return false;
    if (conn.kind === "ws") {
      if (!conn.ready) return false;
      const id = this._nextId++;
      this._requests.set(id, req);
      req.timer = setTimeout(() => this._settle(id, (r) =>
        r.reject(new HeraldError("timeout", `no answer within ${req.timeoutMs} ms`))), req.timeoutMs);
      conn.send({ ...req.frame, id });
      return true;
    }
    if (this.state !== "fallback:sse" && this.state !== "fallback:poll") return false;
    this._httpRequest(req);
    return true;
  }

  /** The HTTP twins of `rpc` and `publish` for SSE and polling (PROTOCOL.md). */
  async _httpRequest(req) {
    const { frame } = req;
    const [path, body] = frame.type === "rpc"
      ? ["/api/v1/rpc", { method: frame.method, params: frame.params }]
      : [`/api/v1/channels/${frame.channel}/publish`, { event: frame.event, data: frame.data }];
    try {
      const res = await fetch(this.url + path, {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(req.timeoutMs),
      });
      let reply = {};
      try { reply = await res.json(); } catch { /* not JSON */ }
      if (!res.ok) { req.reject(new HeraldError(reply.error || "unavailable", reply.message || `HTTP ${res.status}`)); return; }
      req.resolve(frame.type === "rpc" ? reply.result : reply);
    } catch (err) {
      const timedOut = err && (err.name === "TimeoutError" || err.name === "AbortError");
      req.reject(new HeraldError(timedOut ? "timeout" : "disconnected", String(err && err.message || err)));
    }
  }

  /** Settle the request with this id, if it is ours; true when it was. */
  _settle(id, fn) {
    const req = id === undefined ? undefined : this._requests.get(id);
    if (!req) return false;
    this._requests.delete(id);
    clearTimeout(req.timer);
    fn(req);
    return true;
  }

  _flushQueue() {
    while (this._queue.length && this._sendRequest(this._queue[0])) this._queue.shift();
  }

  _rejectAll(code, message) {
    const queued = this._queue.splice(0);
    for (const req of queued) req.reject(new HeraldError(code, message));
  }

  // -- adding and removing channels ---------------------------------------

  _addToTransport(ch) {
    const conn = this._conn;
    if (!conn) return; // the next transport subscribes it
    if (conn.kind === "ws" && conn.ready) this._sendSubscribe(ch); // else sent on `connected`
    else if (conn.kind === "sse") this._reopen(0);
    // poll: the next tick includes it
  }

  _unsubscribe(ch, callbacks) {
    ch.listeners.delete(callbacks);
    if (ch.listeners.size || this._channels.get(ch.name) !== ch) return;
    this._channels.delete(ch.name);
    const conn = this._conn;
    if (!conn || ch.name === `user:${this.user}`) return;
    if (conn.kind === "ws") conn.send({ type: "unsubscribe", channel: ch.name });
    else if (conn.kind === "sse") this._reopen(0);
  }
}

export default HeraldClient;
