//! The compression codecs of multifd channels, on `flate2` (its `zlib-rs` backend) and `zstd`:
//! implementations of the core's [`Compress`] and [`Decompress`] seams, one stream per channel for
//! the whole migration, as QEMU's `multifd-compression` runs them.
//!
//! - zlib: one deflate stream with its zlib header at the start of the channel's first payload and
//!   never a trailer; every packet's pages are deflated in order and end with a sync flush.
//! - zstd: one stream per channel, flushed (never ended) at the end of every packet. A zstd decoder
//!   keeps a window of the sender's history, whose size the sender's level chose; the receiver
//!   refuses a window above its limit ([`ZSTD_WINDOW_DEFAULT`] unless told otherwise).
//!
//! Errors are the core's [`CodecError`], with the libraries' own static names for what failed.

use flate2::{FlushCompress, FlushDecompress, Status};
use multifd_core::block::{BlockTable, GuestMemory};
use multifd_core::codec::{CodecError, Compress, Decompress};
use multifd_core::recv::{RecvChannel, RecvError, Want};
use multifd_core::wire::Compression;
use zstd::zstd_safe;

/// Compression levels QEMU accepts: `multifd-zlib-level` 0 to 9.
pub const ZLIB_LEVELS: core::ops::RangeInclusive<u32> = 0..=9;
/// Compression levels QEMU accepts: `multifd-zstd-level` 0 to 20.
pub const ZSTD_LEVELS: core::ops::RangeInclusive<u32> = 0..=20;
/// QEMU's default level for both methods.
pub const DEFAULT_LEVEL: u32 = 1;
/// The zstd window a receiver accepts unless told otherwise: 32 MiB, what level 20 (QEMU's highest)
/// uses, so any QEMU source is accepted; level 1 uses 512 KiB.
pub const ZSTD_WINDOW_DEFAULT: u64 = 32 << 20;
/// Window limits a receiver may be given: zstd's own bounds, 1 KiB to 2 GiB.
pub const ZSTD_WINDOW_RANGE: core::ops::RangeInclusive<u64> = (1 << 10)..=(1 << 31);

/// A decompressor for `method`, or `None` for a method this build cannot decode.
pub fn decoder(method: Compression, zstd_window: u64) -> Result<Option<Box<dyn Decompress + Send>>, CodecError> {
    Ok(match method {
        Compression::Zlib => Some(Box::new(ZlibDecoder::new())),
        Compression::Zstd => Some(Box::new(ZstdDecoder::new(zstd_window)?)),
        _ => None,
    })
}

/// A receiving channel's decompression: made with the channel (allocating nothing); at the
/// channel's first compressed packet it makes its stream, a buffer for the largest payload one of
/// the channel's packets may have, and a page to decompress into, and keeps them for the channel's
/// life, so that nothing is allocated per packet. `multifd recv`'s channel workers use it, and so
/// does the fuzz harness.
///
/// A payload (what `Want::Compressed` asks for) arrives in as many pieces as the transport gives:
/// read them into [`ChannelDecoder::unfilled`] and report each with [`ChannelDecoder::filled`], or
/// hand buffered bytes to [`ChannelDecoder::take`]. Once the whole payload is in, it is decompressed
/// into the packet's pages ([`RecvChannel::decompress`]) and the channel wants its next header. The
/// length and the method are the channel's: the calls read them from [`RecvChannel::want`].
pub struct ChannelDecoder {
    zstd_window: u64,
    made: Option<Made>,
}

/// What a [`ChannelDecoder`] makes at its channel's first compressed packet.
struct Made {
    stream: Box<dyn Decompress + Send>,
    payload: Vec<u8>,
    /// Bytes of the current payload received so far.
    have: usize,
    page: Vec<u8>,
}

impl std::fmt::Debug for ChannelDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = self.made.as_ref().map(|m| m.stream.method());
        f.debug_struct("ChannelDecoder").field("method", &method).field("have", &self.have()).finish_non_exhaustive()
    }
}

impl ChannelDecoder {
    /// A channel's decoder that accepts zstd windows up to `zstd_window` bytes.
    pub const fn new(zstd_window: u64) -> Self {
        ChannelDecoder { zstd_window, made: None }
    }

    /// The method decompressed, once the channel had a compressed packet.
    pub fn method(&self) -> Option<Compression> {
        self.made.as_ref().map(|m| m.stream.method())
    }

    /// Bytes of the current payload received so far (0 between payloads).
    pub fn have(&self) -> usize {
        self.made.as_ref().map_or(0, |m| m.have)
    }

