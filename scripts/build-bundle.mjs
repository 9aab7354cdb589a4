#!/usr/bin/env node
// Bundles the two programs with esbuild, after tsc, so that a process compiles
// one script from V8's code cache instead of loading ~60 ES modules
// (docs/performance.md, "Start-up time"):
//
//   dist/cli/main.cjs           the command line (src/cli/main.ts), run by bin/imgmount
//   dist/fuse/daemon-entry.cjs  the background daemon (src/fuse/daemon-entry.ts)
//
// Each is a CommonJS script with its V8 code cache beside it
// (`BUNDLE.ID.cache`), made here by compiling the script once; bin/run-bundle.cjs
// compiles a bundle with that cache. A script, not an ES module: Node 20 takes
// cached data only for scripts (vm.Script), and an ES module bundle measured
// slower still. tsc's dist/fuse/daemon-entry.js, which src/cli/background.ts
// spawns, is replaced by a three-line ES module that runs dist/fuse/daemon-entry.cjs
// (a later tsc puts the unbundled daemon back). The library (dist/index.js and the
// rest of dist/) stays tsc's output; so does dist/cli/main.js, which bin/imgmount
// runs when there is no bundle or tsc ran after it.
//
// The first line of a bundle names its ID, a hash of its text, and the cache's
// file name carries it: V8 checks only a script's length against its cache, so
// a cache is never used for another build of the same length.
//
// Lazy evaluation is kept: esbuild turns each `await import()` of the sources (a
// command's module, the block layer, FUSE, zstddec) into an init function that
// runs on first use, so `--help` does not evaluate the block layer.
// The native addon (build/Release/imgmount.node) stays outside, loaded at run
// time by src/native/index.ts from `new URL('../../build/Release/...',
// import.meta.url)`; cli-progress stays in node_modules, required at run time.
// import.meta.url is the bundle's own URL, and the bundles lie two directories
// below the package root as the sources do (src/cli, src/fuse), so those paths
// mean the same in a bundle; this script checks each one against the files.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import Module from 'node:module';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Script } from 'node:vm';
import { build } from 'esbuild';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');

function fail(message) {
  console.error(`build-bundle: ${message}`);
  process.exit(1);
}

if (!existsSync(join(dist, 'fuse'))) fail('dist/fuse is missing: run tsc first (npm run build does)');
rmSync(join(dist, 'chunks'), { recursive: true, force: true }); // an earlier build's ES module chunks

// debug (src/fuse/log.ts, the formats' loggers) tries require('supports-color') when it
// loads, for 256 colours; it is no dependency of ours, so that is a failed lookup through
// every node_modules directory above the bundle (0.8 ms in each process that opens an
// image). The bundle answers it with nothing: debug's 6 basic colours, as without it.
const noSupportsColor = {
  name: 'no-supports-color',
  setup(build) {
    build.onResolve({ filter: /^supports-color$/ }, () => ({ path: 'supports-color', namespace: 'imgmount-absent' }));
    build.onLoad({ filter: /.*/, namespace: 'imgmount-absent' }, () => ({ contents: 'module.exports = undefined;', loader: 'js' }));
  },
};

let result;
try {
  result = await build({
    absWorkingDir: root,
    entryPoints: { 'cli/main': 'src/cli/main.ts', 'fuse/daemon-entry': 'src/fuse/daemon-entry.ts' },
    outdir: 'dist',
    outExtension: { '.js': '.cjs' },
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    // The sources are ES modules, so strict; the directive must come first.
    banner: { js: '"use strict";\nvar __imgmount_import_meta_url = require("node:url").pathToFileURL(__filename).href;' },
    define: { 'import.meta.url': '__imgmount_import_meta_url' },
    plugins: [noSupportsColor],
    // A native package loads its platform's .node file by a computed name: it stays
    // outside and is required from node_modules at run time (only when a VHDX opens).
    external: ['@node-rs/crc32'],
    sourcemap: false,
    write: false,
    logLevel: 'warning',
  });
} catch {
  fail('esbuild failed; see above');
}

// Each `new URL('relative', import.meta.url)` in a bundle must name an existing file or directory.
function checkPaths(file, text) {
  let found = 0;
  for (const match of text.matchAll(/new URL\(\s*(["'`])(\.{1,2}\/[^"'`]*)\1\s*,\s*__imgmount_import_meta_url\s*\)/g)) {
    const target = fileURLToPath(new URL(match[2], pathToFileURL(file)));
    if (!existsSync(target)) fail(`${relative(root, file)} refers to ${match[2]}, which would be ${relative(root, target)}: no such file`);
    found++;
  }
  return found;
}

// The daemon's entry as src/cli/background.ts spawns it: runs the bundle beside it.
writeFileSync(
  join(dist, 'fuse/daemon-entry.js'),
  `// Written by scripts/build-bundle.mjs over tsc's output: runs the bundled daemon.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
createRequire(import.meta.url)('../../bin/run-bundle.cjs').run(fileURLToPath(new URL('./daemon-entry.cjs', import.meta.url)));
`,
);

let paths = 0;
for (const output of result.outputFiles) {
  const id = createHash('sha256').update(output.contents).digest('hex').slice(0, 16);
  const text = `// imgmount bundle ${id}\n${output.text}`;
  paths += checkPaths(output.path, text);
  // Old caches go; the new one is what compiling the script exactly as bin/run-bundle.cjs does leaves.
  for (const name of readdirSync(dirname(output.path))) {
    if (name.startsWith(`${basename(output.path)}.`) && name.endsWith('.cache')) rmSync(join(dirname(output.path), name));
  }
  writeFileSync(output.path, text);
  const cache = new Script(Module.wrap(text), { filename: output.path }).createCachedData();
  writeFileSync(`${output.path}.${id}.cache`, cache);
}
if (paths === 0) fail('no import.meta.url path found in the bundles: the check above no longer sees them');
