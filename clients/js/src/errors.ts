/**
 * Every error this package raises derives from {@link StreamBusError}:
 *
 * ```
 * StreamBusError
 * ├── ProtocolError        a server frame or event is malformed (`field` names what)
 * ├── ServerError          the server sent an `error` frame (`code`, `field`)
 * │   └── ForbiddenError   ... `forbidden`: the request is outside the token's scope
 * ├── ConnectionClosedError the WebSocket closed and the client will not reconnect (`code`)
 * ├── UnauthorizedError    WebSocket close 4001/4005 or HTTP 401: no token, a wrong or an expired one
 * └── HttpError            an HTTP output answered with a non-2xx status (`status`, `body`)
 * ```
 *
 * Use `instanceof` to tell them apart; `err.name` is the class name.
 */
export class StreamBusError extends Error {
  override name = "StreamBusError";
}

/** A frame from the server is not what protocol 1 allows; `field` names the offending field. */
export class ProtocolError extends StreamBusError {
  override name = "ProtocolError";
  /** The JSON path of the offending field (`$.seq`), or `$` for the frame as a whole. */
  readonly field: string;
  constructor(message: string, field = "$") {
    super(message);
    this.field = field;
  }
}

/** The server answered with an `error` frame (see docs/websocket-protocol.md for every `code`). */
export class ServerError extends StreamBusError {
  override name = "ServerError";
  readonly code: string;
  readonly field: string | undefined;
  constructor(code: string, message: string, field?: string) {
    super(`${code}: ${message}`);
    this.code = code;
    this.field = field;
  }
}

/**
 * The server refused a request outside what the connection may do (`error` frame `forbidden`):
 * a subscription naming another tenant's stream or meta value (nothing was subscribed), or a
 * `stop()` without the stop right or of a stream outside the token's scope. The connection
 * stays open. `message` says what was refused (never the token).
 */
export class ForbiddenError extends ServerError {
  override name = "ForbiddenError";
  constructor(message: string, field?: string) {
    super("forbidden", message, field);
  }
}

/** The WebSocket closed for a reason that reconnecting does not fix (1009, 4004) or `close()` was called. */
export class ConnectionClosedError extends StreamBusError {
  override name = "ConnectionClosedError";
  readonly code: number;
  readonly reason: string;
  constructor(code: number, reason: string, message?: string) {
    super(message ?? `connection closed (${code}${reason ? `: ${reason}` : ""})`);
    this.code = code;
    this.reason = reason;
  }
}

/** An HTTP output answered with a status other than 2xx; `body` is the server's reason. */
export class HttpError extends StreamBusError {
  override name = "HttpError";
  readonly status: number;
  readonly body: string;
  constructor(status: number, body: string, url: string) {
    super(`HTTP ${status} from ${url}: ${body.trim() || "(no body)"}`);
    this.status = status;
    this.body = body;
  }
}

/**
 * No token, a wrong one or an expired one: WebSocket close 4001 (refused) or 4005 (the scoped
 * token expired while connected), or HTTP 401. Reconnecting without a new token will not help.
 */
export class UnauthorizedError extends StreamBusError {
  override name = "UnauthorizedError";
  /** 4001 or 4005 for the WebSocket, 401 for HTTP. */
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.code = code;
  }
}
