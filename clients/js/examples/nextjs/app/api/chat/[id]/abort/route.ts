// app/api/chat/[id]/abort/route.ts — stop (useChat's stop(), sent by StreamBusChatTransport);
// check here that the signed-in user owns chat `id` before passing the stop on
import { STREAMBUS_URL, authorization, refuseCrossSite } from "../../../../../lib/streambus";

export async function POST(req: Request, { params }: { params: Promise<{ id: string }> }) {
  const refused = refuseCrossSite(req);
  if (refused) return refused;
  const { id } = await params;
  return fetch(`${STREAMBUS_URL}/api/chat/${encodeURIComponent(id)}/abort`, {
    method: "POST",
    headers: authorization(),
  });
}
