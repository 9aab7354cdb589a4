/**
 * ProtocolFilter: a protocol that passes everything through to the protocol
 * below it. A filter extends it and overrides only what it changes (nbdkit's
 * filters are the model). Optional abilities of the protocol below (hole
 * punching, data/hole seeking) stay optional: the filter has them exactly when
 * the protocol below has them, so the formats' "supported?" checks see through
 * any stack of filters.
 *
 * Concurrency: none of its own; calls go down as they come.
 */
import type { BlockEvent } from '../events.js';
import type { HostOffset, Protocol } from '../types.js';

export class ProtocolFilter implements Protocol {
  punchHole?: (offset: HostOffset, length: number) => Promise<void>;
  nextData?: (offset: HostOffset) => Promise<HostOffset | undefined>;
  nextHole?: (offset: HostOffset) => Promise<HostOffset>;

  constructor(protected readonly inner: Protocol) {
    if (inner.punchHole) this.punchHole = (offset, length) => this.punchHoleBelow(offset, length);
    if (inner.nextData) this.nextData = (offset) => inner.nextData!(offset);
    if (inner.nextHole) this.nextHole = (offset) => inner.nextHole!(offset);
  }

  get path(): string {
    return this.inner.path;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  read(offset: HostOffset, buffer: Buffer): Promise<void> {
    return this.inner.read(offset, buffer);
  }

  write(offset: HostOffset, buffer: Buffer): Promise<void> {
    return this.inner.write(offset, buffer);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  allocatedSize(): Promise<number> {
    return this.inner.allocatedSize();
  }

  truncate(length: number): Promise<void> {
    return this.inner.truncate(length);
  }

  /** Called for punchHole when the protocol below has it; filters that change punching override this. */
  protected punchHoleBelow(offset: HostOffset, length: number): Promise<void> {
    return this.inner.punchHole!(offset, length);
  }

  event(name: BlockEvent): void {
    this.inner.event?.(name);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
