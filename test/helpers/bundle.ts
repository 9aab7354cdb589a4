/**
 * Which source modules a bin/imgmount process evaluated, bundled or not, read
 * from V8's coverage of that process (NODE_V8_COVERAGE).
 *
 * `npm run build` bundles the command line and the daemon
 * (scripts/build-bundle.mjs): dist/cli/main.cjs and dist/fuse/daemon-entry.cjs,
 * each one script holding every module. esbuild wraps a module that is reached
 * through `await import()` (and the modules only it imports) in an init
 * function named after its source path (`"src/block/open.ts"() {...}`) that
 * runs on first use, so a module of a bundle was evaluated when that function
 * ran at least once; a module with no such function is evaluated whenever the
 * bundle is. Without a bundle (tsc's output alone), a module was evaluated when
 * V8 reports its file, dist/X.js for src/X.ts.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { run } from './qemu.js';

export const ROOT = resolve(import.meta.dirname, '../..');
export const IMGMOUNT = resolve(ROOT, 'bin/imgmount');
const DIST = resolve(ROOT, 'dist');

/** The bundles npm run build writes, from the package root. */
export const BUNDLES = ['dist/cli/main.cjs', 'dist/fuse/daemon-entry.cjs'] as const;

interface ScriptCoverage {
  url: string;
  functions: { functionName: string; ranges: { count: number }[] }[];
}

/** Every module of a bundle (esbuild's `// path` line before each), and those evaluated only on first use. */
function bundleModules(path: string): { all: string[]; deferred: Set<string> } {
  const text = readFileSync(path, 'utf8');
  const all = [...text.matchAll(/^\/\/ ((?:src|node_modules)\/\S+)$/gm)].map((match) => match[1]!);
  const deferred = new Set([...text.matchAll(/^\s*"((?:src|node_modules)\/[^"]+)"\(/gm)].map((match) => match[1]!));
  return { all, deferred };
}

/** The source modules one process's coverage shows as evaluated, as paths from the package root. */
function evaluatedIn(scripts: readonly ScriptCoverage[]): { sources: string[]; files: string[] } {
  const sources = new Set<string>();
  const files: string[] = [];
  for (const script of scripts) {
    if (!script.url.startsWith('file:')) continue;
    const path = fileURLToPath(script.url);
    const file = relative(ROOT, path);
    files.push(file);
    if ((BUNDLES as readonly string[]).includes(file)) {
      const { all, deferred } = bundleModules(path);
      const ran = new Set(script.functions.filter((fn) => (fn.ranges[0]?.count ?? 0) > 0).map((fn) => fn.functionName));
      for (const module of all) if (!deferred.has(module) || ran.has(module)) sources.add(module);
    } else if (!relative(DIST, path).startsWith('..')) {
      sources.add(`src/${relative(DIST, path).replace(/\.js$/, '.ts')}`);
    } else if (file.startsWith('node_modules/')) {
      sources.add(file);
    }
  }
  return { sources: [...sources].sort(), files };
}

export interface Evaluation {
  code: number;
  stdout: string;
  stderr: string;
  /** The source modules the command process evaluated (src/..., node_modules/...), sorted. */
  sources: string[];
  /** The files V8 compiled in it (bin/imgmount, the bundle or dist/ modules...), from the package root. */
  files: string[];
}

/**
 * Runs bin/imgmount with V8 coverage written to a new directory in `scratch`
 * (the caller removes it: a daemon the command started writes its own file
 * there when it exits) and says what the command process evaluated.
 */
export async function modulesEvaluated(args: readonly string[], scratch: string, cwd?: string): Promise<Evaluation> {
  const dir = await mkdtemp(join(scratch, 'coverage-'));
  const result = await run('env', [`NODE_V8_COVERAGE=${dir}`, IMGMOUNT, ...args], cwd === undefined ? {} : { cwd });
  const command = pathToFileURL(IMGMOUNT).href;
  for (const name of readdirSync(dir).filter((entry) => entry.endsWith('.json'))) {
    const scripts = (JSON.parse(readFileSync(join(dir, name), 'utf8')) as { result: ScriptCoverage[] }).result;
    if (scripts.some((script) => script.url === command)) return { ...result, ...evaluatedIn(scripts) };
  }
  throw new Error(`no coverage of the command process in ${dir} (exit ${result.code}: ${result.stderr})`);
}
