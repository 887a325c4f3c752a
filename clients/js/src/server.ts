// @herald/client/server: publish to Herald from Node backends and workers over
// the HTTP API (PROTOCOL.md §3), mirroring the Python publisher
// (gateway/sdk/publisher.py): the same methods, the same job-progress message,
// the same error codes.
//
//   import { HeraldPublisher } from "@herald/client/server";
//   const herald = new HeraldPublisher("http://herald:8080", process.env.HERALD_API_KEY!);
//   await herald.registerJob("550e8400", "user-123");
//   await herald.jobProgress("550e8400", "user-123", "processing", 45, { stage: "inference" });
//
// Runs wherever `fetch` exists (Node 18+). The API key travels in the
// Authorization header, never in a URL.
import type { Json } from "./index.js";

/**
 * A publication Herald refused or could not take. `code` is a protocol error
 * code (`bad_request`, `unauthorized`, `forbidden`, `not_found`,
 * `message_too_large`, `rate_limited`, `unavailable`, `internal`...);
 * `status` the HTTP status when there was an answer, else null.
 * `unavailable` means the outcome is unknown: retry with the same idempotency key.
 */
export class PublishError extends Error {
  readonly code: string;
  readonly status: number | null;
  readonly detail: string;

  constructor(code: string, message: string, status: number | null = null) {
    super(`${code}: ${message}`);
    this.name = "PublishError";
    this.code = code;
    this.detail = message;
    this.status = status;
  }
}

/** Where a publication landed; `duplicate` when its idempotency key had already been applied. */
export interface PublishResult {
  channel: string;
  epoch: string;
  offset: number;
  duplicate?: boolean;
}

export interface PublishOptions {
  /** On a `job:` channel: the owner, recorded if none is yet, refused if another is. */
  owner?: string;
  /** 1-128 of `[A-Za-z0-9_.:-]`: a retry with the same key publishes nothing new. */
  idempotencyKey?: string;
}

export interface JobProgressOptions {
  stage?: string | null;
  message?: string | null;
  idempotencyKey?: string;
}

/** One item of `publishMany`. */
export interface Publication extends PublishOptions {
  channel: string;
  event: string;
  data: Json;
}

export interface BatchOptions {
  /** How long `publish` waits for company before a batch goes out (ms). Default 5. */
  lingerMs?: number;
  /** The most publications in one request (the server takes at most 1000). Default 100. */
  maxItems?: number;
}

export interface PublisherOptions {
  /** Per request (ms). Default 10000. */
  timeoutMs?: number;
  /** Coalesce concurrent `publish`/`jobProgress` calls into batch requests (`{"publications": [...]}`). */
  batch?: boolean | BatchOptions;
}

export const MAX_BATCH = 1000;
const KEY = /^[A-Za-z0-9_.:-]{1,128}$/;

interface Pending {
  item: Publication;
  resolve: (result: PublishResult) => void;
  reject: (error: PublishError) => void;
}

type BatchReply = Array<PublishResult | { error: string; message: string }>;

export class HeraldPublisher {
  readonly baseUrl: string;
  private readonly headers: Record<string, string>;
  private readonly timeoutMs: number;
  private readonly batch: Required<BatchOptions> | null;
  private pending: Pending[] = [];
  private timer: ReturnType<typeof setTimeout> | null = null;
  private inFlight = new Set<Promise<void>>();

  constructor(baseUrl: string, apiKey: string, options: PublisherOptions = {}) {
    if (!apiKey) throw new PublishError("bad_request", "an API key is required");
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.headers = { Authorization: `apikey ${apiKey}`, "Content-Type": "application/json" };
    this.timeoutMs = options.timeoutMs ?? 10000;
    const batch = options.batch === true ? {} : options.batch || null;
    this.batch = batch
      ? { lingerMs: batch.lingerMs ?? 5, maxItems: Math.min(MAX_BATCH, Math.max(1, batch.maxItems ?? 100)) }
      : null;
  }

  /** Publish one event; resolves with its position. */
  publish(channel: string, event: string, data: Json, options: PublishOptions = {}): Promise<PublishResult> {
    const item: Publication = { channel, event, data, ...options };
    try {
      checkKey(item.idempotencyKey);
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.batch) {
      return new Promise((resolve, reject) => {
        this.pending.push({ item, resolve, reject });
        if (this.pending.length >= this.batch!.maxItems) this.flush();
        else this.timer ??= setTimeout(() => this.flush(), this.batch!.lingerMs);
      });
    }
    return this.publishOne(item);
  }

  /** The same event on several channels (deduplicated): one position per channel. */
  async broadcast(channels: Iterable<string>, event: string, data: Json): Promise<PublishResult[]> {
    const reply = await this.post<{ publications: PublishResult[] }>("/api/v1/broadcast", {
      channels: [...new Set(channels)],
      event,
      data,
    });
    return reply.publications;
  }

  /** Record who owns `job:{jobId}`, so the owner may subscribe before any progress. */
  async registerJob(jobId: string, owner: string): Promise<void> {
    await this.post("/api/v1/jobs", { job: jobId, owner });
  }

