/**
 * @streambus/client: attach web apps to a streambus.
 *
 * - {@link StreamBusClient}: the WebSocket protocol (resume, recovery, snapshots).
 * - {@link StreamText}: one stream's text, reasoning, tool calls, status and usage.
 * - {@link readSSE}: the http sink's SSE outputs with `Last-Event-ID` resume.
 * - {@link StreamBusChatTransport}: a Vercel AI SDK `ChatTransport`.
 * - React hooks: `@streambus/client/react`.
 */
export { StreamBusClient } from "./client.js";
export type { ClientOptions, ClientStats, ConnectionState, Filters, StopResult, SubscribedInfo, WebSocketConstructor, WebSocketLike } from "./client.js";
export { StreamText } from "./stream.js";
export type { StreamListener, StreamStatus, StreamView, ToolCall } from "./stream.js";
export { isTerminal, parseEvent } from "./events.js";
export type { AbortEvent, BusEvent, Channel, DeltaEvent, EndEvent, ErrorEvent, ModerationEvent, StartEvent, Usage } from "./events.js";
export { readSSE, SSEParser } from "./sse.js";
export type { SSEMessage, SSEOptions } from "./sse.js";
export { StreamBusChatTransport } from "./chat.js";
export type { ChatStopResult, ChatTransportOptions, UIChunk } from "./chat.js";
export { ConnectionClosedError, ForbiddenError, HttpError, ProtocolError, ServerError, StreamBusError, UnauthorizedError } from "./errors.js";