    /// The part of the payload `ch` wants that has not arrived yet: where the next read goes. Empty
    /// if `ch` does not want a compressed payload. At the channel's first compressed packet this
    /// makes the stream and the buffers. Errors: [`RecvError::Codec`] if the stream cannot be made,
    /// [`RecvError::NoDecompressor`] if this build has no decoder for the packet's method.
    pub fn unfilled(&mut self, ch: &mut RecvChannel) -> Result<&mut [u8], RecvError> {
        let Want::Compressed { len, method } = ch.want() else { return Ok(&mut []) };
        let made = match self.made.take() {
            Some(m) => m,
            None => Made::new(ch, method, self.zstd_window)?,
        };
        let made = self.made.insert(made);
        // The session never asks for more than the buffer holds (`RecvChannel::max_compressed`);
        // a larger length is cut to the buffer, and `filled` then fails with the sizes.
        let end = len.min(made.payload.len());
        Ok(made.payload.get_mut(made.have..end).unwrap_or_default())
    }

    /// Records that `n` more bytes of the payload were written into [`ChannelDecoder::unfilled`];
    /// once all of it is in, decompresses it into the pages of `ch`'s current packet.
    pub fn filled<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        n: usize,
        ch: &mut RecvChannel,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        let (Want::Compressed { len, .. }, Some(made)) = (ch.want(), &mut self.made) else { return Ok(()) };
        made.have = made.have.saturating_add(n);
        if made.have < len.min(made.payload.len()) {
            return Ok(());
        }
        let input = made.payload.get(..made.have).unwrap_or(&made.payload);
        made.have = 0;
        ch.decompress(input, made.stream.as_mut(), &mut made.page, table)
    }

    /// Copies as much of the payload `ch` wants as `input` holds and records it
    /// ([`ChannelDecoder::filled`]); returns the bytes taken from `input`.
    pub fn take<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        ch: &mut RecvChannel,
        input: &[u8],
        table: &BlockTable<'_, M, N>,
    ) -> Result<usize, RecvError> {
        let dst = self.unfilled(ch)?;
        let n = dst.len().min(input.len());
        dst[..n].copy_from_slice(&input[..n]);
        self.filled(n, ch, table).map(|()| n)
    }
}

impl Made {
    fn new(ch: &RecvChannel, method: Compression, zstd_window: u64) -> Result<Self, RecvError> {
        let (channel, packet) = (ch.id(), ch.stats().packets.saturating_sub(1));
        let stream = decoder(method, zstd_window)
            .map_err(|error| RecvError::Codec { channel, packet, method, error })?
            .ok_or(RecvError::NoDecompressor { channel, packet, method })?;
        log::debug!("channel {}: {} compressed", channel.0, method.name());
        Ok(Made { stream, payload: vec![0u8; ch.max_compressed()], have: 0, page: vec![0u8; ch.page_size()] })
    }
}

/// A compressor for `method` at `level` (checked against [`ZLIB_LEVELS`] / [`ZSTD_LEVELS`]).
pub fn encoder(method: Compression, level: u32) -> Result<Option<Box<dyn Compress + Send>>, CodecError> {
    Ok(match method {
        Compression::Zlib => Some(Box::new(ZlibEncoder::new(level)?)),
        Compression::Zstd => Some(Box::new(ZstdEncoder::new(level)?)),
        _ => None,
    })
}

/// The inflate side of a channel's zlib stream.
pub struct ZlibDecoder {
    z: flate2::Decompress,
}

impl std::fmt::Debug for ZlibDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZlibDecoder").field("total_in", &self.z.total_in()).finish()
    }
}

impl Default for ZlibDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ZlibDecoder {
    /// A stream that expects its zlib header first.
    pub fn new() -> Self {
        Self { z: flate2::Decompress::new(true) }
    }

    /// One inflate call: returns (input used, output made, stream ended).
    fn step(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        flush: FlushDecompress,
    ) -> Result<(usize, usize, bool), CodecError> {
        let (in0, out0) = (self.z.total_in(), self.z.total_out());
        let status =
            self.z.decompress(input, out, flush).map_err(|_| CodecError::Corrupt { what: "zlib: invalid data" })?;
        // Both deltas are bounded by the slices' lengths.
        let used = (self.z.total_in() - in0) as usize;
        let made = (self.z.total_out() - out0) as usize;
        Ok((used, made, status == Status::StreamEnd))
    }
}

