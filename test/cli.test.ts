/**
 * The create / info / check commands as a user runs them: bin/imgmount
 * against real files, qemu-img as the oracle, exit codes as qemu-img's.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const bin = resolve(import.meta.dirname, '../bin/imgmount');
const haveQemu = await run('qemu-img', ['--version']).then(() => true, () => false);
if (!haveQemu) console.warn('SKIP cli tests: qemu-img is not installed (apt-get install qemu-utils)');

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

async function imgmount(...args: string[]): Promise<Result> {
  try {
    const { stdout, stderr } = await run(bin, args, { cwd: dir });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failure = error as { code: number; stdout: string; stderr: string };
    return { code: failure.code, stdout: failure.stdout, stderr: failure.stderr };
  }
}

async function qemuInfo(file: string): Promise<Record<string, unknown>> {
  const { stdout } = await run('qemu-img', ['info', '--output=json', file], { cwd: dir });
  return JSON.parse(stdout) as Record<string, unknown>;
}

/** Appends one zeroed cluster that no table references (a leak). */
async function appendCluster(file: string, clusterSize: number): Promise<void> {
  const handle = await open(join(dir, file), 'a');
  await handle.write(Buffer.alloc(clusterSize));
  await handle.close();
}

function expectOneLineError(result: Result, pattern: RegExp): void {
  expect(result.code).not.toBe(0);
  expect(result.stderr.trim().split('\n')).toHaveLength(1);
  expect(result.stderr).toMatch(pattern);
  expect(result.stderr).not.toMatch(/\n\s+at /);
}

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'imgmount-cli-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!haveQemu)('imgmount create', () => {
  it('makes QED images qemu-img reads with the asked geometry', async () => {
    const result = await imgmount('create', '-f', 'qed', '-o', 'cluster_size=16K,table_size=8', 'a.qed', '1G');
    expect(result.code).toBe(0);
    const info = await qemuInfo('a.qed');
    expect(info).toMatchObject({ format: 'qed', 'virtual-size': 1024 ** 3, 'cluster-size': 16384 });
    await run('qemu-img', ['check', join(dir, 'a.qed')]);
  });

  it('refuses to overwrite an existing file unless --force', async () => {
    await writeFile(join(dir, 'keep.qed'), 'precious');
    expectOneLineError(await imgmount('create', '-f', 'qed', 'keep.qed', '1M'), /already exists.*--force/);
    expect(await readFile(join(dir, 'keep.qed'), 'utf8')).toBe('precious');
    expect((await imgmount('create', '-f', 'qed', '--force', 'keep.qed', '1M')).code).toBe(0);
    expect(await qemuInfo('keep.qed')).toMatchObject({ format: 'qed', 'virtual-size': 1024 * 1024 });
  });

  it('records a backing file and takes the size from it when none is given', async () => {
    await writeFile(join(dir, 'base.raw'), Buffer.alloc(3 * 1024 * 1024, 1));
    expect((await imgmount('create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', 'top.qed')).code).toBe(0);
    const info = await qemuInfo('top.qed');
    expect(info).toMatchObject({ 'virtual-size': 3 * 1024 * 1024, 'backing-filename': 'base.raw', 'backing-filename-format': 'raw' });
  });

  it('makes raw images of the asked size', async () => {
    expect((await imgmount('create', '-f', 'raw', 'r.img', '5M')).code).toBe(0);
    expect((await stat(join(dir, 'r.img'))).size).toBe(5 * 1024 * 1024);
  });

  it('rejects bad options with one line naming them', async () => {
    expectOneLineError(await imgmount('create', '-f', 'qed', '-o', 'table_size=3', 'bad1.qed', '1M'), /table_size 3/);
    expectOneLineError(await imgmount('create', '-f', 'qed', '-o', 'cluster_size=1000', 'bad2.qed', '1M'), /cluster_size 1000/);
    expectOneLineError(await imgmount('create', '-f', 'qed', '-o', 'colour=blue', 'bad3.qed', '1M'), /unknown qed option colour/);
    expectOneLineError(await imgmount('create', '-f', 'qed', 'bad4.qed', '12Q'), /invalid size '12Q'/);
    expectOneLineError(await imgmount('create', '-f', 'nosuch', 'bad5.img', '1M'), /unknown format 'nosuch'/);
    expectOneLineError(await imgmount('create', '-f', 'dmg', 'bad6.dmg', '1M'), /creating dmg images is not supported/);
    expectOneLineError(await imgmount('create', '-f', 'qed', '-b', 'missing.raw', 'bad6.qed', '1M'), /missing\.raw/);
    for (const name of ['bad1.qed', 'bad2.qed', 'bad3.qed', 'bad4.qed', 'bad6.qed']) {
      await expect(stat(join(dir, name))).rejects.toThrow();
    }
  });
});

