#!/usr/bin/env node
// Builds the native addon (binding.gyp, native/imgmount.c) into
// build/Release/imgmount.node with the node-gyp of devDependencies. Run by
// `npm run build` before tsc; there is no install script, the build is explicit.
//
// Offline by design: node-gyp never downloads Node.js headers. They are taken
// from the running Node itself: <prefix>/include/node/node_api.h, where
// <prefix> is two levels above the real path of process.execPath (/usr for
// /usr/bin/node, the unpacked directory of a nodejs.org tarball), passed as
// --nodedir. Without them the build stops with one line naming the package.
//
// node-gyp's chatter is kept and printed only when the build fails; compiler
// warnings are printed always. `configure` runs again only when binding.gyp,
// the headers' place or this script changed since the last one.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, realpathSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);

function fail(message) {
  console.error(`build-native: ${message}`);
  process.exit(1);
}

const nodedir = resolve(realpathSync(process.execPath), '../..');
if (!existsSync(join(nodedir, 'include/node/node_api.h'))) {
  fail(
    `Node.js headers not found (no ${join(nodedir, 'include/node/node_api.h')} for the running node, ${process.execPath}); ` +
      `install them with Node: Debian's package libnode-dev for Debian's nodejs (NodeSource's nodejs package and nodejs.org tarballs include them)`,
  );
}

let nodeGyp;
try {
  nodeGyp = require.resolve('node-gyp/bin/node-gyp.js');
} catch {
  fail('node-gyp is not installed: run `npm ci` first');
}

function run(args) {
  const result = spawnSync(process.execPath, [nodeGyp, ...args, `--nodedir=${nodedir}`, '--loglevel=warn'], {
    cwd: root,
    encoding: 'utf8',
    // npm passes its own config (npm_config_nodedir, ...) in the environment; the
    // headers' place is ours alone, and node-gyp must not look for a download.
    env: { ...process.env, npm_config_nodedir: nodedir },
  });
  const output = `${result.stdout ?? ''}${result.stderr ?? ''}`;
  if (result.error) fail(`cannot run node-gyp: ${result.error.message}`);
  if (result.status !== 0) {
    process.stderr.write(output);
    fail(`node-gyp ${args[0]} failed (exit ${result.status}); see above (a fresh Debian needs build-essential and python3: scripts/install-deps.sh)`);
  }
  const warnings = output.split('\n').filter((line) => /warning:/.test(line));
  if (warnings.length > 0) process.stderr.write(`${warnings.join('\n')}\n`);
}

const stamp = join(root, 'build/imgmount-configure.json');
const mtime = (path) => statSync(path).mtimeMs;
const wanted = JSON.stringify({ nodedir, gyp: mtime(join(root, 'binding.gyp')), script: mtime(fileURLToPath(import.meta.url)) });
let configured = false;
try {
  configured = existsSync(join(root, 'build/Makefile')) && readFileSync(stamp, 'utf8') === wanted;
} catch {
  configured = false;
}
if (!configured) {
  run(['configure']);
  writeFileSync(stamp, wanted);
}
run(['build']);
if (!existsSync(join(root, 'build/Release/imgmount.node'))) fail('node-gyp succeeded but build/Release/imgmount.node is missing');
