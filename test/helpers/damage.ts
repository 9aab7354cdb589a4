/**
 * Damaging images on purpose, for the fuzz tests: where a qcow2 or QED file
 * keeps its metadata (parsed here from the specifications, never with the
 * drivers' own parsers), and mutations aimed at it: header fields set to
 * boundary values, table entries pointed elsewhere, bit flips, truncation.
 *
 * A layout lists three kinds of targets, each tagged with what its damage
 * can change of the guest content as a read-only open sees it (`Effect`):
 * - fields: one integer of a header, a snapshot table entry, an extension;
 * - tables: arrays of 64-bit entries (L1, L2, refcount table and blocks...);
 * - regions: byte ranges for random flips.
 * A mutation is generated abstractly (indexes and choices as plain numbers)
 * and resolved against a layout into concrete patches, so fast-check can
 * shrink it and a failure names offsets and values.
 */
import { open, readFile, truncate as truncateFile } from 'node:fs/promises';

/** What damage to a target can change in the guest bytes of a read-only open: nothing, everything, or these ranges. */
export type Effect = 'none' | 'all' | Array<[start: number, end: number]>;

export interface Field {
  name: string;
  offset: number;
  width: 1 | 2 | 4 | 8;
  bigEndian: boolean;
  effect: Effect;
  /** Damage here cannot redirect writes either: a write that succeeds must read back. */
  writeSafe?: boolean;
}

export interface EntryTable {
  /** "L1", "L2", "refcount block"...: the kind, used to pick kinds evenly. */
  kind: string;
  name: string;
  offset: number;
  entries: number;
  bigEndian: boolean;
  /** What damage to entry `index` can change. */
  effect(index: number): Effect;
}

export interface Region {
  kind: string;
  name: string;
  offset: number;
  length: number;
  effect: Effect;
}

export interface Layout {
  format: 'qcow2' | 'qed';
  fileSize: number;
  clusterSize: number;
  fields: Field[];
  tables: EntryTable[];
  regions: Region[];
  /** Host offsets of metadata clusters (header, tables...): where a damaged entry may point. */
  metadataOffsets: number[];
  /** Host offsets of data clusters: a second reference to one of them is a duplicate. */
  dataOffsets: number[];
}

/** One concrete change to a file. */
export type Patch = { at: number; bytes: Buffer } | { truncateTo: number };

export interface ResolvedMutation {
  description: string;
  patches: Patch[];
  effect: Effect;
  writeSafe: boolean;
}

const bigAt = (file: Buffer, at: number, width: number, bigEndian: boolean): bigint => {
  if (at + width > file.length) return 0n;
  if (width === 8) return bigEndian ? file.readBigUInt64BE(at) : file.readBigUInt64LE(at);
  if (width === 4) return BigInt(bigEndian ? file.readUInt32BE(at) : file.readUInt32LE(at));
  if (width === 2) return BigInt(bigEndian ? file.readUInt16BE(at) : file.readUInt16LE(at));
  return BigInt(file[at]!);
};

export function encode(value: bigint, width: number, bigEndian: boolean): Buffer {
  const bytes = Buffer.alloc(width);
  const masked = BigInt.asUintN(width * 8, value);
  for (let i = 0; i < width; i++) bytes[bigEndian ? width - 1 - i : i] = Number((masked >> BigInt(8 * i)) & 0xffn);
  return bytes;
}

/** The union of two effects. */
export function joinEffects(a: Effect, b: Effect): Effect {
  if (a === 'all' || b === 'all') return 'all';
  if (a === 'none') return b;
  if (b === 'none') return a;
  return [...a, ...b];
}

/** True when [start, end) of the guest is untouched by `effect`. */
export function untouched(effect: Effect, start: number, end: number): boolean {
  if (effect === 'none') return true;
  if (effect === 'all') return false;
  return effect.every(([from, to]) => end <= from || start >= to);
}

const QCOW2_OFFSET_MASK = 0x00fffffffffffe00n;

