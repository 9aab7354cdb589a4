/**
 * imgmount as a library: the block layer's public API.
 */
export * from './block/index.js';
