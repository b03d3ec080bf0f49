// app/api/chat/route.ts — start the generation, then hand the bus's UI message stream through
import { STREAMBUS_URL, authorization, refuseCrossSite, startGeneration } from "../../../lib/streambus";

export async function POST(req: Request) {
  const refused = refuseCrossSite(req);
  if (refused) return refused;
  const body = await req.json().catch(() => null); // not JSON: answered 400 below
  if (typeof body?.id !== "string" || !Array.isArray(body.messages)) {
    return new Response('the body needs the chat "id" and its "messages" (useChat sends them)\n', { status: 400 });
  }
  await startGeneration(body.id, body.messages); // start.meta.chat = body.id
  return fetch(`${STREAMBUS_URL}/api/chat`, {
    method: "POST",
    headers: { ...authorization(), "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: req.signal, // the browser went away: stop reading the bus for it
  });
}
