/**
 * Creating VHDX images like `qemu-img create -f vhdx`, with its option names
 * (subformat, block_size, log_size, block_state_zero): for each case our file
 * and qemu's have the same length, region table (BAT and metadata offsets and
 * lengths), headers' log fields, metadata items (but the random page 83
 * GUID) and BAT bytes; qemu-img info says the same virtual size and cluster
 * size, qemu-img check is clean, and the image reads as zeros here and in
 * qemu, and takes writes (qemu-io's and ours). Bad options are refused by
 * name before a file exists. `imgmount create` through the CLI once.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, InvalidArgumentError, openImage } from '../src/index.js';
import { makeTempDir, qemuCheck, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, readAll, run, skipWithoutQemu } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const T = { timeout: 120_000 };

interface Layout {
  length: number;
  regions: Array<[number, number]>;
  log: [number, number];
  /** Metadata items by GUID text: [offset in the region, length, flags, value hex (page 83 blanked)]. */
  items: string[];
  bat: Buffer;
}

const PAGE_83 = 'ab12cabee6b22345';

/** What must be the same in two creations, read from the file's bytes (from the specification, not our reader). */
async function layout(path: string): Promise<Layout> {
  const file = await readFile(path);
  const regions: Array<[number, number]> = [];
  const rt = 192 * 1024;
  for (let i = 0; i < file.readUInt32LE(rt + 8); i++) regions.push([Number(file.readBigUInt64LE(rt + 32 + 32 * i)), file.readUInt32LE(rt + 40 + 32 * i)]);
  const h = 64 * 1024;
  const [bat, metadata] = regions as [[number, number], [number, number]];
  const items: string[] = [];
  for (let i = 0; i < file.readUInt16LE(metadata[0] + 10); i++) {
    const at = metadata[0] + 32 + 32 * i;
    const id = file.subarray(at, at + 16).toString('hex');
    const offset = file.readUInt32LE(at + 16);
    const length = file.readUInt32LE(at + 20);
    const value = id.startsWith(PAGE_83) ? '(random)' : file.subarray(metadata[0] + offset, metadata[0] + offset + length).toString('hex');
    items.push(`${id} ${offset} ${length} ${file.readUInt32LE(at + 24)} ${value}`);
  }
  return { length: file.length, regions, log: [file.readUInt32LE(h + 68), Number(file.readBigUInt64LE(h + 72))], items, bat: file.subarray(bat[0], bat[0] + bat[1]) };
}