describe.skipIf(!haveQemu)('imgmount info', () => {
  it('reports what qemu-img info reports, with its JSON keys', async () => {
    await run('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'ib.raw'), '2M']);
    await run('qemu-img', ['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'ib.raw', '-F', 'raw', join(dir, 'i.qed'), '8M']);
    await run('qemu-io', ['-f', 'qed', '-c', 'write -P 7 100k 64k', join(dir, 'i.qed')]);
    const ours = JSON.parse((await imgmount('info', '--output=json', 'i.qed')).stdout) as Record<string, unknown>;
    const theirs = await qemuInfo('i.qed');
    for (const key of ['format', 'virtual-size', 'actual-size', 'cluster-size', 'backing-filename', 'backing-filename-format', 'dirty-flag']) {
      expect(ours[key], key).toEqual(theirs[key]);
    }
    const human = (await imgmount('info', 'i.qed')).stdout;
    expect(human).toMatch(/file format: qed/);
    expect(human).toMatch(/virtual size: 8 MiB \(8388608 bytes\)/);
    expect(human).toMatch(/backing file: ib\.raw/);
  });

  it('shows the need-check state of an image left dirty', async () => {
    await run('qemu-img', ['create', '-q', '-f', 'qed', join(dir, 'd.qed'), '1M']);
    const handle = await open(join(dir, 'd.qed'), 'r+');
    await handle.write(Buffer.from([0x02]), 0, 1, 16);
    await handle.close();
    const ours = JSON.parse((await imgmount('info', '--output=json', 'd.qed')).stdout) as Record<string, unknown>;
    expect(ours['dirty-flag']).toBe(true);
  });

  it('refuses FIFOs and directories at once instead of hanging, also as a backing file', async () => {
    await run('mkfifo', [join(dir, 'pipe.qed')]);
    expectOneLineError(await imgmount('info', 'pipe.qed'), /pipe\.qed is a FIFO, not a regular image file/);
    expectOneLineError(await imgmount('info', dir), /is a directory, not a regular image file/);
    await run('mkfifo', [join(dir, 'pipe.raw')]);
    await run('qemu-img', ['create', '-q', '-f', 'qed', '-u', '-b', 'pipe.raw', '-F', 'raw', join(dir, 'onpipe.qed'), '1M']);
    expectOneLineError(await imgmount('info', '--backing-chain', 'onpipe.qed'), /pipe\.raw is a FIFO/);
  });

  it('fails with one line for a missing file and for a non-image named .qed', async () => {
    const missing = await imgmount('info', 'nothere.qed');
    expectOneLineError(missing, /^imgmount: cannot open nothere\.qed: no such file or directory$/m);
    expect(missing.stderr).not.toMatch(/ENOENT|realpath|stat '/); // no Node.js decoration
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.raw', '-F', 'raw', join(dir, 'orphan.qcow2'), '1M']);
    for (const command of [['info', '--backing-chain'], ['map']]) {
      expectOneLineError(await imgmount(...command, 'orphan.qcow2'), /^imgmount: backing file gone\.raw of orphan\.qcow2: no such file \(looked for .*gone\.raw\)$/m);
    }
    await writeFile(join(dir, 'fake.qed'), Buffer.alloc(4096, 0x41));
    expectOneLineError(await imgmount('info', 'fake.qed'), /fake\.qed.*not a valid qed image/);
  });
});

describe.skipIf(!haveQemu)('imgmount check', () => {
  it('exits 0 on a clean image, 3 on leaks, and -r repairs them', async () => {
    await run('qemu-img', ['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', join(dir, 'c.qed'), '4M']);
    await run('qemu-io', ['-f', 'qed', '-c', 'write -P 9 0 12k', join(dir, 'c.qed')]);
    expect((await imgmount('check', 'c.qed')).code).toBe(0);
    await appendCluster('c.qed', 4096);
    const leaky = await imgmount('check', '--output=json', 'c.qed');
    expect(leaky.code).toBe(3);
    // As qemu-img: a count of zero is left out.
    expect(JSON.parse(leaky.stdout)).toMatchObject({ leaks: 1 });
    expect(JSON.parse(leaky.stdout)).not.toHaveProperty('corruptions');
    const repaired = await imgmount('check', '-r', 'c.qed');
    expect(repaired.code).toBe(0);
    await run('qemu-img', ['check', join(dir, 'c.qed')]);
    await run('qemu-io', ['-f', 'qed', '-c', 'read -P 9 0 12k', join(dir, 'c.qed')]);
  });

  it('exits 2 on corruption and -r clears the bad entry', async () => {
    await run('qemu-img', ['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096,table_size=2', join(dir, 'x.qed'), '4M']);
    await run('qemu-io', ['-f', 'qed', '-c', 'write -P 5 0 4k', '-c', 'write -P 6 1M 4k', join(dir, 'x.qed')]);
    // The L2 table follows the data cluster written first; point its second used entry far outside the file.
    const bytes = await readFile(join(dir, 'x.qed'));
    const l1 = bytes.readBigUInt64LE(40);
    const l2 = Number(bytes.readBigUInt64LE(Number(l1)));
    const entry = l2 + ((1024 * 1024) / 4096) * 8;
    const handle = await open(join(dir, 'x.qed'), 'r+');
    const far = Buffer.alloc(8);
    far.writeBigUInt64LE(1n << 40n);
    await handle.write(far, 0, 8, entry);
    await handle.close();
    expect((await imgmount('check', 'x.qed')).code).toBe(2);
    const repaired = await imgmount('check', '-r', '--output=json', 'x.qed');
    expect(JSON.parse(repaired.stdout)).toMatchObject({ 'corruptions-fixed': 1 });
    expect(JSON.parse(repaired.stdout)).not.toHaveProperty('corruptions');
    expect(repaired.code).toBe(0);
    await run('qemu-img', ['check', join(dir, 'x.qed')]);
  });

  it('exits 63 with one line naming the file for a format without a check, as qemu-img does', async () => {
    await writeFile(join(dir, 'plain.raw'), Buffer.alloc(1024 * 1024));
    const theirs = await run('qemu-img', ['check', join(dir, 'plain.raw')]).then(
      () => 0,
      (error: { code: number; stderr: string }) => error,
    );
    expect(theirs).toMatchObject({ code: 63, stderr: expect.stringMatching(/This image format does not support checks/) });
    for (const args of [['check', 'plain.raw'], ['check', '-f', 'raw', 'plain.raw'], ['check', '-r', 'plain.raw']]) {
      const result = await imgmount(...args);
      expect(result.code, args.join(' ')).toBe(63);
      expect(result.stdout).toBe('');
      expect(result.stderr).toBe('imgmount: plain.raw: This image format does not support checks\n');
    }
  });

  it('exits 1 when the image cannot be checked', async () => {
    await run('qemu-img', ['create', '-q', '-f', 'qed', join(dir, 'h.qed'), '1M']);
    const handle = await open(join(dir, 'h.qed'), 'r+');
    const bad = Buffer.alloc(4);
    bad.writeUInt32LE(3000);
    await handle.write(bad, 0, 4, 4);
    await handle.close();
    const result = await imgmount('check', 'h.qed');
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/cluster_size 3000 is not a power of two/);
  });
});

describe('imgmount --version', () => {
  it('prints "imgmount <version in package.json>" and exits 0', async () => {
    const { version } = JSON.parse(await readFile(resolve(import.meta.dirname, '../package.json'), 'utf8')) as { version: string };
    expect(await imgmount('--version')).toEqual({ code: 0, stdout: `imgmount ${version}\n`, stderr: '' });
  });
});
