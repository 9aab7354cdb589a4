/**
 * The bundled command line (scripts/build-bundle.mjs, the last step of
 * `npm run build`): bin/imgmount runs dist/cli/main.cjs, compiled from its V8
 * code cache, and no module of tsc's output; the bundle finds package.json and
 * the native addon from its own place; what only some commands need is
 * evaluated only by them (--version and --help evaluate neither the block layer
 * nor a format); the daemon it spawns runs the bundled daemon; a bundle older
 * than tsc's output is not run. No qemu tool is needed: the image is made by
 * `imgmount create`.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { cp, mkdir, mkdtemp, rm, symlink, utimes } from 'node:fs/promises';
import Module from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Script } from 'node:vm';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BUNDLES, IMGMOUNT, modulesEvaluated, ROOT } from './helpers/bundle.js';
import { run } from './helpers/qemu.js';

const version = (JSON.parse(readFileSync(resolve(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const BLOCK_LAYER = /^src\/(block\/(?!errors|size)|formats|fuse|native|cache)|^node_modules\//;

let dir: string;
let image: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'imgmount-bundle-'));
  image = join(dir, 'disk.qcow2');
  const created = await run(IMGMOUNT, ['create', '-f', 'qcow2', image, '64M']);
  expect(created.code, created.stderr).toBe(0);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('the bundled command line', () => {
  test('npm run build made both bundles, each with a code cache V8 takes', () => {
    for (const bundle of BUNDLES) {
      const path = resolve(ROOT, bundle);
      const source = readFileSync(path, 'utf8');
      const id = /^\/\/ imgmount bundle ([0-9a-f]+)\n/.exec(source)?.[1];
      expect(id, `${bundle} is missing or not a bundle: run npm run build`).toBeDefined();
      const cache = readFileSync(`${path}.${id}.cache`);
      // Compiled as bin/run-bundle.cjs compiles it.
      expect(new Script(Module.wrap(source), { filename: path, cachedData: cache }).cachedDataRejected).toBe(false);
      // One cache per bundle: the build removes the old ones.
      expect(readdirSync(resolve(path, '..')).filter((name) => name.startsWith(`${bundle.split('/').pop()}.`) && name.endsWith('.cache'))).toHaveLength(1);
    }
    expect(statSync(resolve(ROOT, 'dist/cli/main.cjs')).mtimeMs).toBeGreaterThanOrEqual(statSync(resolve(ROOT, 'dist/cli/main.js')).mtimeMs);
    expect(readFileSync(resolve(ROOT, 'dist/fuse/daemon-entry.js'), 'utf8')).toContain("new URL('./daemon-entry.cjs', import.meta.url)");
  });

  test('--version: the version from package.json, from the bundle alone', async () => {
    const result = await modulesEvaluated(['--version'], dir);
    expect(result).toMatchObject({ code: 0, stdout: `imgmount ${version}\n` });
    expect(result.files).toEqual(['bin/imgmount', 'bin/run-bundle.cjs', 'dist/cli/main.cjs']);
  });

  test('--help and --version evaluate neither the block layer nor a format nor FUSE', async () => {
    for (const args of [['--help'], ['--version'], ['info', '--help']]) {
      const result = await modulesEvaluated(args, dir);
      expect(result.code).toBe(0);
      expect(result.sources).toContain('src/cli/main.ts');
      expect(result.sources.filter((source) => BLOCK_LAYER.test(source))).toEqual([]);
    }
  });

  test('info and check run from the bundle, with the native addon found from its place', async () => {
    const info = await modulesEvaluated(['info', '--output=json', image], dir);
    expect(info.code, info.stderr).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 64 * 1024 * 1024 });
    // Only the bundle was compiled (and the addon loaded): no module of tsc's output, nothing from node_modules.
    expect(info.files).toEqual(['bin/imgmount', 'bin/run-bundle.cjs', 'dist/cli/main.cjs']);
    // The qcow2 driver and the addon (qemu's byte locks) were used; FUSE was not.
    expect(info.sources).toEqual(expect.arrayContaining(['src/cli/info.ts', 'src/formats/qcow2/index.ts', 'src/native/index.ts']));
    expect(info.sources.filter((source) => /^src\/fuse\/|cli-progress|zstddec/.test(source))).toEqual([]);

    const check = await run(IMGMOUNT, ['check', image]);
    expect(check).toMatchObject({ code: 0, stdout: expect.stringContaining('No errors were found on the image.') });
  });

  test('tsc run after the bundler: bin/imgmount runs tsc\'s dist/cli/main.js, not the older bundle', async () => {
    // A copy of the program whose tsc output is newer than its bundle.
    const copy = join(dir, 'copy');
    await mkdir(copy);
    await cp(resolve(ROOT, 'bin'), join(copy, 'bin'), { recursive: true });
    await cp(resolve(ROOT, 'dist'), join(copy, 'dist'), { recursive: true });
    for (const part of ['build', 'node_modules', 'package.json']) await symlink(resolve(ROOT, part), join(copy, part));
    const later = new Date(statSync(join(copy, 'dist/cli/main.cjs')).mtimeMs + 1000);
    await utimes(join(copy, 'dist/cli/main.js'), later, later);
    const coverage = await mkdtemp(join(dir, 'coverage-'));
    const result = await run('env', [`NODE_V8_COVERAGE=${coverage}`, join(copy, 'bin/imgmount'), '--version']);
    expect(result).toMatchObject({ code: 0, stdout: `imgmount ${version}\n` });
    const [file] = readdirSync(coverage);
    const urls = (JSON.parse(readFileSync(join(coverage, file!), 'utf8')) as { result: { url: string }[] }).result.map((script) => script.url);
    expect(urls).toContain(`file://${copy}/dist/cli/main.js`);
    expect(urls).not.toContain(`file://${copy}/dist/cli/main.cjs`);
  });

  test('an error is one line, as from the unbundled program', async () => {
    const result = await run(IMGMOUNT, ['info', join(dir, 'missing.qcow2')]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^imgmount: [^\n]*missing\.qcow2[^\n]*\n$/);
  });
});
