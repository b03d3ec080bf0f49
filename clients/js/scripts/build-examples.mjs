// Bundles examples/react-app.tsx (React + the package's hooks) into examples/react.js for the
// chromium test; the output is a build artefact, not committed.
import { build } from "esbuild";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
await build({
  entryPoints: [join(root, "examples/react-app.tsx")],
  outfile: join(root, "examples/react.js"),
  bundle: true,
  format: "iife",
  jsx: "automatic",
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
