'use strict';
// Framing (PROTOCOL.md §2): a u32 big-endian length, then that many bytes of
// body. `FrameReader` reassembles bodies from chunks split or coalesced
// anyhow, and refuses a length over its limit from the 4 prefix bytes alone,
// before anything is buffered for the body.

const { ProtocolError } = require('./errors');

/** PROTOCOL.md §2: 16 MiB. */
const DEFAULT_MAX_FRAME_LENGTH = 16 * 1024 * 1024;

class FrameReader {
  /** @param {number} maxFrameLength the longest body accepted (a body of exactly this length is). */
  constructor(maxFrameLength = DEFAULT_MAX_FRAME_LENGTH) {
    this.maxFrameLength = maxFrameLength;
    /** Chunks not yet consumed, and how many bytes they hold past `offset` of the first. */
    this.chunks = [];
    this.offset = 0;
    this.buffered = 0;
  }

  /**
   * Takes a chunk and returns the complete bodies it finished, in order.
   * Throws `ProtocolError` (code `too_large`) on a length over the limit; the
   * reader is then unusable (the link must end).
   */
  push(chunk) {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const bodies = [];
    for (;;) {
      if (this.buffered < 4) break;
      const length = this.peekLength();
      if (length > this.maxFrameLength) {
        throw new ProtocolError(
          `frame of ${length} bytes exceeds the ${this.maxFrameLength}-byte limit`,
          { code: 'too_large' },
        );
      }
      if (this.buffered < 4 + length) break;
      this.skip(4);
      bodies.push(this.take(length));
    }
    return bodies;
  }

  /**
   * The stream ended: throws `ProtocolError` (code `truncated`) if it ended
   * inside a frame (even inside its prefix); a stream that ends on a frame
   * boundary is a clean close.
   */
  end() {
    if (this.buffered > 0) {
      throw new ProtocolError(`the stream ended inside a frame (${this.buffered} bytes of it received)`, {
        code: 'truncated',
      });
    }
  }

  peekLength() {
    const first = this.chunks[0];
    if (first.length - this.offset >= 4) return first.readUInt32BE(this.offset);
    const prefix = Buffer.allocUnsafe(4);
    let filled = 0;
    for (let i = 0, off = this.offset; filled < 4; i++, off = 0) {
      const chunk = this.chunks[i];
      const n = Math.min(4 - filled, chunk.length - off);
      chunk.copy(prefix, filled, off, off + n);
      filled += n;
    }
    return prefix.readUInt32BE(0);
  }

  skip(n) {
    this.buffered -= n;
    while (n > 0) {
      const first = this.chunks[0];
      const left = first.length - this.offset;
      if (n < left) {
        this.offset += n;
        return;
      }
      n -= left;
      this.chunks.shift();
      this.offset = 0;
    }
  }

  /** The next `n` bytes (a view into the chunk when the body lies in one chunk). */
  take(n) {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.offset >= n) {
      const body = first.subarray(this.offset, this.offset + n);
      this.skip(n);
      return body;
    }
    const body = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const m = Math.min(n - filled, chunk.length - this.offset);
      chunk.copy(body, filled, this.offset, this.offset + m);
      filled += m;
      this.skip(m);
    }
    return body;
  }
}

module.exports = { FrameReader, DEFAULT_MAX_FRAME_LENGTH };
