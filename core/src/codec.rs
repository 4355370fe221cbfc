//! The compression seam: one compressor or decompressor per channel, for the whole migration.
//!
//! QEMU's multifd compression (`multifd-compression` zlib or zstd) compresses only the normal pages
//! of a RAM packet, in offset order, after zero pages were sorted out; the header stays plain, its
//! flags carry the method ([`Compression::flag_value`]) and `next_packet_size` the compressed length.
//! Each channel runs one compression stream for the whole migration: it is never reset or ended,
//! only flushed at the end of every packet, so a packet can be decompressed only after every earlier
//! packet of its channel.
//!
//! The core owns the packet rules (which method, how long a payload may be, that the pages come out
//! exactly full); the codec owns the stream and its memory. Implementations live with the embedder
//! (the std shim has them on `flate2` and `zstd`); nothing here allocates.
//!
//! - Receive: [`Want::Compressed`](crate::recv::Want::Compressed) asks for the packet's whole
//!   payload; the embedder reads it into a buffer of its own and hands it to
//!   [`RecvChannel::decompress`](crate::recv::RecvChannel::decompress) with its [`Decompress`]
//!   state. The core asks the codec for one page at a time, into a page-sized scratch buffer, and
//!   copies each page into guest memory through [`GuestMemory`](crate::block::GuestMemory), so a
//!   codec never holds a reference into memory that other channels write.
//! - Send: [`Outgoing::compress`](crate::send::Outgoing::compress) hands the packet's pages to a
//!   [`Compress`] and writes the compressed length and the method into the header.

use core::fmt;

use crate::wire::Compression;

/// Largest compressed payload accepted or produced for `raw` bytes of pages: twice the raw size.
/// QEMU's senders compress into a buffer of twice the packet's page bytes and fail when it is
/// full, so no QEMU packet is longer; a longer `next_packet_size` is refused before any byte of it
/// is read.
pub const fn max_compressed_len(raw: usize) -> usize {
    raw.saturating_mul(2)
}

/// What went wrong in a compression stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CodecError {
    /// The library refused the data (`what` is the library's name for the failure).
    Corrupt {
        /// The library's short description, e.g. "invalid distance too far back".
        what: &'static str,
    },
    /// The payload ended before the packet's pages were full.
    Short {
        /// Bytes of pages produced.
        produced: u64,
        /// Bytes of pages the packet has.
        expected: u64,
    },
    /// The payload holds more data than the packet's pages.
    Long {
        /// Bytes of pages the packet has.
        expected: u64,
    },
    /// Compressed bytes were left over after the pages and the flush that ends a packet.
    Trailing {
        /// Bytes left.
        left: u64,
    },
    /// The stream ended (a zlib end-of-stream, a zstd end of frame) or started again: QEMU's streams
    /// run for the whole migration.
    StreamEnded,
    /// A zstd frame needs a larger window than the receiver accepts.
    WindowTooLarge {
        /// The largest window accepted, in bytes.
        max: u64,
    },
    /// The compressed output did not fit its buffer (send side).
    OutputFull {
        /// The buffer's length.
        capacity: u64,
    },
    /// The library failed for a reason of its own (out of memory, a bad parameter).
    Library {
        /// The library's short description.
        what: &'static str,
    },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CodecError::Corrupt { what } => write!(f, "corrupt compressed data ({what})"),
            CodecError::Short { produced, expected } => {
                write!(f, "the payload decompresses to {produced} bytes, the packet's pages are {expected}")
            }
            CodecError::Long { expected } => {
                write!(f, "the payload decompresses to more than the packet's {expected} bytes of pages")
            }
            CodecError::Trailing { left } => write!(f, "{left} compressed bytes left after the packet's pages"),
            CodecError::StreamEnded => f.write_str("the compression stream ended or restarted inside the migration"),
            CodecError::WindowTooLarge { max } => {
                write!(f, "the stream needs a window larger than the {max} bytes this receiver accepts")
            }
            CodecError::OutputFull { capacity } => write!(f, "compressed data does not fit its {capacity}-byte buffer"),
            CodecError::Library { what } => write!(f, "compression library error ({what})"),
        }
    }
}

