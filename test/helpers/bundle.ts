/**
 * What a bin/imgmount process loaded, as source files. `npm run build` bundles
 * the command line and the daemon (scripts/build-bundle.mjs): dist/cli/main.js,
 * dist/fuse/daemon-entry.js and their chunks in dist/chunks/, each listed with
 * its size and the sources in it in dist/chunks/sources.json. A dist/ file that
 * is not in that list (or whose size differs: `tsc` ran after the bundler) is
 * tsc's output of the source with the same path under src/.
 */
import { readFileSync, statSync } from 'node:fs';
import { relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './qemu.js';

export const ROOT = resolve(import.meta.dirname, '../..');
export const IMGMOUNT = resolve(ROOT, 'bin/imgmount');
const DIST = resolve(ROOT, 'dist');

interface Output {
  bytes: number;
  inputs: string[];
}

/** dist/chunks/sources.json, or an empty list when the build did not bundle. */
export function bundleOutputs(): Record<string, Output> {
  try {
    return JSON.parse(readFileSync(resolve(DIST, 'chunks/sources.json'), 'utf8')) as Record<string, Output>;
  } catch {
    return {};
  }
}

/** Whether `distPath` (relative to dist/, e.g. 'cli/main.js') is the bundler's output, not tsc's. */
export function isBundle(distPath: string, outputs = bundleOutputs()): boolean {
  const output = outputs[distPath];
  if (output === undefined) return false;
  try {
    return statSync(resolve(DIST, distPath)).size === output.bytes;
  } catch {
    return false;
  }
}

/** The files (file: URLs, as NODE_DEBUG=esm names them) a process loaded, as paths from the package root; node: modules left out. */
export function sourcesOf(moduleUrls: readonly string[]): string[] {
  const outputs = bundleOutputs();
  const sources = new Set<string>();
  for (const url of moduleUrls) {
    if (!url.startsWith('file:')) continue;
    const path = fileURLToPath(url);
    const fromDist = relative(DIST, path);
    if (fromDist.startsWith('..')) sources.add(relative(ROOT, path));
    else if (isBundle(fromDist, outputs)) for (const input of outputs[fromDist]!.inputs) sources.add(input);
    else sources.add(`src/${fromDist.replace(/\.js$/, '.ts')}`);
  }
  return [...sources].sort();
}

/** Runs bin/imgmount with NODE_DEBUG=esm: its exit status, the module URLs it loaded, and its stdout. */
export async function modulesLoaded(args: readonly string[], cwd?: string): Promise<{ code: number; modules: string[]; stdout: string }> {
  const result = await run('env', ['NODE_DEBUG=esm', IMGMOUNT, ...args], cwd === undefined ? {} : { cwd });
  const modules = [...result.stderr.matchAll(/Storing (\S+)/g)].map((match) => match[1]!);
  return { code: result.code, modules, stdout: result.stdout };
}
