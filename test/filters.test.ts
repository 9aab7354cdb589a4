/**
 * The filter mechanism through the library and the command line: blkdebug
 * fails the request after a named driver event (once, at the Kth time, or
 * every time; rules inline or from a QEMU-style config file), blkverify fails
 * a read whose bytes differ from a raw reference, filters reach the layer of
 * the backing chain they name, and every bad filter option is one clear
 * error before the image is touched. qemu-img is the oracle of the images'
 * state afterwards.
 */
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { constants as osConstants } from 'node:os';
import { openImage, parseFilterArgument, type FilterSpec } from '../src/index.js';
import { makeTempDir, patchBytes, qemuCheck, qemuImg, qemuIo, readBytes, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const IMGMOUNT = new URL('../bin/imgmount', import.meta.url).pathname;
const { EIO, ENOSPC } = osConstants.errno;

async function qedImage(dir: string, name = 'disk.qed'): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096', path, '16M']);
  return path;
}

/** Runs `attempt`, returning the errno it failed with, or 0. */
async function errnoOf(attempt: () => Promise<unknown>): Promise<number> {
  try {
    await attempt();
    return 0;
  } catch (error) {
    const errno = (error as { errno?: number }).errno;
    if (typeof errno !== 'number') throw error;
    return errno;
  }
}

