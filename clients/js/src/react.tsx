// React bindings for @herald/client (`import { useJobProgress } from "@herald/client/react"`).
//
// One HeraldClient per provider: hooks share its connection and its
// per-channel ordering and recovery, so a component never sees a message
// twice or out of order, whatever the transport. React is a peer dependency.
import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";

import {
  HeraldClient,
  type ChannelState,
  type ConnectionState,
  type HeraldErrorInfo,
  type HeraldMessage,
  type HeraldOptions,
  type Json,
  type Transport,
} from "./index.js";

const HeraldContext = createContext<HeraldClient | null>(null);

export interface HeraldProviderProps {
  /** A client of your own (the provider connects it, and leaves closing it to you)... */
  client?: HeraldClient;
  /** ...or options for one the provider creates, connects and closes on unmount. */
  options?: HeraldOptions;
  children?: ReactNode;
}

export function HeraldProvider({ client, options, children }: HeraldProviderProps): ReactNode {
  const [own] = useState<HeraldClient | null>(() => (client ? null : new HeraldClient(options)));
  const active = client ?? own;
  if (!active) throw new Error("HeraldProvider: the client prop went away; keep one client per provider");
  useEffect(() => {
    active.connect();
    // Only the client the provider made is the provider's to close.
    return active === own ? () => active.close() : undefined;
  }, [active, own]);
  return createElement(HeraldContext.Provider, { value: active }, children);
}

export interface HeraldConnection {
  client: HeraldClient;
  state: ConnectionState;
  transport: Transport | null;
}

/** The provider's client and its connection state (re-renders on every state change). */
export function useHerald(): HeraldConnection {
  const client = useContext(HeraldContext);
  if (!client) throw new Error("useHerald: no <HeraldProvider> above this component");
  const state = useSyncExternalStore(
    (notify) => client.on("state", notify),
    () => client.state,
    () => client.state,
  );
  return { client, state, transport: client.transport };
}

export interface ChannelView<T = Json> {
  /** The channel's state snapshot (state namespaces), from subscribe and after a reset. */
  snapshot: ChannelState;
  /** The latest publication handed over, null before the first. */
  message: HeraldMessage<T> | null;
  /** Which came last: the snapshot or a message (null: neither yet). */
  latest: "snapshot" | "message" | null;
  /** Why the subscription was refused (forbidden, not_found...), else null. */
  error: HeraldErrorInfo | null;
  state: ConnectionState;
  transport: Transport | null;
}

interface ChannelData<T> {
  channel: string | null;
  snapshot: ChannelState;
  message: HeraldMessage<T> | null;
  latest: "snapshot" | "message" | null;
  error: HeraldErrorInfo | null;
}

function empty<T>(channel: string | null): ChannelData<T> {
  return { channel, snapshot: null, message: null, latest: null, error: null };
}

/**
 * Follow a channel while the component is mounted (`null`: follow nothing).
 * `onMessage` sees every publication once, in order; the returned view holds
 * only the latest, as rendering needs.
 */
export function useChannel<T = Json>(
  channel: string | null | undefined,
  onMessage?: (message: HeraldMessage<T>) => void,
): ChannelView<T> {
  const { client, state, transport } = useHerald();
  const name = channel ?? null;
  const [data, setData] = useState<ChannelData<T>>(() => empty<T>(name));
  const handler = useRef(onMessage);
  handler.current = onMessage;
  useEffect(() => {
    setData(empty<T>(name));
    if (name === null) return undefined;
    const sub = client.subscribe<T>(name, {
      onState: (snapshot) => setData((d) => ({ ...d, snapshot, latest: "snapshot", error: null })),
      onMessage: (message) => {
        handler.current?.(message);
        setData((d) => ({ ...d, message, latest: "message", error: null }));
      },
      onError: (error) => setData((d) => ({ ...d, error })),
    });
    return () => sub.unsubscribe();
  }, [client, name]);
  // A render between a channel change and its effect shows nothing stale.
  const view = data.channel === name ? data : empty<T>(name);
  return { snapshot: view.snapshot, message: view.message, latest: view.latest, error: view.error, state, transport };
}

/** What a job's publications carry (gateway.sdk's and @herald/publisher's `jobProgress`). */
export interface JobUpdate {
  jobId?: string;
  status?: string;
  progress?: number;
  stage?: string | null;
  message?: string | null;
  [key: string]: Json | undefined;
}

export interface JobProgress {
  /** 0-100, 0 before anything is known. */
  progress: number;
  /** `queued`, `processing`, `completed`, `failed`, `cancelled`... null before anything is known. */
  status: string | null;
  stage: string | null;
  message: string | null;
  /** The connection's state: show "reconnecting" instead of a frozen bar. */
  state: ConnectionState;
  transport: Transport | null;
  /** Why the job cannot be watched (forbidden: not the owner; not_found: no such job). */
  error: HeraldErrorInfo | null;
}

const TERMINAL_EVENTS = ["completed", "failed", "cancelled"] as const;

/** A job channel's snapshot holds each event's latest data: the terminal one wins. */
function fromSnapshot(snapshot: ChannelState): JobUpdate | null {
  if (!snapshot) return null;
  for (const event of [...TERMINAL_EVENTS, "progress"]) {
    const data = snapshot[event];
    if (data && typeof data === "object" && !Array.isArray(data)) return data as JobUpdate;
  }
  return null;
}

/** Live progress of `job:{jobId}` for its owner (null: no job yet). */
export function useJobProgress(jobId: string | null | undefined): JobProgress {
  const view = useChannel<JobUpdate>(jobId ? `job:${jobId}` : null);
  const update = view.latest === "message" ? view.message?.data ?? null : fromSnapshot(view.snapshot);
  const progress = Number(update?.progress);
  return {
    progress: Number.isFinite(progress) ? Math.max(0, Math.min(100, progress)) : 0,
    status: typeof update?.status === "string" ? update.status : null,
    stage: typeof update?.stage === "string" ? update.stage : null,
    message: typeof update?.message === "string" ? update.message : null,
    state: view.state,
    transport: view.transport,
    error: view.error,
  };
}

export { HeraldClient };