/** Where a qcow2 image (qemu's docs/interop/qcow2.txt) keeps its metadata. */
export async function qcow2Layout(path: string): Promise<Layout> {
  const file = await readFile(path);
  const be32 = (at: number) => file.readUInt32BE(at);
  const be64 = (at: number) => Number(file.readBigUInt64BE(at));
  const version = be32(4);
  const clusterBits = be32(20);
  const clusterSize = 2 ** clusterBits;
  const size = be64(24);
  const l1Size = be32(36);
  const l1Offset = be64(40);
  const refcountTableOffset = be64(48);
  const refcountTableClusters = be32(56);
  const nbSnapshots = be32(60);
  const snapshotsOffset = be64(64);
  const incompatible = version === 3 ? file.readBigUInt64BE(72) : 0n;
  const headerLength = version === 3 ? be32(100) : 72;
  const backingOffset = be64(8);
  const backingSize = be32(16);
  const extendedL2 = (incompatible & 16n) !== 0n;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Span = (clusterSize / l2EntryBytes) * clusterSize;
  const hasBacking = backingOffset !== 0;

  const layout: Layout = { format: 'qcow2', fileSize: file.length, clusterSize, fields: [], tables: [], regions: [], metadataOffsets: [0], dataOffsets: [] };
  const field = (name: string, offset: number, width: Field['width'], effect: Effect, writeSafe = false) =>
    layout.fields.push({ name, offset, width, bigEndian: true, effect, writeSafe });
  // [name, offset, width, effect on reads, write-safe]
  const header: Array<[string, number, Field['width'], Effect, boolean?]> = [
    ['version', 4, 4, 'all'], ['backing_file_offset', 8, 8, 'all'], ['backing_file_size', 16, 4, 'all'],
    ['cluster_bits', 20, 4, 'all'], ['size', 24, 8, 'none', true], ['crypt_method', 32, 4, 'none', true], ['l1_size', 36, 4, 'none', true],
    ['l1_table_offset', 40, 8, 'all'], ['refcount_table_offset', 48, 8, 'none'], ['refcount_table_clusters', 56, 4, 'none'],
    ['nb_snapshots', 60, 4, 'none'], ['snapshots_offset', 64, 8, 'none'],
  ];
  if (version === 3) {
    header.push(
      ['incompatible_features', 72, 8, 'all'], ['compatible_features', 80, 8, 'none', true], ['autoclear_features', 88, 8, 'none', true],
      ['refcount_order', 96, 4, 'none'], ['header_length', 100, 4, 'all'],
    );
    if (headerLength > 104) header.push(['compression_type', 104, 1, 'all']);
  }
  for (const [name, offset, width, effect, writeSafe] of header) field(name, offset, width, effect, writeSafe);
  layout.regions.push({ kind: 'header', name: 'header', offset: 0, length: headerLength, effect: 'all' });
  if (hasBacking) layout.regions.push({ kind: 'backing name', name: 'backing file name', offset: backingOffset, length: backingSize, effect: 'all' });

  // Header extensions (inside the first cluster).
  const extensionEffect: Effect = hasBacking ? 'all' : 'none';
  let at = headerLength;
  const extensionsEnd = hasBacking && backingOffset > headerLength ? backingOffset : clusterSize;
  let bitmaps: { count: number; directorySize: number; directoryOffset: number } | undefined;
  while (at + 8 <= extensionsEnd) {
    const type = be32(at);
    const length = be32(at + 4);
    field(`extension 0x${type.toString(16)} type`, at, 4, extensionEffect);
    if (type === 0) break;
    field(`extension 0x${type.toString(16)} length`, at + 4, 4, extensionEffect);
    if (type === 0x23852875 && length >= 24) {
      bitmaps = { count: be32(at + 8), directorySize: be64(at + 16), directoryOffset: be64(at + 24) };
      field('bitmaps extension nb_bitmaps', at + 8, 4, 'none');
      field('bitmaps extension directory size', at + 16, 8, 'none');
      field('bitmaps extension directory offset', at + 24, 8, 'none');
    }
    at += 8 + Math.ceil(length / 8) * 8;
  }
  layout.regions.push({ kind: 'extensions', name: 'header extensions', offset: headerLength, length: Math.max(8, Math.min(at + 8, extensionsEnd) - headerLength), effect: extensionEffect });

  const addL2Tables = (l1At: number, entries: number, active: boolean, seen: Set<number>) => {
    for (let index = 0; index < entries; index++) {
      const l2Offset = Number(file.readBigUInt64BE(l1At + index * 8) & QCOW2_OFFSET_MASK);
      if (l2Offset === 0 || seen.has(l2Offset) || l2Offset + clusterSize > file.length) continue;
      seen.add(l2Offset);
      layout.metadataOffsets.push(l2Offset);
      const span: Effect = active ? [[index * l2Span, (index + 1) * l2Span]] : 'none';
      layout.tables.push({ kind: 'L2', name: `L2 table of L1 entry ${index}${active ? '' : ' (snapshot)'} at ${l2Offset}`, offset: l2Offset, entries: clusterSize / 8, bigEndian: true, effect: () => span });
      layout.regions.push({ kind: 'L2', name: `L2 table at ${l2Offset}`, offset: l2Offset, length: clusterSize, effect: span });
      for (let entry = 0; entry < clusterSize / l2EntryBytes; entry++) {
        const value = file.readBigUInt64BE(l2Offset + entry * l2EntryBytes);
        if (value & (1n << 62n)) {
          const shift = 62n - BigInt(clusterBits - 8);
          const host = Number(value & ((1n << shift) - 1n));
          const sectors = Number((value >> shift) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
          const length = Math.min(sectors * 512 - (host % 512), file.length - host);
          if (length > 0) layout.regions.push({ kind: 'compressed data', name: `compressed cluster at ${host}`, offset: host, length, effect: 'all' });
        } else if ((value & QCOW2_OFFSET_MASK) !== 0n) {
          layout.dataOffsets.push(Number(value & QCOW2_OFFSET_MASK));
        }
      }
    }
  };

  const activeL2 = new Set<number>();
  if (l1Size > 0) {
    layout.metadataOffsets.push(l1Offset);
    layout.tables.push({
      kind: 'L1', name: `L1 table at ${l1Offset}`, offset: l1Offset, entries: l1Size, bigEndian: true,
      effect: (index) => [[index * l2Span, Math.min(size, (index + 1) * l2Span)]],
    });
    layout.regions.push({ kind: 'L1', name: `L1 table at ${l1Offset}`, offset: l1Offset, length: l1Size * 8, effect: 'all' });
    addL2Tables(l1Offset, l1Size, true, activeL2);
  }

  const refcountEntries = (refcountTableClusters * clusterSize) / 8;
  layout.metadataOffsets.push(refcountTableOffset);
  layout.tables.push({ kind: 'refcount table', name: `refcount table at ${refcountTableOffset}`, offset: refcountTableOffset, entries: refcountEntries, bigEndian: true, effect: () => 'none' });
  layout.regions.push({ kind: 'refcount table', name: `refcount table at ${refcountTableOffset}`, offset: refcountTableOffset, length: refcountEntries * 8, effect: 'none' });
  for (let index = 0; index < refcountEntries; index++) {
    const block = Number(file.readBigUInt64BE(refcountTableOffset + index * 8) & QCOW2_OFFSET_MASK);
    if (block === 0 || block + clusterSize > file.length) continue;
    layout.metadataOffsets.push(block);
    layout.tables.push({ kind: 'refcount block', name: `refcount block ${index} at ${block}`, offset: block, entries: clusterSize / 8, bigEndian: true, effect: () => 'none' });
    layout.regions.push({ kind: 'refcount block', name: `refcount block ${index} at ${block}`, offset: block, length: clusterSize, effect: 'none' });
  }

  if (nbSnapshots > 0) {
    let entryAt = snapshotsOffset;
    const snapshotL2 = new Set(activeL2);
    layout.metadataOffsets.push(snapshotsOffset);
    for (let index = 0; index < nbSnapshots && entryAt + 40 <= file.length; index++) {
      const snapshotL1 = be64(entryAt);
      const snapshotL1Size = be32(entryAt + 8);
      const idSize = file.readUInt16BE(entryAt + 12);
      const nameSize = file.readUInt16BE(entryAt + 14);
      const extraSize = be32(entryAt + 36);
      field(`snapshot ${index} l1_table_offset`, entryAt, 8, 'none');
      field(`snapshot ${index} l1_size`, entryAt + 8, 4, 'none');
      field(`snapshot ${index} id_str_size`, entryAt + 12, 2, 'none');
      field(`snapshot ${index} name_size`, entryAt + 14, 2, 'none');
      field(`snapshot ${index} vm_state_size`, entryAt + 32, 4, 'none');
      field(`snapshot ${index} extra_data_size`, entryAt + 36, 4, 'none');
      if (extraSize >= 16) field(`snapshot ${index} disk_size`, entryAt + 48, 8, 'none');
      const entryBytes = Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
      layout.regions.push({ kind: 'snapshot table', name: `snapshot table entry ${index}`, offset: entryAt, length: entryBytes, effect: 'none' });
      if (snapshotL1Size > 0 && snapshotL1 + snapshotL1Size * 8 <= file.length) {
        layout.metadataOffsets.push(snapshotL1);
        layout.tables.push({ kind: 'snapshot L1', name: `snapshot ${index} L1 table at ${snapshotL1}`, offset: snapshotL1, entries: snapshotL1Size, bigEndian: true, effect: () => 'none' });
        addL2Tables(snapshotL1, snapshotL1Size, false, snapshotL2);
      }
      entryAt += entryBytes;
    }
  }

  if (bitmaps && bitmaps.directoryOffset + bitmaps.directorySize <= file.length) {
    const { directoryOffset, directorySize } = bitmaps;
    layout.metadataOffsets.push(directoryOffset);
    layout.regions.push({ kind: 'bitmap directory', name: `bitmap directory at ${directoryOffset}`, offset: directoryOffset, length: directorySize, effect: 'none' });
    let entryAt = directoryOffset;
    for (let index = 0; index < bitmaps.count && entryAt + 24 <= directoryOffset + directorySize; index++) {
      const tableOffset = be64(entryAt);
      const tableSize = be32(entryAt + 8);
      field(`bitmap ${index} bitmap_table_offset`, entryAt, 8, 'none');
      field(`bitmap ${index} bitmap_table_size`, entryAt + 8, 4, 'none');
      field(`bitmap ${index} flags`, entryAt + 12, 4, 'none');
      field(`bitmap ${index} granularity_bits`, entryAt + 17, 1, 'none');
      field(`bitmap ${index} name_size`, entryAt + 18, 2, 'none');
      field(`bitmap ${index} extra_data_size`, entryAt + 20, 4, 'none');
      if (tableSize > 0 && tableOffset + tableSize * 8 <= file.length) {
        layout.metadataOffsets.push(tableOffset);
        layout.tables.push({ kind: 'bitmap table', name: `bitmap ${index} table at ${tableOffset}`, offset: tableOffset, entries: tableSize, bigEndian: true, effect: () => 'none' });
      }
      entryAt = Math.ceil((entryAt + 24 + be32(entryAt + 20) + file.readUInt16BE(entryAt + 18)) / 8) * 8;
    }
  }
  layout.metadataOffsets = [...new Set(layout.metadataOffsets.map((offset) => offset - (offset % clusterSize)))];
  return layout;
}

/** Where a QED image (the QED specification) keeps its metadata. */
export async function qedLayout(path: string): Promise<Layout> {
  const file = await readFile(path);
  const clusterSize = file.readUInt32LE(4);
  const tableSize = file.readUInt32LE(8);
  const headerSize = file.readUInt32LE(12);
  const l1Offset = Number(file.readBigUInt64LE(40));
  const imageSize = Number(file.readBigUInt64LE(48));
  const backingOffset = file.readUInt32LE(56);
  const backingSize = file.readUInt32LE(60);
  const hasBacking = (file.readBigUInt64LE(16) & 1n) !== 0n;
  const tableBytes = tableSize * clusterSize;
  const entries = tableBytes / 8;
  const l2Span = entries * clusterSize;
  const layout: Layout = { format: 'qed', fileSize: file.length, clusterSize, fields: [], tables: [], regions: [], metadataOffsets: [0, l1Offset], dataOffsets: [] };
  const header: Array<[string, number, Field['width'], Effect, boolean?]> = [
    ['cluster_size', 4, 4, 'all'], ['table_size', 8, 4, 'all'], ['header_size', 12, 4, 'none', true], ['features', 16, 8, 'all'],
    ['compat_features', 24, 8, 'none', true], ['autoclear_features', 32, 8, 'none', true], ['l1_table_offset', 40, 8, 'all'],
    ['image_size', 48, 8, 'none', true], ['backing_filename_offset', 56, 4, 'all'], ['backing_filename_size', 60, 4, 'all'],
  ];
  for (const [name, offset, width, effect, writeSafe] of header) layout.fields.push({ name, offset, width, bigEndian: false, effect, writeSafe });
  layout.regions.push({ kind: 'header', name: 'header', offset: 0, length: 64, effect: 'all' });
  if (hasBacking) layout.regions.push({ kind: 'backing name', name: 'backing file name', offset: backingOffset, length: backingSize, effect: 'all' });
  layout.regions.push({ kind: 'header cluster', name: 'rest of the header clusters', offset: 64, length: headerSize * clusterSize - 64, effect: hasBacking ? 'all' : 'none' });
  layout.tables.push({
    kind: 'L1', name: `L1 table at ${l1Offset}`, offset: l1Offset, entries, bigEndian: false,
    effect: (index) => [[index * l2Span, Math.min(imageSize, (index + 1) * l2Span)]],
  });
  layout.regions.push({ kind: 'L1', name: `L1 table at ${l1Offset}`, offset: l1Offset, length: tableBytes, effect: 'all' });
  for (let index = 0; index < entries; index++) {
    const l2Offset = Number(file.readBigUInt64LE(l1Offset + index * 8));
    if (l2Offset === 0 || l2Offset + tableBytes > file.length) continue;
    const span: Effect = [[index * l2Span, (index + 1) * l2Span]];
    layout.metadataOffsets.push(l2Offset);
    layout.tables.push({ kind: 'L2', name: `L2 table of L1 entry ${index} at ${l2Offset}`, offset: l2Offset, entries, bigEndian: false, effect: () => span });
    layout.regions.push({ kind: 'L2', name: `L2 table at ${l2Offset}`, offset: l2Offset, length: tableBytes, effect: span });
    for (let entry = 0; entry < entries; entry++) {
      const data = Number(file.readBigUInt64LE(l2Offset + entry * 8));
      if (data > 1) layout.dataOffsets.push(data);
    }
  }
  return layout;
}

/** A value choice, drawn by fast-check: `choice` selects a rule, the others feed it. */
export interface ValueChoice {
  choice: number;
  random: bigint;
  bit: number;
  pick: number;
}

const U64 = (1n << 64n) - 1n;

/**
 * A boundary or aimed value for a header field of `width` bytes that holds
 * `original`: 0, 1, maxima, 2^53 neighbours, the file end and one cluster
 * past it, misaligned offsets, the offset of another metadata cluster...
 */
export function fieldValue(layout: Layout, width: number, original: bigint, v: ValueChoice): { value: bigint; rule: string } {
  const max = (1n << BigInt(width * 8)) - 1n;
  const cs = BigInt(layout.clusterSize);
  const fileEnd = BigInt(layout.fileSize);
  const metadata = BigInt(layout.metadataOffsets[v.pick % layout.metadataOffsets.length]!);
  const rules: Array<[string, bigint]> = [
    ['0', 0n], ['1', 1n], ['2', 2n], ['max', max], ['max - 1', max - 1n], ['2^31', 1n << 31n], ['2^32', 1n << 32n], ['2^53 - 1', (1n << 53n) - 1n],
    ['2^53', 1n << 53n], ['2^63', 1n << 63n], ['file size', fileEnd], ['file size + cluster', fileEnd + cs],
    ['file size rounded down to a cluster', fileEnd - (fileEnd % cs)], ['file size - cluster', fileEnd - cs], ['cluster size', cs],
    ['cluster size - 1', cs - 1n], ['cluster size + 1', cs + 1n], ['512', 512n], ['513', 513n], ['original + 1', original + 1n],
    ['original - 1', original - 1n], ['original + cluster', original + cs], ['original * 2', original * 2n], ['original / 2', original / 2n],
    [`original ^ bit ${v.bit % (width * 8)}`, original ^ (1n << BigInt(v.bit % (width * 8)))], ['a metadata cluster', metadata],
    ['a metadata cluster + 512', metadata + 512n], ['random', v.random], ['16', 16n], ['original ^ 0xff', original ^ 0xffn],
  ];
  const [rule, value] = rules[v.choice % rules.length]!;
  return { value: BigInt.asUintN(width * 8, value < 0n ? value + (max + 1n) : value), rule };
}

/**
 * A value for a 64-bit table entry: flags toggled (qcow2 copied, compressed,
 * zero), misaligned, pointing into metadata, at another data cluster (a
 * duplicate reference), at or past the end of the file, above 2^53...
 */
export function entryValue(layout: Layout, original: bigint, v: ValueChoice): { value: bigint; rule: string } {
  const cs = BigInt(layout.clusterSize);
  const fileEnd = BigInt(layout.fileSize) - (BigInt(layout.fileSize) % cs);
  const flags = layout.format === 'qcow2' ? original & ~QCOW2_OFFSET_MASK & ~0x1ffn : 0n;
  const metadata = BigInt(layout.metadataOffsets[v.pick % layout.metadataOffsets.length]!);
  const data = layout.dataOffsets.length > 0 ? BigInt(layout.dataOffsets[v.pick % layout.dataOffsets.length]!) : cs;
  const rules: Array<[string, bigint]> = [
    ['0', 0n], ['1', 1n], ['original ^ bit 63 (qcow2 copied)', original ^ (1n << 63n)], ['original ^ bit 62 (qcow2 compressed)', original ^ (1n << 62n)],
    ['original ^ 1 (qcow2 zero)', original ^ 1n], ['original + 512', original + 512n], ['a metadata cluster', flags | metadata],
    ['another data cluster', flags | data], ['the end of the file', flags | fileEnd], ['one cluster past the end of the file', flags | (fileEnd + cs)],
    ['the largest qcow2 offset', flags | QCOW2_OFFSET_MASK], ['all ones', U64], ['random', v.random],
    [`original ^ bit ${v.bit}`, original ^ (1n << BigInt(v.bit))], ['2^53', flags | (1n << 53n)], ['the header cluster', flags | 0n | 512n],
    ['cluster 1', flags | cs], ['original + cluster', original + cs], ['compressed at a random place', (1n << 62n) | (v.random & ((1n << 62n) - 1n))],
    ['2^53 - cluster', flags | ((1n << 53n) - cs)],
  ];
  const [rule, value] = rules[v.choice % rules.length]!;
  return { value: BigInt.asUintN(64, value), rule };
}

export type Mutation =
  | { kind: 'field'; group: number; pick: number; value: ValueChoice }
  | { kind: 'entry'; table: number; pick: number; entry: number; used: boolean; value: ValueChoice }
  | { kind: 'flip'; region: number; pick: number; at: number; mask: number; count: number }
  | { kind: 'truncate'; how: number; at: number };

/** Picks a kind evenly, then an item of that kind: a seed with 200 L2 tables still gets its header damaged. */
function pickByKind<T>(items: readonly T[], kindOf: (item: T) => string, kindPick: number, itemPick: number): T | undefined {
  const kinds = [...new Set(items.map(kindOf))];
  if (kinds.length === 0) return undefined;
  const kind = kinds[kindPick % kinds.length]!;
  const ofKind = items.filter((item) => kindOf(item) === kind);
  return ofKind[itemPick % ofKind.length];
}

const fieldGroup = (field: Field): string => field.name.replace(/ \d+ .*| 0x[0-9a-f]+ .*/, '');

/** Turns an abstract mutation into patches of `file` (the seed's bytes). */
export function resolveMutation(layout: Layout, file: Buffer, mutation: Mutation): ResolvedMutation | undefined {
  switch (mutation.kind) {
    case 'field': {
      const field = pickByKind(layout.fields, fieldGroup, mutation.group, mutation.pick);
      if (!field) return undefined;
      const original = bigAt(file, field.offset, field.width, field.bigEndian);
      const { value, rule } = fieldValue(layout, field.width, original, mutation.value);
      return {
        description: `${field.name} (at ${field.offset}) ${original} -> ${value} (${rule})`,
        patches: [{ at: field.offset, bytes: encode(value, field.width, field.bigEndian) }],
        effect: field.effect,
        writeSafe: field.writeSafe ?? false,
      };
    }
    case 'entry': {
      const table = pickByKind(layout.tables, (t) => t.kind, mutation.table, mutation.pick);
      if (!table || table.entries === 0) return undefined;
      let index = mutation.entry % table.entries;
      if (mutation.used) {
        // Aim at an entry in use (the first non-zero one from `index` on), where damage matters most.
        for (let step = 0; step < table.entries; step++) {
          const candidate = (index + step) % table.entries;
          if (bigAt(file, table.offset + candidate * 8, 8, table.bigEndian) !== 0n) {
            index = candidate;
            break;
          }
        }
      }
      const at = table.offset + index * 8;
      const original = bigAt(file, at, 8, table.bigEndian);
      const { value, rule } = entryValue(layout, original, mutation.value);
      return {
        description: `${table.name} entry ${index} (at ${at}) 0x${original.toString(16)} -> 0x${value.toString(16)} (${rule})`,
        patches: [{ at, bytes: encode(value, 8, table.bigEndian) }],
        effect: table.effect(index),
        writeSafe: false,
      };
    }
    case 'flip': {
      const region = pickByKind(layout.regions, (r) => r.kind, mutation.region, mutation.pick);
      if (!region || region.length <= 0) return undefined;
      const patches: Patch[] = [];
      const where: number[] = [];
      for (let i = 0; i < mutation.count; i++) {
        const at = region.offset + ((mutation.at + i * 7919) % region.length);
        if (at >= file.length) continue;
        const mask = (mutation.mask * (i + 1)) & 0xff || 1;
        patches.push({ at, bytes: Buffer.from([file[at]! ^ mask]) });
        where.push(at);
      }
      return { description: `${region.name}: bytes flipped at ${where.join(', ')}`, patches, effect: region.effect, writeSafe: false };
    }
    case 'truncate': {
      const cs = layout.clusterSize;
      const size = layout.fileSize;
      const target = layout.metadataOffsets[mutation.at % layout.metadataOffsets.length]!;
      const choices: Array<[string, number]> = [
        ['to 0 bytes', 0], ['to 1 byte', 1], ['to 63 bytes', 63], ['to 104 bytes', 104], ['one byte short', size - 1],
        ['one cluster short', size - cs], ['into a metadata cluster', target + (mutation.at % cs)], ['at a random place', mutation.at % size],
        ['half a cluster short', size - Math.floor(cs / 2)], ['grown by 100 bytes', size + 100],
      ];
      const [rule, length] = choices[mutation.how % choices.length]!;
      const truncateTo = Math.max(0, length);
      return { description: `file truncated ${rule} (${size} -> ${truncateTo})`, patches: [{ truncateTo }], effect: 'all', writeSafe: false };
    }
  }
}

/** Applies patches to the file at `path` in order. */
export async function applyPatches(path: string, patches: readonly Patch[]): Promise<void> {
  for (const patch of patches) {
    if ('truncateTo' in patch) {
      await truncateFile(path, patch.truncateTo);
      continue;
    }
    const handle = await open(path, 'r+');
    try {
      await handle.write(patch.bytes, 0, patch.bytes.length, patch.at);
    } finally {
      await handle.close();
    }
  }
}

/** Named damage, for regression cases: the field called `name` set to `value`. */
export function setField(layout: Layout, name: string, value: bigint): ResolvedMutation {
  const field = layout.fields.find((f) => f.name === name);
  if (!field) throw new Error(`the layout has no field ${name} (it has ${layout.fields.map((f) => f.name).join(', ')})`);
  return {
    description: `${name} (at ${field.offset}) -> ${value}`,
    patches: [{ at: field.offset, bytes: encode(value, field.width, field.bigEndian) }],
    effect: field.effect,
    writeSafe: field.writeSafe ?? false,
  };
}

/** Named damage: entry `index` of the `nth` table of `kind` ("L1", "L2", "refcount block"...) set to `value` (or `value(original)`). */
export function setEntry(layout: Layout, file: Buffer, kind: string, nth: number, index: number, to: bigint | ((original: bigint) => bigint)): ResolvedMutation {
  const table = layout.tables.filter((t) => t.kind === kind)[nth];
  if (!table) throw new Error(`the layout has no ${kind} table number ${nth}`);
  const at = table.offset + index * 8;
  const value = typeof to === 'bigint' ? to : to(bigAt(file, at, 8, table.bigEndian));
  return { description: `${table.name} entry ${index} -> 0x${value.toString(16)}`, patches: [{ at, bytes: encode(value, 8, table.bigEndian) }], effect: table.effect(index), writeSafe: false };
}

/** Named damage: the file cut (or grown) to `length` bytes. */
export function truncateTo(layout: Layout, length: number): ResolvedMutation {
  return { description: `file truncated (${layout.fileSize} -> ${length})`, patches: [{ truncateTo: length }], effect: 'all', writeSafe: false };
}

/** Named damage: `bytes` written at `at` of the region of `kind` (`nth` of that kind). */
export function setBytes(layout: Layout, kind: string, nth: number, at: number, bytes: Buffer): ResolvedMutation {
  const region = layout.regions.filter((r) => r.kind === kind)[nth];
  if (!region) throw new Error(`the layout has no ${kind} region number ${nth}`);
  return { description: `${region.name}: bytes at +${at} set to ${bytes.toString('hex')}`, patches: [{ at: region.offset + at, bytes }], effect: region.effect, writeSafe: false };
}