impl Decompress for ZlibDecoder {
    fn method(&self) -> Compression {
        Compression::Zlib
    }

    fn decompress(
        &mut self,
        input: &mut &[u8],
        out: &mut [u8],
        produced: u64,
        expected: u64,
    ) -> Result<(), CodecError> {
        fill(|i, o| self.step(i, o, FlushDecompress::None), input, out, produced, expected)
    }

    fn end_packet(&mut self, input: &mut &[u8], expected: u64) -> Result<(), CodecError> {
        // What is left is the sync flush's empty stored block, or output the stream already decoded
        // (the rest of a match) that did not fit the last page.
        drain(|i, o| self.step(i, o, FlushDecompress::Sync), input, expected)
    }
}

/// Decompresses from `input` until `out` is full with `step` (one library call: input used, output
/// made, whether the stream ended); the shared loop of both decoders.
fn fill(
    mut step: impl FnMut(&[u8], &mut [u8]) -> Result<(usize, usize, bool), CodecError>,
    input: &mut &[u8],
    out: &mut [u8],
    produced: u64,
    expected: u64,
) -> Result<(), CodecError> {
    let mut filled = 0;
    while filled < out.len() {
        let (used, made, ended) = step(input, &mut out[filled..])?;
        *input = &input[used..];
        filled += made;
        if ended {
            // A zlib end of stream or a whole zstd frame: QEMU's streams are flushed, never ended.
            return Err(CodecError::StreamEnded);
        }
        if used == 0 && made == 0 {
            return Err(CodecError::Short { produced: produced + filled as u64, expected });
        }
    }
    Ok(())
}

/// After a packet's pages: consumes what is left of `input`, which must make no output. Probes at
/// least once, even with no input left, since a decoder may hold decoded data (zstd buffers whole
/// blocks; zlib the rest of a match); a one-byte probe tells data from a flush.
fn drain(
    mut step: impl FnMut(&[u8], &mut [u8]) -> Result<(usize, usize, bool), CodecError>,
    input: &mut &[u8],
    expected: u64,
) -> Result<(), CodecError> {
    let mut probe = [0u8; 1];
    loop {
        let (used, made, ended) = step(input, &mut probe)?;
        *input = &input[used..];
        if made > 0 {
            return Err(CodecError::Long { expected });
        }
        if ended {
            return Err(CodecError::StreamEnded);
        }
        if used == 0 || input.is_empty() {
            return Ok(()); // what is left, if anything, the core reports as trailing bytes
        }
    }
}

/// The deflate side of a channel's zlib stream.
pub struct ZlibEncoder {
    z: flate2::Compress,
}

impl std::fmt::Debug for ZlibEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZlibEncoder").field("total_out", &self.z.total_out()).finish()
    }
}

impl ZlibEncoder {
    /// A stream at `level` (0-9), with its zlib header.
    pub fn new(level: u32) -> Result<Self, CodecError> {
        if !ZLIB_LEVELS.contains(&level) {
            return Err(CodecError::Library { what: "zlib: level outside 0-9" });
        }
        Ok(Self { z: flate2::Compress::new(flate2::Compression::new(level), true) })
    }
}

impl Compress for ZlibEncoder {
    fn method(&self) -> Compression {
        Compression::Zlib
    }

    fn compress(&mut self, pages: &mut dyn Iterator<Item = &[u8]>, out: &mut [u8]) -> Result<usize, CodecError> {
        let full = CodecError::OutputFull { capacity: out.len() as u64 };
        let mut at = 0;
        let mut next = pages.next();
        while let Some(page) = next {
            next = pages.next();
            let flush = if next.is_none() { FlushCompress::Sync } else { FlushCompress::None };
            let mut rest = page;
            loop {
                let (in0, out0) = (self.z.total_in(), self.z.total_out());
                self.z
                    .compress(rest, &mut out[at..], flush)
                    .map_err(|_| CodecError::Library { what: "zlib: deflate failed" })?;
                let used = (self.z.total_in() - in0) as usize;
                at += (self.z.total_out() - out0) as usize;
                rest = &rest[used..];
                // Done with this page once all of it went in and (for the flush) deflate left room
                // in the output, which is how it says nothing is pending.
                if rest.is_empty() && at < out.len() {
                    break;
                }
                if at == out.len() {
                    return Err(full);
                }
            }
        }
        Ok(at)
    }
}

/// The decoding side of a channel's zstd stream.
pub struct ZstdDecoder {
    d: zstd_safe::DCtx<'static>,
    window: u64,
}