impl core::error::Error for CodecError {}

/// One channel's decompression stream.
pub trait Decompress {
    /// The method this stream decodes.
    fn method(&self) -> Compression;

    /// Decompresses from the front of `input` until `out` is full, and moves `input` past the bytes
    /// it consumed. Fails with [`CodecError::Short`] (or `Corrupt`) if `input` runs out first.
    /// `expected` is the packet's page bytes and `produced` what earlier calls for this packet made,
    /// for the error message.
    fn decompress(&mut self, input: &mut &[u8], out: &mut [u8], produced: u64, expected: u64)
    -> Result<(), CodecError>;

    /// The packet's pages are full: consumes what is left of `input` (the flush that ends a packet),
    /// which must produce no data ([`CodecError::Long`] otherwise). The core then requires `input`
    /// to be empty ([`CodecError::Trailing`]).
    fn end_packet(&mut self, input: &mut &[u8], expected: u64) -> Result<(), CodecError>;
}

/// One channel's compression stream.
pub trait Compress {
    /// The method this stream produces.
    fn method(&self) -> Compression;

    /// Compresses `pages`, in order, as the payload of one packet, ending with a flush so that the
    /// receiver can decompress the packet on its own; writes it at the start of `out` and returns
    /// its length. [`CodecError::OutputFull`] if it does not fit.
    fn compress(&mut self, pages: &mut dyn Iterator<Item = &[u8]>, out: &mut [u8]) -> Result<usize, CodecError>;
}

/// Compression methods a receiver accepts: a set of [`Compression`] values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Accept(u8);

impl Accept {
    /// Only uncompressed packets.
    pub const NONE: Self = Accept(1);
    /// Uncompressed, zlib and zstd: every method this crate's embedders can decode.
    pub const ALL: Self = Accept(1 | 2 | 4);

    const fn bit(c: Compression) -> u8 {
        match c {
            Compression::None => 1,
            Compression::Zlib => 2,
            Compression::Zstd => 4,
            _ => 0,
        }
    }

    /// The empty set (add methods with [`Accept::with`]).
    pub const fn empty() -> Self {
        Accept(0)
    }

    /// This set and `c`. Methods this crate does not support (QPL, UADK, QATzip) are never added.
    pub const fn with(self, c: Compression) -> Self {
        Accept(self.0 | Self::bit(c))
    }

    /// Whether `c` is in the set.
    pub const fn contains(self, c: Compression) -> bool {
        let b = Self::bit(c);
        b != 0 && self.0 & b != 0
    }

    /// Whether no method is in the set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Default for Accept {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Debug for Accept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Accept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (c, name) in [(Compression::None, "none"), (Compression::Zlib, "zlib"), (Compression::Zstd, "zstd")] {
            if self.contains(c) {
                write!(f, "{sep}{name}")?;
                sep = ",";
            }
        }
        if sep.is_empty() {
            f.write_str("nothing")?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn accept_sets_hold_what_was_added_and_print_it() {
        let s = Accept::empty().with(Compression::Zstd);
        assert!(s.contains(Compression::Zstd) && !s.contains(Compression::Zlib) && !s.contains(Compression::None));
        assert_eq!(s.to_string(), "zstd");
        assert_eq!(Accept::ALL.to_string(), "none,zlib,zstd");
        assert_eq!(Accept::empty().to_string(), "nothing");
        assert!(!Accept::ALL.with(Compression::Qpl).contains(Compression::Qpl), "unsupported methods never join");
    }

    #[test]
    fn the_payload_bound_is_twice_the_pages_and_never_overflows() {
        assert_eq!(max_compressed_len(512 * 1024), 1024 * 1024);
        assert_eq!(max_compressed_len(usize::MAX), usize::MAX);
    }
}
