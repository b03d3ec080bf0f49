// Reads a streambus UI message stream with the `ai` package's own code and
// prints one JSON line for the Python test to check.
//
//   node read_ui_stream.mjs chat <api-url> <prompt>   -> what useChat ends with
//       (AbstractChat + DefaultChatTransport: the machinery behind useChat)
//   node read_ui_stream.mjs stop <api-url> <prompt>   -> what useChat ends with when stop() is
//       called as the first text arrives (DefaultChatTransport with the stop wiring of
//       docs/plugins/http.md: a fetch that posts <api>/<id>/abort when the SDK aborts)
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
  constructor(onChange = () => {}) {
    this.onChange = onChange;
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
    this.onChange(message);
  }
  snapshot(value) {
    return structuredClone(value);
  }
}

class Chat extends AbstractChat {
  constructor({ onChange, ...init }) {
    super({ ...init, state: new MemoryState(onChange) });
  }
}

// The stop wiring of docs/plugins/http.md: when the SDK aborts a chat request (useChat's stop()),
// tell the server to stop the chat's stream on the bus.
function stopAwareFetch(api) {
  return (url, init) => {
    const body = typeof init?.body === 'string' ? JSON.parse(init.body) : null;
    if (body?.id && init.signal) {
      init.signal.addEventListener(
        'abort',
        () => void fetch(`${api}/${encodeURIComponent(body.id)}/abort`, { method: 'POST' }).catch(() => {}),
        { once: true },
      );
    }
    return fetch(url, init);
  };
}

async function stop(api, prompt) {
  let finish = null;
  let stopped = false;
  let stopCall = null;
  const chat = new Chat({
    id: 'chat-1',
    transport: new DefaultChatTransport({ api, fetch: stopAwareFetch(api) }),
    onFinish: (r) => {
      finish = { isAbort: r.isAbort, isError: r.isError, finishReason: r.finishReason ?? null };
    },
    onChange: (message) => {
      if (!stopped && message.role === 'assistant' && message.parts.some((p) => p.type === 'text' && p.text)) {
        stopped = true;
        stopCall = chat.stop();
      }
    },
  });
  await chat.sendMessage({ text: prompt });
  await stopCall;
  return { status: chat.status, error: chat.error ? chat.error.message : null, finish, stopped, messages: chat.messages };
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
const modes = { chat, stop, chunks };
const result = await modes[mode](...args);
process.stdout.write(JSON.stringify(result) + '\n');
