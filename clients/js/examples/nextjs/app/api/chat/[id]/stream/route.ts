// app/api/chat/[id]/stream/route.ts — resume (204 when the chat has no live stream)
import { STREAMBUS_URL, authorization } from "../../../../../lib/streambus";

export async function GET(req: Request, { params }: { params: Promise<{ id: string }> }) {
  const { id } = await params;
  return fetch(`${STREAMBUS_URL}/api/chat/${encodeURIComponent(id)}/stream`, {
    headers: authorization(),
    signal: req.signal,
  });
}
