/**
 * Types for `seek-bzip` 2.0.0 (pure JavaScript bzip2 decoder, shipped without
 * types): only what decode.ts uses. `output` may be any object with writeByte.
 */
declare module 'seek-bzip' {
  interface ByteSink {
    writeByte(byte: number): void;
  }
  const Bunzip: {
    decode(input: Buffer, output: ByteSink, multistream?: boolean): void;
  };
  export default Bunzip;
}
