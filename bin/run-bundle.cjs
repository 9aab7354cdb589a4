'use strict';
// Runs one of the bundles scripts/build-bundle.mjs writes (dist/cli/main.cjs,
// dist/fuse/daemon-entry.cjs) as a CommonJS module, compiled with the V8 code cache
// the build made for it: the first line of a bundle names its build ID, and its
// cache is BUNDLE.ID.cache beside it. Without that file, or when V8 turns the
// cache down (another Node.js or V8 flags), the script is compiled from its
// text as usual. Nothing is ever written here.
const { readFileSync } = require('node:fs');
const Module = require('node:module');
const { dirname } = require('node:path');
const { Script } = require('node:vm');

/** Runs the bundle at `filename` (an absolute path) as a module whose parent is `parent`. */
exports.run = function run(filename, parent) {
  const source = readFileSync(filename, 'utf8');
  const id = /^\/\/ imgmount bundle ([0-9a-f]+)\n/.exec(source)?.[1];
  let cachedData;
  if (id !== undefined) {
    try {
      cachedData = readFileSync(`${filename}.${id}.cache`);
    } catch {
      cachedData = undefined;
    }
  }
  const script = new Script(Module.wrap(source), { filename, cachedData });
  const bundle = new Module(filename, parent);
  bundle.filename = filename;
  bundle.paths = Module._nodeModulePaths(dirname(filename));
  bundle.loaded = true;
  script.runInThisContext().call(bundle.exports, bundle.exports, Module.createRequire(filename), bundle, filename, dirname(filename));
};
