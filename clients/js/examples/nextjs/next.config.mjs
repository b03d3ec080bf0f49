import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// @streambus/client is linked from clients/js (file:../..), outside this folder.
const root = join(dirname(fileURLToPath(import.meta.url)), "../..");

export default { turbopack: { root }, outputFileTracingRoot: root };