impl std::fmt::Debug for ZstdDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdDecoder").field("window", &self.window).finish()
    }
}

/// The zstd window log that admits a window of `bytes`: the log of the next power of two.
fn window_log(bytes: u64) -> u32 {
    bytes.max(1).next_power_of_two().trailing_zeros()
}

fn zstd_error(code: usize) -> CodecError {
    let what = zstd_safe::get_error_name(code);
    CodecError::Corrupt { what }
}

impl ZstdDecoder {
    /// A stream that refuses windows larger than `window` bytes (rounded up to a power of two; see
    /// [`ZSTD_WINDOW_RANGE`]).
    pub fn new(window: u64) -> Result<Self, CodecError> {
        if !ZSTD_WINDOW_RANGE.contains(&window) {
            return Err(CodecError::Library { what: "zstd: window limit outside 1 KiB-2 GiB" });
        }
        let mut d = zstd_safe::DCtx::create();
        d.set_parameter(zstd_safe::DParameter::WindowLogMax(window_log(window)))
            .map_err(|c| CodecError::Library { what: zstd_safe::get_error_name(c) })?;
        Ok(Self { d, window: 1 << window_log(window) })
    }

    /// One decoder call: returns (input used, output made, a frame ended).
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize, bool), CodecError> {
        let mut inb = zstd_safe::InBuffer::around(input);
        let mut outb = zstd_safe::OutBuffer::around(out);
        let hint = self.d.decompress_stream(&mut outb, &mut inb).map_err(|c| {
            if zstd_safe::get_error_name(c).contains("too much memory") {
                CodecError::WindowTooLarge { max: self.window }
            } else {
                zstd_error(c)
            }
        })?;
        // A hint of 0: a frame ended.
        Ok((inb.pos(), outb.pos(), hint == 0))
    }
}

impl Decompress for ZstdDecoder {
    fn method(&self) -> Compression {
        Compression::Zstd
    }

    fn decompress(
        &mut self,
        input: &mut &[u8],
        out: &mut [u8],
        produced: u64,
        expected: u64,
    ) -> Result<(), CodecError> {
        fill(|i, o| self.step(i, o), input, out, produced, expected)
    }

    fn end_packet(&mut self, input: &mut &[u8], expected: u64) -> Result<(), CodecError> {
        drain(|i, o| self.step(i, o), input, expected)
    }
}

/// The encoding side of a channel's zstd stream.
pub struct ZstdEncoder {
    c: zstd_safe::CCtx<'static>,
}

impl std::fmt::Debug for ZstdEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdEncoder").finish_non_exhaustive()
    }
}

impl ZstdEncoder {
    /// A stream at `level` (0-20; 0 is zstd's default level, 3).
    pub fn new(level: u32) -> Result<Self, CodecError> {
        if !ZSTD_LEVELS.contains(&level) {
            return Err(CodecError::Library { what: "zstd: level outside 0-20" });
        }
        let mut c = zstd_safe::CCtx::create();
        // In range 0..=20, so the conversion is lossless.
        c.set_parameter(zstd_safe::CParameter::CompressionLevel(level as i32))
            .map_err(|e| CodecError::Library { what: zstd_safe::get_error_name(e) })?;
        Ok(Self { c })
    }
}

impl Compress for ZstdEncoder {
    fn method(&self) -> Compression {
        Compression::Zstd
    }

