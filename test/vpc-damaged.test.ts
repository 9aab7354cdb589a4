/**
 * Damaged VHDs: one test per checked field of the footer, the dynamic header,
 * the BAT and the parent locators. Each image is made by qemu-img (or the
 * spec-based writer for differencing disks), then one field is changed (the
 * checksum fixed, so the field's own check is what fires). The open must fail
 * with one error naming the field and its value, of the right kind, and
 * leave the file untouched; where qemu 7.2 refuses the same image, that is
 * checked too (and where it does not, said so).
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, openImage } from '../src/index.js';
import { makeTempDir, qemuImg, qemuIo, run } from './helpers/qemu.js';
import { patchFooter, SECTOR, specChecksum, writeSparseVhd } from './helpers/vhd-layout.js';

const { EIO, ENOTSUP } = osConstants.errno;
const M = 1024 * 1024;
const TIMEOUT = { timeout: 30_000 };

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}
function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

/** Changes dynamic-header bytes at `at` (the header is at 512 in qemu's images) and fixes its checksum. */
async function patchDynamic(path: string, at: number, bytes: Buffer, fixChecksum = true): Promise<void> {
  const image = await readFile(path);
  bytes.copy(image, 512 + at);
  if (fixChecksum) image.writeUInt32BE(specChecksum(image.subarray(512, 1536), 36), 512 + 36);
  await writeFile(path, image);
}

async function patchRaw(path: string, at: number, bytes: Buffer): Promise<void> {
  const image = await readFile(path);
  bytes.copy(image, at < 0 ? image.length + at : at);
  await writeFile(path, image);
}

/** A qemu-made dynamic VHD (force_size: current_size counts) of 8 MiB with blocks 0 and 2 allocated. */
async function dynamicImage(name = 'disk.vhd'): Promise<string> {
  const path = join(await makeTempDir(), name);
  await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', path, String(8 * M)]);
  await qemuIo(path, ['write -P 0x33 0 4096', `write -P 0x44 ${4 * M + 7} 1000`], 'vpc');
  return path;
}

async function fixedImage(): Promise<string> {
  const path = join(await makeTempDir(), 'fixed.vhd');
  await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed,force_size=on', path, String(4 * M)]);
  return path;
}

/** Opening (read-write, then read-only) fails with `message` and `errno`; the file is unchanged. */
async function expectRefused(path: string, message: RegExp, errno: number): Promise<void> {
  const before = await readFile(path);
  for (const readOnly of [false, true]) {
    const error = await openImage(path, { readOnly, format: 'vpc' }).then(
      async (image) => {
        await image.close();
        return undefined;
      },
      (reason: unknown) => reason,
    );
    expect(error, `open ${readOnly ? 'read-only' : 'read-write'} must fail`).toBeInstanceOf(BlockError);
    expect((error as BlockError).message).toMatch(message);
    expect((error as BlockError).message).toContain(path);
    expect((error as BlockError).errno).toBe(errno);
  }
  expect((await readFile(path)).equals(before), 'the file is unchanged').toBe(true);
}

async function qemuRefuses(path: string): Promise<string> {
  const result = await run('qemu-img', ['info', '-f', 'vpc', path]);
  expect(result.code, result.stdout).not.toBe(0);
  return result.stderr;
}