  /**
   * A `progress` event on `job:{jobId}` owned by `userId`. A terminal status
   * (`completed`, `failed`, `cancelled`) also reaches `user:{userId}` as a
   * `notification` (the gateway does that), so a user who left the page hears it.
   */
  jobProgress(
    jobId: string,
    userId: string,
    status: string,
    progress: number,
    options: JobProgressOptions = {},
  ): Promise<PublishResult> {
    if (typeof status !== "string" || !status) {
      return Promise.reject(new PublishError("bad_request", "status must be a non-empty string"));
    }
    if (typeof progress !== "number" || !Number.isFinite(progress)) {
      return Promise.reject(new PublishError("bad_request", "progress must be a number"));
    }
    const data = { jobId, status, progress, stage: options.stage ?? null, message: options.message ?? null };
    const opts: PublishOptions = { owner: userId };
    if (options.idempotencyKey !== undefined) opts.idempotencyKey = options.idempotencyKey;
    return this.publish(`job:${jobId}`, "progress", data, opts);
  }

  /**
   * Many publications in as few requests as the server allows (batches of at
   * most `MAX_BATCH`, order kept per channel). One entry per item, in order:
   * its position, or the PublishError that item met; a failure of the request
   * itself rejects.
   */
  async publishMany(items: Publication[]): Promise<Array<PublishResult | PublishError>> {
    for (const item of items) checkKey(item.idempotencyKey);
    const out: Array<PublishResult | PublishError> = [];
    for (let i = 0; i < items.length; i += MAX_BATCH) {
      out.push(...(await this.sendBatch(items.slice(i, i + MAX_BATCH))));
    }
    return out;
  }

  /** Send whatever waits for a batch, and wait for every request under way. */
  async close(): Promise<void> {
    this.flush();
    while (this.inFlight.size) await Promise.allSettled([...this.inFlight]);
  }

  // -- internals ------------------------------------------------------------

  private flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const batch = this.pending.splice(0);
    if (!batch.length) return;
    const run = this.sendBatch(batch.map((p) => p.item)).then(
      (results) => results.forEach((r, i) => (r instanceof PublishError ? batch[i]!.reject(r) : batch[i]!.resolve(r))),
      (err: PublishError) => batch.forEach((p) => p.reject(err)),
    );
    this.inFlight.add(run);
    void run.finally(() => this.inFlight.delete(run));
  }

  /** One batch request (PROTOCOL.md: batch publish); a lone item goes as a plain publish. */
  private async sendBatch(items: Publication[]): Promise<Array<PublishResult | PublishError>> {
    if (items.length === 1) {
      try {
        return [await this.publishOne(items[0]!)];
      } catch (err) {
        if (err instanceof PublishError && err.code !== "unavailable") return [err];
        throw err;
      }
    }
    const reply = await this.post<{ results?: BatchReply }>("/api/v1/publish", {
      publications: items.map(wireItem),
    });
    if (!Array.isArray(reply.results) || reply.results.length !== items.length) {
      throw new PublishError("internal", "the batch answer does not match the request");
    }
    return reply.results.map((r) => ("error" in r ? new PublishError(r.error, r.message) : r));
  }

  /** One publication, one request; its key goes in the `Idempotency-Key` header. */
  private publishOne(item: Publication): Promise<PublishResult> {
    const { idempotency_key: key, ...body } = wireItem(item);
    return this.post<PublishResult>("/api/v1/publish", body, key === undefined ? {} : { "Idempotency-Key": key });
  }

  private async post<T>(path: string, body: unknown, extra: Record<string, string> = {}): Promise<T> {
    let payload: string;
    try {
      payload = JSON.stringify(body);
    } catch (err) {
      throw new PublishError("bad_request", `data is not JSON-serialisable: ${String(err)}`);
    }
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, {
        method: "POST",
        headers: { ...this.headers, ...extra },
        body: payload,
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (err) {
      throw new PublishError("unavailable", `cannot reach Herald: ${err instanceof Error ? err.message : String(err)}`);
    }
    const text = await res.text().catch(() => "");
    let reply: unknown = null;
    try {
      reply = text ? JSON.parse(text) : null;
    } catch {
      reply = null;
    }
    if (res.ok) {
      if (reply !== null) return reply as T;
      throw new PublishError("internal", `HTTP ${res.status} without a JSON body`, res.status);
    }
    if (isProblem(reply)) throw new PublishError(reply.error, reply.message, res.status);
    const code = res.status >= 500 ? (res.status === 503 ? "unavailable" : "internal") : "bad_request";
    throw new PublishError(code, `HTTP ${res.status}: ${text.slice(0, 200)}`, res.status);
  }
}

interface WireItem {
  channel: string;
  event: string;
  data: Json;
  owner?: string;
  idempotency_key?: string;
}

function wireItem(item: Publication): WireItem {
  const out: WireItem = { channel: item.channel, event: item.event, data: item.data };
  if (item.owner !== undefined) out.owner = item.owner;
  if (item.idempotencyKey !== undefined) out.idempotency_key = item.idempotencyKey;
  return out;
}

function checkKey(key: string | undefined): void {
  if (key !== undefined && !KEY.test(key)) {
    throw new PublishError("bad_request", "idempotencyKey must be 1-128 of [A-Za-z0-9_.:-]");
  }
}

function isProblem(value: unknown): value is { error: string; message: string } {
  return (
    typeof value === "object" && value !== null &&
    typeof (value as { error?: unknown }).error === "string" &&
    typeof (value as { message?: unknown }).message === "string"
  );
}
