// Reads a streambus UI message stream with the `ai` package's own code and
// prints one JSON line for the Python test to check.
//
//   node read_ui_stream.mjs chat <api-url> <prompt>   -> what useChat ends with
//       (AbstractChat + DefaultChatTransport: the machinery behind useChat)
//   node read_ui_stream.mjs chunks <url>               -> every chunk, validated
//       by parseJsonEventStream + uiMessageChunkSchema, and the UIMessage that
//       readUIMessageStream builds from them
import {
  AbstractChat,
  DefaultChatTransport,
  parseJsonEventStream,
  readUIMessageStream,
  uiMessageChunkSchema,
} from 'ai';

class MemoryState {
  constructor() {
    this.status = 'ready';
    this.error = undefined;
    this.messages = [];
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(value) {
    return structuredClone(value);
  }
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new MemoryState() });
  }
}

async function chat(api, prompt) {
  let finish = null;
  const errors = [];
  const chat = new Chat({
    id: 'chat-1',
    transport: new DefaultChatTransport({ api }),
    onFinish: (r) => {
      finish = { isAbort: r.isAbort, isError: r.isError, finishReason: r.finishReason ?? null };
    },
    onError: (e) => errors.push(e.message),
  });
  await chat.sendMessage({ text: prompt });
  return { status: chat.status, error: chat.error ? chat.error.message : null, errors, finish, messages: chat.messages };
}

async function chunks(url) {
  const response = await fetch(url);
  const headers = Object.fromEntries(response.headers.entries());
  const [forChunks, forMessage] = response.body.tee();
  const parsed = [];
  const reader = parseJsonEventStream({ stream: forChunks, schema: uiMessageChunkSchema }).getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parsed.push(value.success ? { ok: true, chunk: value.value } : { ok: false, error: String(value.error) });
  }
  const valid = parsed.filter((p) => p.ok).map((p) => p.chunk);
  let message = null;
  const stream = new ReadableStream({
    start(controller) {
      for (const c of valid) controller.enqueue(c);
      controller.close();
    },
  });
  let readError = null;
  try {
    for await (const m of readUIMessageStream({ stream, terminateOnError: true })) message = m;
  } catch (e) {
    readError = e.message;
  }
  forMessage.cancel().catch(() => {});
  return { headers, parsed, message, readError };
}

const [mode, ...args] = process.argv.slice(2);
const result = mode === 'chat' ? await chat(...args) : await chunks(...args);
process.stdout.write(JSON.stringify(result) + '\n');
