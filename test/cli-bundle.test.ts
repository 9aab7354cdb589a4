/**
 * The bundled command line (scripts/build-bundle.mjs, part of `npm run build`):
 * bin/imgmount runs dist/cli/main.js, a bundle that loads its chunks from
 * dist/chunks/ and no module of tsc's output; it finds package.json and the
 * native addon from its own place; the commands only some runs need stay in
 * chunks of their own (--version and --help load neither the block layer nor a
 * format), and the daemon it spawns is the bundled dist/fuse/daemon-entry.js.
 * No qemu tool is needed: the image is made by `imgmount create`.
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { bundleOutputs, IMGMOUNT, isBundle, modulesLoaded, ROOT, sourcesOf } from './helpers/bundle.js';
import { run } from './helpers/qemu.js';

const version = (JSON.parse(readFileSync(resolve(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

/** The files (paths from the package root) among module URLs, in load order. */
function filesLoaded(modules: readonly string[]): string[] {
  return modules.filter((url) => url.startsWith('file:')).map((url) => url.replace(`file://${ROOT}/`, ''));
}

/** The files loaded that are neither dist/cli/main.js nor a chunk in dist/chunks/. */
function notFromBundle(modules: readonly string[]): string[] {
  return filesLoaded(modules).filter((file) => !/^dist\/(cli\/main|chunks\/[\w-]+)\.js$/.test(file));
}

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
  test('npm run build made the bundles bin/imgmount and the mount use', () => {
    const outputs = bundleOutputs();
    expect(Object.keys(outputs).length, 'no dist/chunks/sources.json: run npm run build').toBeGreaterThan(0);
    expect(isBundle('cli/main.js', outputs), 'dist/cli/main.js is not the bundle: run npm run build').toBe(true);
    expect(isBundle('fuse/daemon-entry.js', outputs), 'dist/fuse/daemon-entry.js is not the bundle: run npm run build').toBe(true);
  });

  test('--version: the version from package.json, from the bundle alone', async () => {
    const result = await modulesLoaded(['--version']);
    expect(result).toMatchObject({ code: 0, stdout: `imgmount ${version}\n` });
    expect(filesLoaded(result.modules)[0]).toBe('dist/cli/main.js');
    expect(notFromBundle(result.modules)).toEqual([]);
  });

  test('--help and --version load neither the block layer nor a format nor FUSE', async () => {
    for (const args of [['--help'], ['--version'], ['info', '--help']]) {
      const result = await modulesLoaded(args);
      expect(result.code).toBe(0);
      expect(sourcesOf(result.modules).filter((source) => /^src\/(block\/(?!errors|size)|formats|fuse|native|cache)|node_modules\//.test(source))).toEqual([]);
    }
  });

  test('info and check run from the bundle, with the native addon found from its place', async () => {
    const info = await modulesLoaded(['info', '--output=json', image]);
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 64 * 1024 * 1024 });
    // Only the bundle's files: no module of tsc's output, nothing from node_modules.
    expect(notFromBundle(info.modules)).toEqual([]);
    // The qcow2 driver and the addon (qemu's byte locks) were used.
    expect(sourcesOf(info.modules)).toEqual(expect.arrayContaining(['src/formats/qcow2/index.ts', 'src/native/index.ts']));
    expect(sourcesOf(info.modules).filter((source) => /^src\/fuse\//.test(source))).toEqual([]);

    const check = await run(IMGMOUNT, ['check', image]);
    expect(check).toMatchObject({ code: 0, stdout: expect.stringContaining('No errors were found on the image.') });
  });

  test('an error is one line, as from the unbundled program', async () => {
    const result = await run(IMGMOUNT, ['info', join(dir, 'missing.qcow2')]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^imgmount: [^\n]*missing\.qcow2[^\n]*\n$/);
  });
});
