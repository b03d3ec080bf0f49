// Where the streambus http sink listens and the token it wants; server-side only, so the token
// never reaches the browser.
export const STREAMBUS_URL = process.env.STREAMBUS_URL ?? "http://127.0.0.1:8090";

export function authorization(): Record<string, string> {
  return process.env.STREAMBUS_TOKEN ? { Authorization: `Bearer ${process.env.STREAMBUS_TOKEN}` } : {};
}

// Your producer: whatever runs the model and writes its stream to the bus as `stream` (the id
// the route picked) with `start.meta.chat` = the chat id. Here it is a service at GENERATE_URL
// that starts the generation and answers at once (the bus carries the tokens, not this request).
export async function startGeneration(chatId: string, stream: string, messages: unknown): Promise<void> {
  const url = process.env.GENERATE_URL;
  if (!url) throw new Error("GENERATE_URL is not set: where is the service that starts a generation?");
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ chat: chatId, stream, messages }),
  });
  if (!res.ok) throw new Error(`starting the generation failed: ${res.status}`);
}

// A browser sends `Origin` with every POST; refuse one from another site, so a page elsewhere
// cannot start or stop this user's chats (route handlers, unlike server actions, do not check).
export function refuseCrossSite(req: Request): Response | null {
  const origin = req.headers.get("origin");
  if (origin === null) return null; // not sent by a browser page: server to server, curl
  const host = req.headers.get("x-forwarded-host") ?? req.headers.get("host");
  let from: string | null = null;
  try {
    from = new URL(origin).host;
  } catch {
    // "null" (a sandboxed frame, a file: page) or garbage: not this site
  }
  if (host !== null && from === host) return null;
  return new Response("cross-site request refused\n", { status: 403 });
}