describe.skipIf(skipWithoutQemu('vhdx create'))('creating VHDX like qemu-img create -f vhdx', () => {
  const cases: Array<[string, number, Record<string, string>]> = [
    ['dynamic 8M (default block size 8 MiB)', 8 * MiB, {}],
    ['dynamic 1000 bytes (rounded up to 1024)', 1000, {}],
    ['dynamic 2G (default block size 16 MiB)', 2 * 1024 * MiB, {}],
    ['dynamic 200G, block_size=1M (a 2 MiB BAT, sector bitmap entries)', 200 * 1024 * MiB, { block_size: '1M' }],
    ['dynamic 5G block_size=1M log_size=2M', 5 * 1024 * MiB, { block_size: '1M', log_size: '2M' }],
    ['dynamic block_state_zero=off (NOT_PRESENT blocks)', 20 * MiB, { block_state_zero: 'off' }],
    ['fixed 10M (qemu default: ZERO blocks)', 10 * MiB, { subformat: 'fixed' }],
    ['fixed 3M block_size=1M block_state_zero=off (FULLY_PRESENT blocks in order)', 3 * MiB, { subformat: 'fixed', block_size: '1M', block_state_zero: 'off' }],
    ['fixed block_state_zero=off log_size=3M, last block partial', 5 * MiB + 512, { subformat: 'fixed', block_size: '2M', block_state_zero: 'off', log_size: '3M' }],
  ];
  for (const [title, size, options] of cases) {
    it(title, T, async () => {
      const dir = await makeTempDir('imgmount-vhdxc-');
      const ours = join(dir, 'ours.vhdx');
      const theirs = join(dir, 'theirs.vhdx');
      await createImage(ours, 'vhdx', { size, options });
      const o = Object.entries(options).map(([k, v]) => `${k}=${v}`).join(',');
      await qemuImg(['create', '-q', '-f', 'vhdx', ...(o ? ['-o', o] : []), theirs, String(size)]);
      const [a, b] = [await layout(ours), await layout(theirs)];
      expect({ ...a, bat: undefined }).toEqual({ ...b, bat: undefined });
      expect(a.bat.equals(b.bat), 'the same BAT').toBe(true);
      const [infoOurs, infoTheirs] = [await qemuInfo(ours, 'vhdx'), await qemuInfo(theirs, 'vhdx')];
      expect([infoOurs['virtual-size'], infoOurs['cluster-size']]).toEqual([infoTheirs['virtual-size'], infoTheirs['cluster-size']]);
      const check = await qemuCheck(ours, 'vhdx');
      expect(check.code, check.stdout + check.stderr).toBe(0);
      const virtual = infoOurs['virtual-size'] as number;
      if (virtual <= 64 * MiB) {
        expect((await qemuConvertToRaw(ours, dir, 'vhdx')).equals(Buffer.alloc(virtual))).toBe(true);
        const image = await openImage(ours, { format: 'vhdx', readOnly: true });
        expect((await readAll(image)).equals(Buffer.alloc(virtual))).toBe(true);
        await image.close();
      }
      // qemu writes into our image, and we into it after qemu
      await qemuIo(ours, [`write -P 0x71 ${virtual - 700} 700`], 'vhdx');
      const image = await openImage(ours, { format: 'vhdx' });
      const ourLength = Math.min(3000, virtual - 700);
      await image.write(0, Buffer.alloc(ourLength, 0x72));
      await image.close();
      const out = await run('qemu-io', ['-f', 'vhdx', '-c', `read -P 0x71 ${virtual - 700} 700`, '-c', `read -P 0x72 0 ${ourLength}`, ours]);
      expect(out.stdout + out.stderr).not.toMatch(/Pattern verification failed|error/i);
      expect((await qemuCheck(ours, 'vhdx')).code).toBe(0);
    });
  }

  it('bad options are refused by name, and nothing is created', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxc-');
    const path = join(dir, 'x.vhdx');
    const refusals: Array<[Parameters<typeof createImage>[2], RegExp]> = [
      [{ size: MiB, options: { subformat: 'differencing' } }, /subformat 'differencing' is not dynamic or fixed/],
      [{ size: MiB, options: { block_size: '3M' } }, /block_size 3145728 is not a power of two from 1 MiB to 256 MiB/],
      [{ size: MiB, options: { block_size: '512K' } }, /block_size 524288 is not a power of two from 1 MiB to 256 MiB/],
      [{ size: MiB, options: { block_size: '512M' } }, /block_size 536870912 is not a power of two from 1 MiB to 256 MiB/],
      [{ size: MiB, options: { log_size: '1000000' } }, /log_size 1000000 is not a multiple of 1 MiB/],
      [{ size: MiB, options: { log_size: '0' } }, /log_size 0 is not a multiple of 1 MiB from 1 MiB/],
      [{ size: MiB, options: { block_state_zero: 'maybe' } }, /block_state_zero 'maybe' is not on or off/],
      [{ size: MiB, options: { cluster_size: '64K' } }, /unknown vhdx option cluster_size; vhdx accepts subformat, block_size, log_size, block_state_zero/],
      [{ size: 65 * 1024 * 1024 * MiB }, /larger than the 64 TiB/],
      [{ size: 0 }, /size 0 is not a whole number of bytes from 1 to 64 TiB/],
    ];
    for (const [options, message] of refusals) {
      const error = await createImage(path, 'vhdx', options).then(() => undefined, (reason: unknown) => reason);
      expect(error).toBeInstanceOf(InvalidArgumentError);
      expect((error as Error).message).toMatch(message);
      await expect(stat(path)).rejects.toThrow(/ENOENT/);
    }
  });

  it('imgmount create -f vhdx -o ... through the CLI; info --output=json has qemu-img\'s keys', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxc-');
    const path = join(dir, 'cli.vhdx');
    const made = await run('node', ['bin/imgmount', 'create', '-f', 'vhdx', '-o', 'subformat=dynamic,block_size=2M,log_size=2M,block_state_zero=off', path, '10M']);
    expect(made.code, made.stderr).toBe(0);
    const theirs = await qemuInfo(path, 'vhdx');
    expect([theirs['virtual-size'], theirs['cluster-size']]).toEqual([10 * MiB, 2 * MiB]);
    const info = await run('node', ['bin/imgmount', 'info', '--output=json', path]);
    expect(info.code, info.stderr).toBe(0);
    const ours = JSON.parse(info.stdout) as Record<string, unknown>;
    for (const key of ['virtual-size', 'filename', 'cluster-size', 'format', 'actual-size', 'dirty-flag']) expect(ours[key], key).toEqual(theirs[key]);
    const bad = await run('node', ['bin/imgmount', 'create', '-f', 'vhdx', '-o', 'block_size=5M', join(dir, 'bad.vhdx'), '10M']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/block_size 5242880 is not a power of two/);
  });
});
