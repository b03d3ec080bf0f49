// app/api/chat/route.ts — start the generation, then hand the bus's UI message stream through
import { STREAMBUS_URL, authorization, refuseCrossSite, startGeneration } from "../../../lib/streambus";

export async function POST(req: Request) {
  const refused = refuseCrossSite(req);
  if (refused) return refused;
  const body = await req.json().catch(() => null); // not JSON: answered 400 below
  if (typeof body?.id !== "string" || !Array.isArray(body.messages)) {
    return new Response('the body needs the chat "id" and its "messages" (useChat sends them)\n', { status: 400 });
  }
  // The route names the stream, then reads it by that name: the whole answer from its start,
  // even when a fast producer has finished before this read arrives.
  const stream = crypto.randomUUID();
  await startGeneration(body.id, stream, body.messages);
  return fetch(`${STREAMBUS_URL}/streams/${stream}/ui`, {
    headers: authorization(),
    signal: req.signal, // the browser went away: stop reading the bus for it
  });
}
