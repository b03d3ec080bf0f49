"use client";
import { useChat } from "@ai-sdk/react";
import type { UIMessage, UIMessageChunk } from "ai";
import { StreamBusChatTransport } from "@streambus/client";

const transport = new StreamBusChatTransport<UIMessage, UIMessageChunk>({ api: "/api/chat" });

export default function Chat({ id }: { id: string }) {
  const { messages, sendMessage, status, stop } = useChat({ id, transport, resume: true });
  return (
    <div>
      {messages.map((m) => (
        <p key={m.id} data-role={m.role}>
          {m.parts.map((p) => (p.type === "text" ? p.text : "")).join("")}
        </p>
      ))}
      <button onClick={() => sendMessage({ text: "Hello" })} disabled={status !== "ready"}>
        Send
      </button>
      {status === "streaming" && <button onClick={stop}>Stop</button>}
      <output data-status={status}>{status}</output>
    </div>
  );
}