describe.skipIf(skipWithoutQemu('filters'))('filters', () => {
  it('blkdebug once=on: the first write of L2 entries fails with the errno asked; the next write succeeds and the image stays clean', async () => {
    const dir = await makeTempDir();
    const path = await qedImage(dir);
    const image = await openImage(path, { filters: [{ name: 'blkdebug', event: 'l2_update', errno: 'ENOSPC', once: 'on' }] });
    const data = seededBytes(1, 8192);
    expect(await errnoOf(() => image.write(0, data))).toBe(ENOSPC);
    expect(await errnoOf(() => image.write(0, data))).toBe(0);
    const back = Buffer.alloc(data.length);
    await image.read(0, back);
    expect(back.equals(data)).toBe(true);
    await image.close();
    const check = await qemuCheck(path, 'qed');
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const bytes = await run('qemu-io', ['-f', 'qed', '-c', 'read -P 0 8192 4096', path]);
    expect(bytes.stdout).not.toMatch(/Pattern verification failed/);
  });

  it('blkdebug nth=K fails only the Kth occurrence; without once or nth every occurrence fails', async () => {
    const dir = await makeTempDir();
    const path = await qedImage(dir);
    await qemuIo(path, ['write -P 7 0 64k']);
    const nth = await openImage(path, { filters: [{ name: 'blkdebug', event: 'write_aio', errno: '5', nth: 2 }] });
    const results = [];
    for (let i = 0; i < 4; i++) results.push(await errnoOf(() => nth.write(i * 4096, Buffer.alloc(4096, i + 1))));
    await nth.close();
    expect(results).toEqual([0, EIO, 0, 0]);

    const every = await openImage(path, { filters: [{ name: 'blkdebug', event: 'read_aio', errno: 'EIO' }] });
    for (let i = 0; i < 3; i++) expect(await errnoOf(() => every.read(i * 4096, Buffer.alloc(4096)))).toBe(EIO);
    await every.close();
  });

  it('blkdebug config=FILE reads QEMU-style [inject-error] sections; a bad line is named', async () => {
    const dir = await makeTempDir();
    const path = await qedImage(dir);
    await qemuIo(path, ['write -P 7 0 64k']);
    const config = join(dir, 'rules.ini');
    await writeFile(config, '# two rules\n[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce = "on"\n\n[inject-error]\nevent = "write_aio"\nerrno = "28"\nonce = "on"\n');
    const image = await openImage(path, { filters: [{ name: 'blkdebug', config }] });
    expect(await errnoOf(() => image.read(0, Buffer.alloc(4096)))).toBe(EIO);
    expect(await errnoOf(() => image.read(0, Buffer.alloc(4096)))).toBe(0);
    expect(await errnoOf(() => image.write(0, Buffer.alloc(4096)))).toBe(ENOSPC);
    expect(await errnoOf(() => image.write(0, Buffer.alloc(4096)))).toBe(0);
    await image.close();

    await writeFile(config, '[inject-error]\nevent = "read_aio"\nstate = "2"\n');
    await expect(openImage(path, { filters: [{ name: 'blkdebug', config }] })).rejects.toThrow(/rules\.ini line 3: key 'state' is not supported here/);
    await writeFile(config, '[set-state]\nevent = "read_aio"\n');
    await expect(openImage(path, { filters: [{ name: 'blkdebug', config }] })).rejects.toThrow(/line 1: \[set-state\] sections are not supported here/);
  });

  it('refuses bad filters with one message, before the image is opened or changed', async () => {
    const dir = await makeTempDir();
    const path = await qedImage(dir);
    const before = await readBytes(path, 0, 1 << 16);
    const refused: [FilterSpec, RegExp][] = [
      [{ name: 'nosuch' }, /unknown filter 'nosuch' \(known: blkdebug, blkverify/],
      [{ name: 'blkdebug', event: 'l2_update' }, /errno= is needed/],
      [{ name: 'blkdebug', event: 'l3_update', errno: '5' }, /unknown event 'l3_update' \(one of l1_update, /],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5000' }, /errno=5000 is not an errno/],
      [{ name: 'blkdebug', event: 'l2_update', errno: 'EWHAT' }, /errno=EWHAT is not an errno/],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5', once: 'maybe' }, /once=maybe must be on or off/],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5', nth: '0' }, /nth=0 must be a whole number from 1/],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5', colour: 'red' }, /unknown key 'colour'/],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5', layer: '-1' }, /layer=-1 must be 0/],
      [{ name: 'blkdebug', event: 'l2_update', errno: '5', layer: '1' }, /layer=1, but the chain of .* has 1 image \(layers 0-0\)/],
      [{ name: 'blkverify' }, /reference= is needed/],
      [{ name: 'blkverify', reference: join(dir, 'missing.raw') }, /filter blkverify: reference: cannot open .*missing\.raw: no such file/],
      [{ name: 'delay' }, /filter delay: give at least one of read=MS, write=MS, flush=MS/],
      [{ name: 'delay', read: 'soon' }, /filter delay: read=soon must be a number of milliseconds from 0 to 600000/],
      [{ name: 'delay', write: '600001' }, /filter delay: write=600001 must be a number of milliseconds/],
    ];
    for (const [spec, message] of refused) {
      await expect(openImage(path, { filters: [spec] }), JSON.stringify(spec)).rejects.toThrow(message);
    }
    expect((await readBytes(path, 0, 1 << 16)).equals(before)).toBe(true);
  });

  it('delay holds reads, writes and flushes of the image file for the time asked; the bytes are unchanged', async () => {
    const dir = await makeTempDir();
    const path = await qedImage(dir);
    await qemuIo(path, ['write -P 0x5a 0 64k']);
    const image = await openImage(path, { filters: [{ name: 'delay', read: '150', flush: '300' }] });
    try {
      const buffer = Buffer.alloc(4096);
      let started = performance.now();
      await image.read(8192, buffer);
      expect(performance.now() - started).toBeGreaterThanOrEqual(145);
      expect(buffer.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
      await image.write(0, Buffer.alloc(512, 0x11));
      started = performance.now();
      await image.flush();
      expect(performance.now() - started).toBeGreaterThanOrEqual(295);
    } finally {
      await image.close();
    }
    expect((await qemuCheck(path)).code).toBe(0);
    const reopened = await openImage(path, { readOnly: true });
    try {
      const head = Buffer.alloc(1024);
      await reopened.read(0, head);
      expect(head.equals(Buffer.concat([Buffer.alloc(512, 0x11), Buffer.alloc(512, 0x5a)]))).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('blkverify passes reads that match the reference, fails one that differs with EIO naming the offset, and mirrors writes', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, '4M']);
    await qemuIo(path, ['write -P 0x5a 64k 128k'], 'qcow2');
    const reference = join(dir, 'disk.raw');
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', path, reference]);
    const notices: string[] = [];
    const image = await openImage(path, { readOnly: false, filters: [{ name: 'blkverify', reference }], notice: (line) => notices.push(line) });
    expect(await errnoOf(() => image.read(0, Buffer.alloc(1 << 20)))).toBe(0);
    const data = seededBytes(3, 5000);
    await image.write(300_000, data);
    expect(await errnoOf(() => image.read(0, Buffer.alloc(1 << 20)))).toBe(0);
    await image.zero(64 * 1024, 4096);
    expect(await errnoOf(() => image.read(0, Buffer.alloc(1 << 20)))).toBe(0);
    await image.close();
    expect((await readBytes(reference, 300_000, data.length)).equals(data)).toBe(true);
    expect((await readBytes(reference, 64 * 1024, 4096)).equals(Buffer.alloc(4096))).toBe(true);

    await patchBytes(reference, 100_000, Buffer.from([0x00]));
    const checked = await openImage(path, { readOnly: true, filters: [{ name: 'blkverify', reference }], notice: (line) => notices.push(line) });
    expect(await errnoOf(() => checked.read(98_304, Buffer.alloc(4096)))).toBe(EIO);
    expect(await errnoOf(() => checked.read(0, Buffer.alloc(4096)))).toBe(0);
    await checked.close();
    expect(notices).toContainEqual(expect.stringMatching(/disk\.qcow2 differs from .*disk\.raw at offset 100000 \(read of 4096 bytes at 98304\)/));

    const shorter = join(dir, 'short.raw');
    await copyFile(reference, shorter);
    await run('truncate', ['-s', '1M', shorter]);
    await expect(openImage(path, { readOnly: true, filters: [{ name: 'blkverify', reference: shorter }] })).rejects.toThrow(
      /reference .*short\.raw is 1048576 bytes, but .*disk\.qcow2 has a virtual size of 4194304/,
    );
  });

  it('layer=1 puts the filter on the backing file: reads of backing data fail, reads of the top image do not', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.qed');
    await qemuImg(['create', '-f', 'qed', base, '4M']);
    await qemuIo(base, ['write -P 1 0 1M']);
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-b', base, '-F', 'qed', top]);
    await qemuIo(top, ['write -P 2 0 64k'], 'qcow2');
    const image = await openImage(top, { readOnly: true, filters: [{ name: 'blkdebug', event: 'read_aio', errno: '5', layer: 1 }] });
    expect(await errnoOf(() => image.read(0, Buffer.alloc(4096)))).toBe(0);
    expect(await errnoOf(() => image.read(512 * 1024, Buffer.alloc(4096)))).toBe(EIO);
    await image.close();
  });

  it('the command line: --filter for info, check and map; file options resolve against the working directory; ",," is a comma', async () => {
    expect(parseFilterArgument('blkverify:reference=a,,b.raw', '/work/x')).toEqual({ name: 'blkverify', reference: '/work/x/a,b.raw' });
    expect(parseFilterArgument('blkdebug:event=l2_load,errno=5,layer=1', '/x')).toEqual({ name: 'blkdebug', event: 'l2_load', errno: '5', layer: '1' });
    expect(() => parseFilterArgument('blkdebug:event', '/x')).toThrow(/'event' is not key=value/);
    expect(() => parseFilterArgument('blkdebug:errno=5,errno=6', '/x')).toThrow(/errno is given twice/);

    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, '16M']);
    await qemuIo(path, ['write -P 3 0 1M'], 'qcow2');
    const info = await run(IMGMOUNT, ['info', '--filter', 'blkdebug:event=l2_load,errno=5', path]);
    expect(info.code, info.stderr).toBe(0);
    const map = await run(IMGMOUNT, ['map', '--filter', 'blkdebug:event=l2_load,errno=5', path]);
    expect(map.code).toBe(1);
    expect(map.stderr).toMatch(/^imgmount: read at \d+ from .*disk\.qcow2: EIO injected by blkdebug after l2_load\n$/);
    const check = await run(IMGMOUNT, ['check', '--filter', 'blkdebug:event=l2_load,errno=5,once=on', path]);
    expect(check.code, check.stderr).toBe(0);
    const blkverify = await run(IMGMOUNT, ['check', '--filter', 'blkverify:reference=disk.raw', path], { cwd: dir });
    expect(blkverify.code).toBe(1);
    expect(blkverify.stderr).toMatch(/filter blkverify watches reads of the disk, which check does not make/);
    const bad = await run(IMGMOUNT, ['info', '--filter', 'blkdebug:event=nope,errno=5', path]);
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
  });
});
