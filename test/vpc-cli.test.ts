/**
 * The command line on VHDs (uses dist/, built by npm test / scripts/test.sh):
 * `info --output=json` has qemu-img's keys and values (plus format-specific,
 * which qemu-img does not show for vpc), `map` agrees with qemu-img map,
 * `check` answers like qemu-img (vpc cannot be checked: exit 63), and
 * `create -f vpc -o subformat=fixed,force_size=on` makes an image qemu-img reads.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { IMGMOUNT } from './helpers/bundle.js';
import { makeTempDir, normalizeMap, qemuImg, qemuInfo, qemuIo, qemuMap, run } from './helpers/qemu.js';

const TIMEOUT = { timeout: 30_000 };

describe('imgmount info / map / check / create on VHDs', () => {
  for (const subformat of ['dynamic', 'fixed']) {
    it(`${subformat}: info --output=json and map --output=json agree with qemu-img -f vpc; check exits 63 like qemu-img`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, `${subformat}.vhd`);
      await qemuImg(['create', '-q', '-f', 'vpc', '-o', `subformat=${subformat}`, path, '7M']);
      await qemuIo(path, ['write -P 0x41 1000 3000000'], 'vpc');
      const ours = JSON.parse((await run(IMGMOUNT, ['info', '--output=json', path])).stdout) as Record<string, unknown>;
      const theirs = await qemuInfo(path, 'vpc');
      const { 'format-specific': specific, ...rest } = ours;
      expect(rest).toEqual(theirs);
      const uuid = (await readFile(path)).subarray(-512).subarray(68, 84).toString('hex');
      expect(specific).toEqual({
        type: 'vpc',
        data: { subformat, 'creator-application': 'qemu', 'size-from': 'chs', uuid: uuid.replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5') },
      });
      if (subformat === 'dynamic') {
        const map = JSON.parse((await run(IMGMOUNT, ['map', '--output=json', path])).stdout) as Parameters<typeof normalizeMap>[0];
        expect(normalizeMap(map, true)).toEqual(normalizeMap(await qemuMap(path, 'vpc'), true));
      }
      const check = await run(IMGMOUNT, ['check', path]);
      const qemuCheck = await run('qemu-img', ['check', '-f', 'vpc', path]);
      expect([check.code, qemuCheck.code]).toEqual([63, 63]);
      expect(check.stderr).toContain('This image format does not support checks');
    });
  }

  it('create -f vpc -o subformat=fixed,force_size=on: qemu-img reads the size asked for', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'new.vhd');
    const created = await run(IMGMOUNT, ['create', '-f', 'vpc', '-o', 'subformat=fixed,force_size=on', path, '5000K']);
    expect(created.code, created.stderr).toBe(0);
    expect(await qemuInfo(path, 'vpc')).toMatchObject({ format: 'vpc', 'virtual-size': 5000 * 1024 });
    const bad = await run(IMGMOUNT, ['create', '-f', 'vpc', '-o', 'subformat=sparse', join(dir, 'bad.vhd'), '1M']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain("subformat 'sparse' is not dynamic or fixed");
  });
});
