// Prints the size of the bundle a page would load: src/index.ts bundled
// and minified by esbuild, then gzipped.

import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const out = await build({
  entryPoints: ["src/index.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  write: false,
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
console.log(`minified ${code.length} B, minified + gzip ${gz} B (${(gz / 1024).toFixed(1)} KiB)`);
