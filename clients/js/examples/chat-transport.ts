// Type-level proof that StreamBusChatTransport is an AI SDK ChatTransport (checked by
// `tsc -p tsconfig.page.json`, part of `npm test`): this file does not compile otherwise.
import type { ChatTransport, UIMessage, UIMessageChunk } from "ai";
import { StreamBusChatTransport } from "../src/index.js";

export const transport: ChatTransport<UIMessage> = new StreamBusChatTransport<UIMessage, UIMessageChunk>({ api: "/api/chat" });
