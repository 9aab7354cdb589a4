#!/usr/bin/env node
// Bundles the two process entry points with esbuild, after tsc: the command
// line (src/cli/main.ts -> dist/cli/main.js, what bin/imgmount runs) and the
// background daemon (src/fuse/daemon-entry.ts -> dist/fuse/daemon-entry.js,
// spawned by src/cli/background.ts). Each replaces the file tsc wrote there, so
// a process loads one file and the few shared chunks it needs (dist/chunks/)
// instead of ~60 modules: Node's ES module loader costs about a millisecond per
// module, most of `imgmount info`'s start (docs/performance.md, "Start-up time").
// A plain `tsc` afterwards puts the unbundled entries back, which work the same.
// The library (dist/index.js and the rest of dist/) stays tsc's output.
//
// Lazy loading is kept: each `await import()` of the sources (a command's module,
// the block layer, FUSE, zstddec) becomes a chunk loaded only when it is reached.
// The native addon (build/Release/imgmount.node) stays outside, loaded at run
// time by src/native/index.ts from `new URL('../../build/Release/...',
// import.meta.url)`; cli-progress stays in node_modules, required at run time.
//
// Every output file lies two directories below the package root (dist/cli,
// dist/fuse, dist/chunks), as the sources do (src/cli...), so the paths the
// sources resolve against import.meta.url (../../package.json, the addon,
// ../fuse/daemon-entry.js) mean the same in the bundle. This script checks
// every such path in the output against the files there and fails the build
// if one names nothing.
//
// dist/chunks/sources.json lists, for each output file, its size and the source
// files bundled into it, so tests can tell what a process loaded
// (test/helpers/bundle.ts).
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { build } from 'esbuild';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function fail(message) {
  console.error(`build-bundle: ${message}`);
  process.exit(1);
}

const chunks = join(root, 'dist/chunks');
rmSync(chunks, { recursive: true, force: true });

let result;
try {
  result = await build({
    absWorkingDir: root,
    entryPoints: { 'cli/main': 'src/cli/main.ts', 'fuse/daemon-entry': 'src/fuse/daemon-entry.ts' },
    outdir: 'dist',
    chunkNames: 'chunks/[name]-[hash]',
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    // Bundled CommonJS packages (debug) require Node's built-in modules: give ES modules a require.
    banner: { js: "import { createRequire as __imgmountCreateRequire } from 'node:module'; const require = __imgmountCreateRequire(import.meta.url);" },
    sourcemap: false,
    metafile: true,
    logLevel: 'warning',
  });
} catch {
  fail('esbuild failed; see above');
}

// Each `new URL('relative', import.meta.url)` in the output must name an existing file or directory.
let checked = 0;
for (const output of Object.keys(result.metafile.outputs)) {
  const file = join(root, output);
  const text = readFileSync(file, 'utf8');
  for (const match of text.matchAll(/new URL\(\s*(["'`])(\.{1,2}\/[^"'`]*)\1\s*,\s*import\.meta\.url\s*\)/g)) {
    const target = fileURLToPath(new URL(match[2], pathToFileURL(file)));
    if (!existsSync(target)) fail(`${relative(root, file)} refers to ${match[2]}, which would be ${relative(root, target)}: no such file`);
    checked++;
  }
}
if (checked === 0) fail('no import.meta.url path found in the output: the check above no longer sees them');

// What each output holds, for tests that check what a command loads.
const sources = {};
for (const [output, { bytes, inputs }] of Object.entries(result.metafile.outputs)) {
  sources[relative(join(root, 'dist'), join(root, output))] = { bytes, inputs: Object.keys(inputs).sort() };
}
writeFileSync(join(chunks, 'sources.json'), `${JSON.stringify(sources, null, 1)}\n`);
