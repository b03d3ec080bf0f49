// GET /api/chat/{id}/stream: useChat's resume (204 when the chat has no live stream).
const BUS = process.env.STREAMBUS_HTTP ?? "http://127.0.0.1:8090";

export async function GET(req: Request, { params }: { params: Promise<{ id: string }> }): Promise<Response> {
  const { id } = await params;
  return fetch(`${BUS}/api/chat/${encodeURIComponent(id)}/stream`, {
    headers: { Authorization: `Bearer ${process.env.STREAMBUS_TOKEN}` },
    signal: req.signal,
  });
}
