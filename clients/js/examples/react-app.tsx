// A small React app on the package's hooks (built by scripts/build-examples.mjs into
// examples/react.js; clients/js/tests/test_browser_example.py runs it in chromium).
import { createRoot } from "react-dom/client";
import { StreamBusClient } from "../src/index.js";
import { useConnectionState, useStream, useStreams } from "../src/react.js";

const bus = new StreamBusClient({ url: new URLSearchParams(location.search).get("ws") ?? "" });
(window as unknown as { bus: StreamBusClient }).bus = bus;

function Watched({ id }: { id: string }) {
  const s = useStream(bus, id); // null until the stream's first event
  return <p id="watched" data-status={s?.status ?? "none"}>{s ? s.text : "(waiting)"}</p>;
}

function App() {
  const state = useConnectionState(bus);
  const streams = useStreams(bus);
  return (
    <main data-state={state}>
      <Watched id="watched" />
      {streams.map((s) => (
        <article key={s.id} data-stream={s.id} data-status={s.status}>
          {s.toolCalls.map((t) => (
            <code key={t.index}>{`${t.name}(${t.arguments})`}</code>
          ))}
          <p>{s.text}</p>
          {s.usage && <footer>{s.usage.total_tokens} tokens</footer>}
        </article>
      ))}
    </main>
  );
}

createRoot(document.getElementById("root")!).render(<App />);
bus.connect();