describe('damaged VHD footers', () => {
  it('no cookie at offset 0 nor at the end', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchRaw(path, 0, Buffer.from('xonectix'));
    await patchRaw(path, -512, Buffer.from('xonectix'));
    await expectRefused(path, /no VHD footer \(cookie "conectix"\) at offset 0 or at the end of the file/, EIO);
    await qemuRefuses(path);
  });

  it('checksum (qemu refuses it too)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchRaw(path, 64, u32(0x12345678));
    await expectRefused(path, /VHD footer checksum 0x12345678 at offset 0 is wrong/, EIO);
    expect(await qemuRefuses(path)).toMatch(/checksum/);
  });

  it('file_format_version', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 12, u32(0x00020000));
    await expectRefused(path, /file_format_version 0x00020000 is not 1\.x/, ENOTSUP);
  });

  it('disk_type', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 60, u32(5));
    await expectRefused(path, /disk_type 5 is not 2 \(fixed\), 3 \(dynamic\) or 4 \(differencing\)/, ENOTSUP);
  });

  it('data_offset: none on a dynamic disk', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 16, u64(0xffffffffffffffffn));
    await expectRefused(path, /data_offset is 0xffffffffffffffff \(none\) on a dynamic disk/, EIO);
  });

  it('data_offset: above 2^53 (read as a bigint)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 16, u64(1n << 60n));
    await expectRefused(path, /footer data_offset 1152921504606846976 is above the largest supported value 2\^53-1/, EIO);
  });

  it('data_offset: past the end of the file', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 16, u64(1n << 40n));
    await expectRefused(path, /data_offset 1099511627776 does not put the 1024-byte dynamic header on a sector inside the \d+-byte file/, EIO);
  });

  it('current_size: above 2^53', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 48, u64(1n << 62n));
    await expectRefused(path, /footer current_size 4611686018427387904 is above the largest supported value/, EIO);
  });

  it('current_size: above 2040 GiB (qemu refuses it too, EFBIG)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchFooter(path, 48, u64(3n << 40n));
    await expectRefused(path, /current_size 3298534883328 gives 3298534883328 bytes, above the 2040 GiB/, ENOTSUP);
    await qemuRefuses(path);
  });

  it('geometry of a fixed disk larger than its data (a truncated file)', TIMEOUT, async () => {
    const path = await fixedImage();
    await patchFooter(path, 28, Buffer.from('vpc ')); // size by the geometry
    const chs = Buffer.alloc(4);
    chs.writeUInt16BE(1000, 0);
    chs.writeUInt8(16, 2);
    chs.writeUInt8(63, 3);
    await patchFooter(path, 56, chs);
    await expectRefused(path, /fixed VHD of 516096000 bytes \(chs\) needs 516096512 bytes with its footer; the file has \d+ \(truncated image\?\)/, EIO);
  });
});

describe('damaged VHD dynamic headers', () => {
  it('cookie', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 0, Buffer.from('cxsparsX'));
    await expectRefused(path, /dynamic header cookie 6378737061727358 at 512 is not "cxsparse"/, EIO);
    await qemuRefuses(path);
  });

  it('checksum (qemu 7.2 does not check it and opens the image)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 36, u32(0xdeadbeef), false);
    await expectRefused(path, /dynamic header checksum 0xdeadbeef is wrong/, EIO);
    expect((await run('qemu-img', ['info', '-f', 'vpc', path])).code).toBe(0);
  });

  it('header_version', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 24, u32(0x00030000));
    await expectRefused(path, /header_version 0x30000 is not 1\.x/, ENOTSUP);
  });

  it('block_size: not a power of two, and below a sector (qemu refuses both)', TIMEOUT, async () => {
    for (const size of [3 * M, 256, 0]) {
      const path = await dynamicImage();
      await patchDynamic(path, 32, u32(size));
      await expectRefused(path, new RegExp(`block_size ${size} is not a power of two in \\[512, 2147483648\\]`), EIO);
      expect(await qemuRefuses(path)).toMatch(/block size/i);
    }
  });

  it('max_table_entries: too few for the disk (qemu refuses it too)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 28, u32(3));
    await expectRefused(path, /max_table_entries 3 is too small: the 8388608-byte disk needs 4 blocks of 2097152 bytes/, EIO);
    await qemuRefuses(path);
  });

  it('max_table_entries: 2^32-1 is refused before any allocation (CVE-2014-0144)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 28, u32(0xffffffff));
    await expectRefused(path, /max_table_entries 4294967295 is above the 67108864 this program reads/, ENOTSUP);
  });

  it('max_table_entries: a BAT running past the end of the file', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchDynamic(path, 28, u32(2 * 1024 * 1024));
    await expectRefused(path, /table_offset 1536 with 2097152 entries does not put the 8388608-byte BAT on a sector inside the \d+-byte file/, EIO);
  });

  it('table_offset: past the end, not on a sector, above 2^53, on the dynamic header', TIMEOUT, async () => {
    const cases: Array<[bigint, RegExp]> = [
      [1n << 40n, /table_offset 1099511627776 with 4 entries does not put the 16-byte BAT on a sector inside/],
      [1537n, /table_offset 1537 with 4 entries does not put the 16-byte BAT on a sector/],
      [1n << 55n, /table_offset 36028797018963968 is above the largest supported value 2\^53-1/],
      [1024n, /table_offset 1024: the BAT overlaps the dynamic header at 512/],
    ];
    for (const [offset, message] of cases) {
      const path = await dynamicImage();
      await patchDynamic(path, 16, u64(offset));
      await expectRefused(path, message, EIO);
    }
  });
});

