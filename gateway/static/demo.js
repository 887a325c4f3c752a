// The demo dashboard: every job the demo user owns, live, through /client.js.
// Query parameters (for trying things out and for the browser tests):
//   ?jobs=a,b          also watch job:a and job:b
//   ?transports=sse    restrict the client's transports (ws, sse, poll)
//   ?backoffMaxMs=2000 (and pollIntervalMs, openTimeoutMs, refreshBeforeMs) tune the client
import { HeraldClient } from "/client.js";

const MAX_JOBS = 12;
const MAX_NOTES = 8;
const LABELS = {
  connecting: "Connecting…",
  connected: "Live · WebSocket",
  reconnecting: "Reconnecting…",
  "fallback:sse": "Live · SSE fallback",
  "fallback:poll": "Live · polling fallback",
  offline: "Offline",
};

const LIVE = new Set(["connected", "fallback:sse", "fallback:poll"]);
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
// Errors in words: a short badge and a sentence, never a bare protocol code.
const ERROR_WORDS = {
  not_found: ["Unknown job", "The gateway has no record of this job (it may have expired)."],
  forbidden: ["Not yours", "This job belongs to another user."],
  unauthorized: ["Signed out", "The gateway refused this page's token; reload the page."],
  token_expired: ["Signed out", "This page's token expired; reload the page."],
  unavailable: ["Gateway busy", "The gateway cannot reach its engine right now; the page keeps trying."],
  rate_limited: ["Slow down", "This page sent too many requests; it will try again."],
  too_many_subscriptions: ["Too many jobs", "This page already watches as many jobs as the gateway allows."],
  bad_request: ["Page error", "The page asked for something the gateway does not understand."],
  internal: ["Gateway error", "Something went wrong inside the gateway."],
};

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const jobs = new Map(); // job id -> {el, sub}
const log = [];         // every message handed to the page: the tests compare it with the publisher's
const desktopShown = []; // browser notifications shown (the tests read it)
window.heraldDemo = { log, jobs, desktop: desktopShown };
let everLive = false;

async function fetchToken() {
  const res = await fetch("/demo/token", { cache: "no-store" });
  if (!res.ok) throw new Error(`demo token: HTTP ${res.status}`);
  return res.json();
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

function ordinal(n) {
  const s = ["th", "st", "nd", "rd"], v = n % 100;
  return n + (s[(v - 20) % 10] || s[v] || s[0]);
}

function duration(seconds) {
  if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
  return `${Math.round(seconds / 60)} min`;
}

function renderJob(id, data) {
  const job = jobs.get(id);
  if (!job || !data) return;
  const el = job.el;
  job.updated = new Date();
  delete el.dataset.error;
  const progress = Math.max(0, Math.min(100, Number(data.progress) || 0));
  const status = data.status || "processing";
  el.dataset.status = status;
  el.dataset.progress = String(progress);
  if (data.title) setText(el.querySelector(".job-title"), data.title);
  setText(el.querySelector(".badge"), status);
  setText(el.querySelector(".stage"), data.stage || "");
  setText(el.querySelector(".message"), data.message || "");
  el.querySelector(".message").title = data.message || "";
  setText(el.querySelector(".pct"), `${progress}%`);
  el.querySelector(".fill").style.width = `${progress}%`;
  const bar = el.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(progress));
  bar.setAttribute("aria-label", `${data.title || id}: ${progress}%`);
  // The queue-position and ETA convention (docs/client.md).
  const position = Number.isInteger(data.queue_position) ? data.queue_position : null;
  setText(el.querySelector(".queue"), status === "queued" && position ? `${ordinal(position)} in line` : "");
  const eta = typeof data.eta === "number" && !TERMINAL.has(status) ? `about ${duration(data.eta)} left` : "";
  setText(el.querySelector(".eta"), eta);
}

function markStale(live) {
  // While the page is not connected its cards may be out of date: say so, on each card
  // that could still change, with the time of the last update it saw.
  for (const job of jobs.values()) {
    const el = job.el;
    if (live || TERMINAL.has(el.dataset.status)) { delete el.dataset.stale; continue; }
    el.dataset.stale = "true";
    const when = job.updated ? ` · last update ${job.updated.toLocaleTimeString()}` : "";
    setText(el.querySelector(".stale-note"), `Reconnecting, may be out of date${when}`);
  }
}

function latest(state) {
  // A job channel's state holds the latest data of each event.
  if (!state) return null;
  return state.completed || state.failed || state.cancelled || state.progress || null;
}

function watchJob(id, title) {
  if (!id || jobs.has(id)) return;
  const el = $("job-template").content.firstElementChild.cloneNode(true);
  el.dataset.jobId = id;
  el.querySelector(".job-title").textContent = title || "Job";
  el.querySelector(".job-id").textContent = `job:${id}`;
  $("jobs").prepend(el);
  const sub = client.subscribe(`job:${id}`, {
    onState: (state) => renderJob(id, latest(state)),
    onMessage: (msg) => {
      log.push({ channel: msg.channel, epoch: msg.epoch, offset: msg.offset, event: msg.event });
      renderJob(id, msg.data);
    },
    onError: (err) => {
      const [badge, sentence] = ERROR_WORDS[err.code] || ["Cannot watch", err.message || "The gateway refused this job's updates."];
      el.dataset.error = err.code || "error";
      setText(el.querySelector(".badge"), badge);
      setText(el.querySelector(".message"), sentence);
      el.querySelector(".message").title = err.message || "";
    },
  });
  jobs.set(id, { el, sub });
  pruneJobs();
}

