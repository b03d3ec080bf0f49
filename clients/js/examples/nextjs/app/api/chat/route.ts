// POST /api/chat: useChat's send. Start the generation, then hand the bus's UI message stream
// through. The streambus token stays on the server (never in the page).
const BUS = process.env.STREAMBUS_HTTP ?? "http://127.0.0.1:8090";

export async function POST(req: Request): Promise<Response> {
  const body = await req.json();
  // Start your producer here: its stream must carry start.meta.chat = body.id. The http sink
  // waits (start_timeout) for the live or next stream of that chat, so the order does not matter.
  return fetch(`${BUS}/api/chat`, {
    method: "POST",
    headers: { Authorization: `Bearer ${process.env.STREAMBUS_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: req.signal,
  });
}
