/**
 * qcow2 refcount entries: a refcount block is an array of 2^refcount_order-bit
 * big-endian unsigned counts, one per host cluster (docs/interop/qcow2.txt,
 * "Host cluster management"). Widths below 8 bits pack several entries per
 * byte, the lowest entry in the least significant bits (as qemu's
 * get_refcount_ro0..ro6). Widths of 64 bits are limited to 2^53 - 1 here.
 *
 * Pure functions on buffers; no I/O, no state.
 */

/** Entries in one refcount block of `clusterSize` bytes. */
export function refcountsPerBlock(clusterSize: number, refcountOrder: number): number {
  return (clusterSize * 8) / 2 ** refcountOrder;
}

/** The largest count an entry of 2^refcountOrder bits holds. */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** refcountOrder) - 1;
}

/** The count at `index` of a refcount block. */
export function getRefcount(block: Buffer, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)]!;
      return (byte >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
    case 3:
      return block[index]!;
    case 4:
      return block.readUInt16BE(index * 2);
    case 5:
      return block.readUInt32BE(index * 4);
    case 6: {
      const value = block.readBigUInt64BE(index * 8);
      return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
    }
    default:
      throw new RangeError(`refcount_order ${refcountOrder} is outside 0..6`);
  }
}

/** Stores `value` (0..maxRefcount) at `index` of a refcount block. */
export function setRefcount(block: Buffer, index: number, refcountOrder: number, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > maxRefcount(refcountOrder)) {
    throw new RangeError(`refcount ${value} does not fit in ${2 ** refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    case 6:
      block.writeBigUInt64BE(BigInt(value), index * 8);
      return;
    default:
      throw new RangeError(`refcount_order ${refcountOrder} is outside 0..6`);
  }
}

/** The byte range of a block that holds entries [first, first + count): what to write back after a change. */
export function refcountByteRange(first: number, count: number, refcountOrder: number): { start: number; end: number } {
  const bits = 2 ** refcountOrder;
  const start = Math.floor((first * bits) / 8);
  const end = Math.ceil(((first + count) * bits) / 8);
  return { start, end };
}