function pruneJobs() {
  // Keep the page short: forget the oldest finished jobs.
  const finished = [...jobs].filter(([, j]) => TERMINAL.has(j.el.dataset.status) || j.el.dataset.error);
  while (jobs.size > MAX_JOBS && finished.length) {
    const [id, job] = finished.shift();
    job.sub.unsubscribe();
    job.el.remove();
    jobs.delete(id);
  }
}

function notify(kind, text) {
  const li = document.createElement("li");
  li.className = "note";
  li.dataset.kind = kind;
  const icon = { completed: "✓", failed: "✕", cancelled: "⊘" }[kind] || "•";
  li.innerHTML = '<span class="icon" aria-hidden="true"></span><span class="text"></span><span class="when"></span>';
  li.querySelector(".icon").textContent = icon;
  li.querySelector(".text").textContent = text;
  li.querySelector(".when").textContent = new Date().toLocaleTimeString();
  const list = $("notifications");
  list.prepend(li);
  while (list.children.length > MAX_NOTES) list.lastElementChild.remove();
}

function onUserMessage(msg) {
  log.push({ channel: msg.channel, epoch: msg.epoch, offset: msg.offset, event: msg.event });
  const data = msg.data || {};
  if (msg.event === "job" && data.kind === "job") {
    watchJob(data.jobId, data.title);
  } else if (msg.event === "notification" && data.kind === "job") {
    watchJob(data.jobId); // a job that started before this page connected
    const title = jobs.get(data.jobId)?.el.querySelector(".job-title").textContent || data.jobId;
    const what = data.status === "completed" ? "completed" : `${data.status}: ${data.message || ""}`;
    notify(data.status, `${title} ${what}`);
    desktopNotify(`${title} ${data.status}`, data.message || "", data.jobId);
  } else if (data.message) {
    notify("info", String(data.message));
  }
}

// Browser notifications for finished jobs: permission is asked only when the user clicks.
function desktopNotify(title, body, tag) {
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  try {
    new Notification(title, { body, tag });
    desktopShown.push({ title, body });
  } catch { /* e.g. a browser that only notifies from a service worker */ }
}

function setupDesktop() {
  const button = $("desktop");
  if (!("Notification" in window)) return;
  button.hidden = false;
  const show = () => {
    const permission = Notification.permission;
    button.disabled = permission !== "default";
    setText(button, { granted: "Desktop notifications on", denied: "Desktop notifications blocked" }[permission]
      || "Notify me when jobs finish");
  };
  show();
  button.addEventListener("click", async () => {
    try { await Notification.requestPermission(); } finally { show(); }
  });
}

function renderMetrics(data) {
  // The admin:metrics convention: a flat object of figures, name -> number.
  const dl = $("metrics");
  const rows = [];
  for (const [name, value] of Object.entries(data || {})) {
    if (typeof value !== "number") continue;
    const dt = document.createElement("dt");
    dt.textContent = name.replaceAll("_", " ");
    const dd = document.createElement("dd");
    dd.textContent = value.toLocaleString();
    dd.dataset.metric = name;
    rows.push(dt, dd);
  }
  dl.replaceChildren(...rows);
}

function renderFooter() {
  setText($("transport"), client.transport || "–");
  setText($("count"), String(log.length));
  setText($("dups"), String(client.stats.duplicates));
  setText($("reconnects"), String(client.stats.reconnects));
}

const first = await fetchToken();
const transports = params.get("transports")?.split(",").filter(Boolean);
const tuning = {};
for (const key of ["backoffMaxMs", "pollIntervalMs", "openTimeoutMs", "refreshBeforeMs"]) {
  if (params.has(key)) tuning[key] = Number(params.get(key));
}
const client = new HeraldClient({
  token: first.token,
  getToken: async () => (await fetchToken()).token,
  ...(transports ? { transports } : {}),
  ...tuning,
});
window.heraldDemo.client = client;
setText($("origin"), location.origin);
if (!first.simulated) setText($("jobs-note"), "Jobs published to this gateway for the demo user appear here.");

client.on("state", (state) => {
  if (LIVE.has(state)) everLive = true;
  if (everLive) markStale(LIVE.has(state));
  $("status").dataset.state = state;
  setText($("status-label"), LABELS[state] || state);
  document.body.dataset.state = state;
  (window.heraldDemo.states ||= []).push(state);
  renderFooter();
});
client.on("message", renderFooter);
client.on("connected", async () => {
  // Jobs announced while the page was connecting: ask again once connected.
  try { for (const id of (await fetchToken()).jobs) watchJob(id); } catch { /* next time */ }
});
client.subscribe(`user:${first.user}`, { onMessage: onUserMessage });
if (first.metrics) {
  client.subscribe(first.metrics, {
    onMessage: (msg) => renderMetrics(msg.data),
    onError: () => setText($("metrics-empty"), "This page may not read the admin metrics."),
  });
}
setupDesktop();
for (const id of [...first.jobs, ...(params.get("jobs")?.split(",").filter(Boolean) || [])]) watchJob(id);
client.connect();
setInterval(renderFooter, 1000);
