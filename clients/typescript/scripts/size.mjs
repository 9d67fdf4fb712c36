// `npm run size`: what the browser helper costs a page. Bundles
// src/browser.ts with esbuild, minified (ES2022, ESM), and prints its raw,
// gzip and brotli sizes. Writes nothing.
import { build } from "esbuild";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { brotliCompressSync, constants, gzipSync } from "node:zlib";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const entry = path.join(root, "src", "browser.ts");
const result = await build({
  entryPoints: [entry],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  platform: "browser",
  write: false,
  logLevel: "warning",
});
const code = result.outputFiles[0].contents;
const gzip = gzipSync(code, { level: 9 }).length;
const brotli = brotliCompressSync(code, { params: { [constants.BROTLI_PARAM_QUALITY]: 11 } }).length;
const kib = (n) => `${n} B (${(n / 1024).toFixed(2)} KiB)`;
console.log(`ringcast/browser (src/browser.ts, esbuild --bundle --minify, es2022)`);
console.log(`  minified: ${kib(code.length)}`);
console.log(`  gzip -9:  ${kib(gzip)}`);
console.log(`  brotli:   ${kib(brotli)}`);
