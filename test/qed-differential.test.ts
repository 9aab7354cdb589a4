/**
 * Seeded randomized differential test: thousands of random reads and writes
 * (unaligned, spanning clusters and L2 tables, several in flight at once)
 * against a plain in-memory model, reopening the image between rounds. At
 * the end qemu-img check must be clean and, where qemu can open the
 * geometry, qemu-img compare must match the model.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../src/index.js';
import { seededRandom } from './helpers/random.js';

const run = promisify(execFile);
const haveQemu = await run('qemu-img', ['--version']).then(() => true, () => false);
if (!haveQemu) console.warn('SKIP qemu-img checks in qed-differential: qemu-img is not installed (apt-get install qemu-utils)');

interface Scenario {
  name: string;
  clusterSize: number;
  tableSize: number;
  size: number;
  backing?: 'raw' | 'qed';
  backingSize?: number;
  qemuCanOpen: boolean;
}

const scenarios: Scenario[] = [
  { name: '4K clusters, table_size 1, no backing', clusterSize: 4096, tableSize: 1, size: 9 * 1024 * 1024 + 512, qemuCanOpen: false },
  { name: '4K clusters, table_size 2, raw backing smaller than the image', clusterSize: 4096, tableSize: 2, size: 12 * 1024 * 1024, backing: 'raw', backingSize: 7 * 1024 * 1024 + 1000, qemuCanOpen: true },
  { name: '64K clusters, table_size 4, qed backing', clusterSize: 65536, tableSize: 4, size: 20 * 1024 * 1024, backing: 'qed', backingSize: 20 * 1024 * 1024, qemuCanOpen: true },
];

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'imgmount-diff-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('random reads and writes match an in-memory model', () => {
  for (const [index, scenario] of scenarios.entries()) {
    it(scenario.name, { timeout: 120_000 }, async () => {
      const seed = 0x1ed5eed + index;
      const random = seededRandom(seed);
      const imagePath = join(dir, `diff-${index}.qed`);
      const model = Buffer.alloc(scenario.size);

      let backingFile: string | undefined;
      if (scenario.backing) {
        const backingContent = Buffer.alloc(scenario.backingSize!);
        random.fill(backingContent);
        backingContent.copy(model, 0, 0, Math.min(model.length, backingContent.length));
        if (scenario.backing === 'raw') {
          backingFile = `base-${index}.raw`;
          await writeFile(join(dir, backingFile), backingContent);
        } else {
          backingFile = `base-${index}.qed`;
          await createImage(join(dir, backingFile), 'qed', { size: backingContent.length, options: { cluster_size: '4096', table_size: '2' } });
          const base = await openImage(join(dir, backingFile));
          // Fill only some clusters of the backing image so unallocated backing ranges read as zeros too.
          for (let offset = 0; offset < backingContent.length; offset += 3 * 65536) {
            const end = Math.min(backingContent.length, offset + 65536);
            await base.write(offset, backingContent.subarray(offset, end));
          }
          await base.close();
          for (let offset = 0; offset < backingContent.length; offset += 3 * 65536) {
            model.fill(0, Math.min(offset + 65536, model.length), Math.min(offset + 3 * 65536, backingContent.length, model.length));
          }
        }
      }
      await createImage(imagePath, 'qed', {
        size: scenario.size,
        backingFile,
        backingFormat: scenario.backing,
        options: { cluster_size: String(scenario.clusterSize), table_size: String(scenario.tableSize) },
      });

      const l2Span = ((scenario.tableSize * scenario.clusterSize) / 8) * scenario.clusterSize;
      const randomRange = (): [number, number] => {
        const kind = random.int(0, 3);
        let offset: number;
        if (kind === 0) offset = random.int(0, scenario.size - 1);
        else if (kind === 1) offset = Math.max(0, random.int(1, Math.floor(scenario.size / l2Span)) * l2Span - random.int(0, 3 * scenario.clusterSize));
        else offset = random.int(0, Math.floor(scenario.size / scenario.clusterSize) - 1) * scenario.clusterSize + random.int(-3, 3);
        offset = Math.min(Math.max(0, offset), scenario.size - 1);
        const maxLength = kind === 3 ? 4 * scenario.clusterSize + 17 : 3 * scenario.clusterSize;
        const length = Math.min(random.int(1, maxLength), scenario.size - offset);
        return [offset, length];
      };

      let operations = 0;
      for (let round = 0; round < 6; round++) {
        const image = await openImage(imagePath);
        for (let batch = 0; batch < 60; batch++) {
          // A batch runs concurrently: writes to disjoint ranges, reads of ranges no write in the batch touches.
          const taken: Array<[number, number]> = [];
          const overlaps = (a: number, b: number) => taken.some(([c, d]) => a < d && c < b);
          const pending: Promise<void>[] = [];
          const expectations: Array<{ offset: number; expected: Buffer; actual: Buffer }> = [];
          for (let op = 0; op < 6; op++) {
            const [offset, length] = randomRange();
            if (overlaps(offset, offset + length)) continue;
            taken.push([offset, offset + length]);
            operations += 1;
            if (random.int(0, 1) === 0) {
              const data = Buffer.alloc(length);
              random.fill(data);
              data.copy(model, offset);
              pending.push(image.write(offset, data));
            } else {
              const actual = Buffer.alloc(length);
              expectations.push({ offset, expected: Buffer.from(model.subarray(offset, offset + length)), actual });
              pending.push(image.read(offset, actual));
            }
          }
          await Promise.all(pending);
          for (const { offset, expected, actual } of expectations) {
            if (!actual.equals(expected)) {
              throw new Error(`seed ${seed} round ${round}: read of ${expected.length} bytes at ${offset} differs from the model`);
            }
          }
        }
        await image.close();
      }
      expect(operations).toBeGreaterThan(1500);

      const reopened = await openImage(imagePath, { readOnly: true });
      const whole = Buffer.alloc(scenario.size);
      await reopened.read(0, whole);
      await reopened.close();
      expect(whole.equals(model), `seed ${seed}: whole image differs from the model`).toBe(true);

      if (haveQemu && scenario.qemuCanOpen) {
        await run('qemu-img', ['check', imagePath]);
        const reference = join(dir, `model-${index}.raw`);
        await writeFile(reference, model);
        await run('qemu-img', ['compare', '-f', 'qed', '-F', 'raw', imagePath, reference]);
      }
    });
  }
});
