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

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const jobs = new Map(); // job id -> {el, sub}
const log = [];         // every message handed to the page: the tests compare it with the publisher's
window.heraldDemo = { log, jobs };

async function fetchToken() {
  const res = await fetch("/demo/token", { cache: "no-store" });
  if (!res.ok) throw new Error(`demo token: HTTP ${res.status}`);
  return res.json();
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

function renderJob(id, data) {
  const job = jobs.get(id);
  if (!job || !data) return;
  const el = job.el;
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
      el.dataset.status = "failed";
      setText(el.querySelector(".badge"), err.code || "error");
      setText(el.querySelector(".message"), err.message || "cannot watch this job");
    },
  });
  jobs.set(id, { el, sub });
  pruneJobs();
}

function pruneJobs() {
  // Keep the page short: forget the oldest finished jobs.
  const finished = [...jobs].filter(([, j]) => ["completed", "failed"].includes(j.el.dataset.status));
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
  const icon = { completed: "✓", failed: "✕" }[kind] || "•";
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
  } else if (data.message) {
    notify("info", String(data.message));
  }
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
for (const id of [...first.jobs, ...(params.get("jobs")?.split(",").filter(Boolean) || [])]) watchJob(id);
client.connect();
setInterval(renderFooter, 1000);
