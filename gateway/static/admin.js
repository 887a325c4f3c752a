// The admin console: the server API (docs/protocol.md) driven from a page.
// The API key lives in this module's memory only and travels as an Authorization
// header from fetch(): never a cookie or storage, so nothing cross-site can use it.

const REFRESH_MS = 2000;
const HOT_CHANNELS = 20;
// Errors in words, like the demo: the code stays in the tooltip.
const WORDS = {
  unauthorized: "The gateway refused this API key.",
  forbidden: "The gateway does not allow that.",
  not_found: "Nothing by that name.",
  bad_request: "The gateway did not accept that request",
  unavailable: "The gateway cannot reach its engine right now; try again.",
  rate_limited: "Too many requests; try again in a moment.",
  message_too_large: "That message is larger than the gateway accepts.",
  internal: "Something went wrong inside the gateway.",
};

const $ = (id) => document.getElementById(id);
let key = null;
let timer = null;
window.heraldAdmin = { refreshes: 0 };

class ApiError extends Error {
  constructor(code, message, status) { super(message); this.code = code; this.status = status; }
}

async function api(method, path, body) {
  const headers = { Authorization: `apikey ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  const code = data.error || (res.status === 404 ? "not_found" : "internal");
  if (!res.ok) throw new ApiError(code, data.message || `HTTP ${res.status}`, res.status);
  return data;
}

function say(el, err) {
  // A sentence for the operator; the protocol's own message when it says more.
  const words = WORDS[err.code] || "The request failed";
  el.textContent = err.code === "bad_request" ? `${words}: ${err.message}` : words;
  el.title = `${err.code}: ${err.message}`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = String(text);
  if (cls) td.className = cls;
  return td;
}

function button(label, onClick, cls = "button small") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.addEventListener("click", onClick);
  const td = document.createElement("td");
  td.append(b);
  return td;
}

function rows(tbody, items) {
  tbody.replaceChildren(...items.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}

async function refresh() {
  try {
    const [cluster, channels, users] = await Promise.all([
      api("GET", "/api/v1/cluster"),
      api("GET", "/api/v1/channels?limit=1000"),
      api("GET", "/api/v1/users?limit=1000"),
    ]);
    $("total-connections").textContent = String(cluster.connections);
    rows($("nodes"), cluster.nodes.map((n) => {
      const state = n.draining ? "draining" : n.ready === false ? "not ready" : "ready";
      const pill = cell(""), span = document.createElement("span");
      span.className = "pill"; span.dataset.state = state; span.textContent = state;
      pill.append(span);
      return [cell(n.node), pill, cell(n.connections, "num"), cell(n.subscriptions, "num"),
        cell(n.channels, "num"), cell(Math.round(n.msgs_out_per_s || 0), "num")];
    }));
    const hot = [...channels.channels].sort((a, b) => b.subscribers - a.subscribers).slice(0, HOT_CHANNELS);
    rows($("channels"), hot.map((c) => [cell(c.channel), cell(c.subscribers, "num"),
      button("Inspect", () => { $("inspect-channel").value = c.channel; inspect(); })]));
    rows($("users"), users.users.map((u) => [cell(u.user), cell(u.connections, "num"),
      button("Disconnect", () => disconnect(u.user), "button small danger")]));
    $("refreshed").textContent = new Date().toLocaleTimeString();
    window.heraldAdmin.refreshes += 1;
    setStatus("connected", "Signed in");
  } catch (err) {
    if (err.code === "unauthorized") { signOut(); say($("login-error"), err); return; }
    setStatus("reconnecting", err instanceof ApiError ? WORDS[err.code] || "Request failed" : "Gateway unreachable");
  }
}

function setStatus(state, label) {
  $("status").dataset.state = state;
  $("status-label").textContent = label;
}

async function signIn(event) {
  event.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";  // not left in the form either
  try {
    await api("GET", "/api/v1/stats");
  } catch (err) {
    key = null;
    say($("login-error"), err);
    return;
  }
  $("login-error").textContent = "";
  document.body.dataset.signedIn = "true";
  $("console").hidden = false;
  await refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

function signOut() {
  key = null;
  clearInterval(timer);
  document.body.dataset.signedIn = "false";
  $("console").hidden = true;
  setStatus("offline", "Signed out");
}

// Channel names are URL-safe already (A-Z a-z 0-9 _ - : . @ =); anything else is escaped
// and then refused by the gateway with its reason.
const CHANNEL = /^[A-Za-z0-9_\-.@=]+:[A-Za-z0-9_\-:.@=]+$/;
const pathPart = (name) => encodeURIComponent(name).replace(/%3A/g, ":").replace(/%40/g, "@").replace(/%3D/g, "=");

function show(el, value) { el.textContent = JSON.stringify(value, null, 2); }

async function inspect(event) {
  event?.preventDefault();
  const channel = $("inspect-channel").value.trim();
  const path = `/api/v1/channels/${pathPart(channel)}`;
  // Never leave another channel's figures under this name (a failure shows nothing).
  for (const id of ["inspect-error", "position", "state", "history", "presence"]) $(id).textContent = "";
  if (!CHANNEL.test(channel)) {
    $("inspect-error").textContent =
      "That is not a channel name: namespace:name, with letters, digits and _ - : . @ = only.";
    return;
  }
  try {
    const [state, history] = await Promise.all([
      api("GET", `${path}/state`), api("GET", `${path}/history?limit=100`),
    ]);
    $("position").textContent = `${channel} · epoch ${state.epoch} · offset ${state.offset}`;
    show($("state"), state.state);
    show($("history"), history.messages.map((m) => ({ offset: m.offset, event: m.event, data: m.data })));
  } catch (err) {
    say($("inspect-error"), err);
    return;
  }
  try {
    const presence = await api("GET", `${path}/presence`);
    show($("presence"), presence.clients);
  } catch (err) {
    $("presence").textContent = err.code === "forbidden" || err.code === "not_found"
      ? "Presence is not enabled for this channel's namespace." : WORDS[err.code] || err.message;
  }
}

async function publish(event) {
  event.preventDefault();
  const out = $("publish-result");
  let data;
  try { data = JSON.parse($("publish-data").value); } catch {
    out.textContent = "The data is not valid JSON."; return;
  }
  try {
    const r = await api("POST", "/api/v1/publish",
      { channel: $("publish-channel").value.trim(), event: $("publish-event").value.trim(), data });
    out.textContent = `Published to ${r.channel} at offset ${r.offset} (epoch ${r.epoch}).`;
  } catch (err) { say(out, err); }
}

async function disconnect(user, event) {
  event?.preventDefault();
  const out = $("disconnect-result");
  const body = { reconnect: $("disconnect-reconnect").checked };
  const reason = $("disconnect-reason").value.trim();
  if (reason) body.reason = reason;
  try {
    const r = await api("POST", `/api/v1/users/${encodeURIComponent(user)}/disconnect`, body);
    const missing = r.missing?.length ? `; no answer from ${r.missing.join(", ")}` : "";
    out.textContent = `Disconnected ${r.connections} connection(s) of ${r.user}${missing}.`;
    await refresh();
  } catch (err) { say(out, err); }
}

$("login").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
$("inspect").addEventListener("submit", inspect);
$("publish").addEventListener("submit", publish);
$("disconnect").addEventListener("submit", (e) => disconnect($("disconnect-user").value.trim(), e));
