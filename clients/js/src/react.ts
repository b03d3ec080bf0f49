import { useEffect, useState, useSyncExternalStore } from "react";
import type { ConnectionState, StreamBusClient } from "./client.js";
import type { StreamView } from "./stream.js";

/**
 * The live view of one stream (`null` until its first event arrives). Re-renders on every change.
 *
 * ```tsx
 * const s = useStream(client, id);
 * return <p>{s?.text}</p>;
 * ```
 */
export function useStream(client: StreamBusClient, id: string): StreamView | null {
  const subscribe = (notify: () => void): (() => void) => {
    let off = client.stream(id)?.onChange(notify);
    const offNew = client.on("stream", (s) => {
      if (s.id !== id) return;
      off?.();
      off = s.onChange(notify);
      notify();
    });
    return () => {
      off?.();
      offNew();
    };
  };
  return useSyncExternalStore(subscribe, () => client.stream(id)?.view ?? null, () => null);
}

/** Every stream the client holds, newest first, as views; re-renders on every change. */
export function useStreams(client: StreamBusClient): StreamView[] {
  const [views, setViews] = useState<StreamView[]>(() => [...client.streams.values()].map((s) => s.view).reverse());
  useEffect(() => {
    const refresh = (): void => setViews([...client.streams.values()].map((s) => s.view).reverse());
    const offEvent = client.on("event", refresh);
    const offSub = client.on("subscribed", refresh);
    refresh();
    return () => {
      offEvent();
      offSub();
    };
  }, [client]);
  return views;
}

/** The client's connection state (`connecting`, `live`, `reconnecting`, `closed`). */
export function useConnectionState(client: StreamBusClient): ConnectionState {
  return useSyncExternalStore((notify) => client.on("state", notify), () => client.state, () => "connecting");
}