    fn compress(&mut self, pages: &mut dyn Iterator<Item = &[u8]>, out: &mut [u8]) -> Result<usize, CodecError> {
        let capacity = out.len() as u64;
        let mut outb = zstd_safe::OutBuffer::around(out);
        let mut next = pages.next();
        while let Some(page) = next {
            next = pages.next();
            let mode = if next.is_none() {
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush
            } else {
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue
            };
            let mut inb = zstd_safe::InBuffer::around(page);
            loop {
                let left = self
                    .c
                    .compress_stream2(&mut outb, &mut inb, mode)
                    .map_err(|e| CodecError::Library { what: zstd_safe::get_error_name(e) })?;
                let consumed = inb.pos() == page.len();
                let flushed = mode == zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue || left == 0;
                if consumed && flushed {
                    break;
                }
                if outb.pos() == outb.capacity() {
                    return Err(CodecError::OutputFull { capacity });
                }
            }
        }
        Ok(outb.pos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut p = vec![0u8; 4096];
                for (j, b) in p.iter_mut().enumerate() {
                    // Half text-like, half noise.
                    *b =
                        if i % 2 == 0 { b"multifd page "[j % 13] } else { (j as u8).wrapping_mul(31) ^ seed ^ i as u8 };
                }
                p
            })
            .collect()
    }

    fn round_trip(method: Compression, level: u32) {
        let mut enc = encoder(method, level).unwrap().unwrap();
        let mut dec = decoder(method, ZSTD_WINDOW_DEFAULT).unwrap().unwrap();
        let mut wire = vec![0u8; 2 * 128 * 4096];
        for packet in 0..5u8 {
            let src = pages(1 + packet as usize * 7, packet);
            let len = enc.compress(&mut src.iter().map(|p| p.as_slice()), &mut wire).unwrap();
            let mut input = &wire[..len];
            let expected = (src.len() * 4096) as u64;
            for (i, want) in src.iter().enumerate() {
                let mut page = vec![0u8; 4096];
                dec.decompress(&mut input, &mut page, (i * 4096) as u64, expected).unwrap();
                assert_eq!(&page, want, "{method:?} level {level}, packet {packet} page {i}");
            }
            dec.end_packet(&mut input, expected).unwrap();
            assert!(input.is_empty(), "{method:?}: {} bytes left after packet {packet}", input.len());
        }
    }

    #[test]
    fn both_methods_round_trip_packet_by_packet_on_one_stream() {
        for level in [0, 1, 9] {
            round_trip(Compression::Zlib, level);
        }
        for level in [0, 1, 19] {
            round_trip(Compression::Zstd, level);
        }
    }

    #[test]
    fn a_short_payload_a_long_one_and_garbage_are_errors() {
        for method in [Compression::Zlib, Compression::Zstd] {
            let mut enc = encoder(method, 1).unwrap().unwrap();
            let src = pages(2, 9);
            let mut wire = vec![0u8; 4 * 4096];
            let len = enc.compress(&mut src.iter().map(|p| p.as_slice()), &mut wire).unwrap();
            // Two pages sent, three expected: the input runs out.
            let mut dec = decoder(method, ZSTD_WINDOW_DEFAULT).unwrap().unwrap();
            let mut input = &wire[..len];
            let mut page = vec![0u8; 4096];
            dec.decompress(&mut input, &mut page, 0, 3 * 4096).unwrap();
            dec.decompress(&mut input, &mut page, 4096, 3 * 4096).unwrap();
            let e = dec.decompress(&mut input, &mut page, 8192, 3 * 4096).unwrap_err();
            assert!(matches!(e, CodecError::Short { produced: 8192, expected: 12288 }), "{method:?}: {e}");
            // Two pages sent, one expected: the rest is more data.
            let mut dec = decoder(method, ZSTD_WINDOW_DEFAULT).unwrap().unwrap();
            let mut input = &wire[..len];
            dec.decompress(&mut input, &mut page, 0, 4096).unwrap();
            let e = dec.end_packet(&mut input, 4096).unwrap_err();
            assert_eq!(e, CodecError::Long { expected: 4096 }, "{method:?}");
            // Noise.
            let mut dec = decoder(method, ZSTD_WINDOW_DEFAULT).unwrap().unwrap();
            let noise: Vec<u8> = (0..64u32).map(|i| (i * 97 + 13) as u8).collect();
            let mut input = &noise[..];
            let e = dec.decompress(&mut input, &mut page, 0, 4096).unwrap_err();
            assert!(matches!(e, CodecError::Corrupt { .. } | CodecError::Short { .. }), "{method:?}: {e}");
        }
    }

    #[test]
    fn a_zstd_window_above_the_limit_is_refused() {
        let mut enc = ZstdEncoder::new(19).unwrap(); // an 8 MiB window
        let src = pages(16, 3);
        let mut wire = vec![0u8; 32 * 4096];
        let len = enc.compress(&mut src.iter().map(|p| p.as_slice()), &mut wire).unwrap();
        let mut dec = ZstdDecoder::new(1 << 20).unwrap();
        let mut input = &wire[..len];
        let mut page = vec![0u8; 4096];
        let e = dec.decompress(&mut input, &mut page, 0, 16 * 4096).unwrap_err();
        assert_eq!(e, CodecError::WindowTooLarge { max: 1 << 20 });
    }

    #[test]
    fn levels_outside_qemus_ranges_are_refused() {
        ZlibEncoder::new(10).unwrap_err();
        ZstdEncoder::new(21).unwrap_err();
        ZstdDecoder::new(512).unwrap_err();
    }
}