describe('damaged VHD BATs', () => {
  it('an entry past the end of the file, and a truncated file (qemu refuses both)', TIMEOUT, async () => {
    const path = await dynamicImage();
    await patchRaw(path, 1536 + 4, u32(0x100000)); // block 1 at 512 MiB
    await expectRefused(path, /BAT entry 1 puts block 1 \(bitmap and data, 2097664 bytes\) at 536870912, past the end of the \d+-byte file \(truncated image\?\)/, EIO);
    await qemuRefuses(path);
    const cut = await dynamicImage('cut.vhd');
    await truncate(cut, 2 * M);
    await expectRefused(cut, /BAT entry \d puts block \d .* past the end of the 2097152-byte file \(truncated image\?\)/, EIO);
    await qemuRefuses(cut);
  });

  it('an entry pointing at the BAT, the dynamic header or the footer copy', TIMEOUT, async () => {
    for (const [sector, what] of [[3, 'the BAT at 1536'], [1, 'the dynamic header at 512'], [0, 'the footer copy at offset 0']] as const) {
      const path = await dynamicImage();
      await patchRaw(path, 1536 + 4 * 3, u32(sector));
      await expectRefused(path, new RegExp(`BAT entry 3 puts block 3 at ${sector * SECTOR}, on ${what}`), EIO);
    }
  });
});

describe('damaged differencing VHDs', () => {
  async function child(locators: Array<{ code: 'W2ku' | 'W2ru' | 'MacX'; text: string }>, name = 'parent.vhd'): Promise<string> {
    const path = join(await makeTempDir(), 'child.vhd');
    const size = 16 * 63 * SECTOR * 4;
    await writeSparseVhd(path, {
      size,
      blockSize: 2 * M,
      chs: [4, 16, 63],
      creatorApp: 'vpc ',
      sectors: new Map([[1, Buffer.alloc(SECTOR, 9)]]),
      parent: { uuid: Buffer.alloc(16, 2), timestamp: 5, name, locators },
    });
    return path;
  }

  it('a parent locator whose data lies outside the file', TIMEOUT, async () => {
    const path = await child([{ code: 'W2ru', text: '.\\parent.vhd' }]);
    await patchDynamic(path, 576 + 16, u64(1n << 40n)); // platform_data_offset of locator 0
    await expectRefused(path, /parent locator 0 \(W2ru\): 24 bytes at 1099511627776 are not inside the \d+-byte file/, EIO);
  });

  it('a BAT entry putting a block on a parent locator\'s data (a write there would overwrite the parent\'s name)', TIMEOUT, async () => {
    const path = await child([{ code: 'W2ru', text: '.\\parent.vhd' }]);
    // The writer puts locator 0's data at 1536 and the BAT after it, at 2048.
    await patchRaw(path, 2048, u32(1536 / SECTOR));
    await expectRefused(path, /BAT entry 0 puts block 0 at 1536, on parent locator 0's data at 1536/, EIO);
  });

  it('no parent locator and an empty parent_unicode_name', TIMEOUT, async () => {
    const path = await child([], '');
    await expectRefused(path, /differencing VHD names no parent: no W2ru, MacX or W2ku parent locator and an empty parent_unicode_name/, EIO);
  });
});
