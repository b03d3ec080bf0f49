// POST /api/chat/{id}/abort: useChat's stop(), sent by StreamBusChatTransport when the SDK aborts.
// A real app checks here that the signed-in user owns chat `id`; with a scoped token the http sink
// also refuses a chat outside the token's reach, and any stop when the token lacks the stop right.
const BUS = process.env.STREAMBUS_HTTP ?? "http://127.0.0.1:8090";

export async function POST(req: Request, { params }: { params: Promise<{ id: string }> }): Promise<Response> {
  const { id } = await params;
  return fetch(`${BUS}/api/chat/${encodeURIComponent(id)}/abort`, {
    method: "POST",
    headers: { Authorization: `Bearer ${process.env.STREAMBUS_TOKEN}`, "Content-Type": "application/json" },
    body: await req.text(),
  });
}
