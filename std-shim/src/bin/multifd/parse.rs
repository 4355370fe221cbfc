//! Parsers for the command line's values: each checks its range and says what was wrong in one line.

use std::time::Duration;

/// Parses a uuid with [`uuid::Uuid::parse_str`]: 32 hex digits, either plain or in the 8-4-4-4-12
/// groups of the hyphenated form, which may also come in braces (`{...}`) or after `urn:uuid:`; hex
/// digits in either case. Dashes elsewhere are refused.
pub(crate) fn uuid(s: &str) -> Result<[u8; 16], String> {
    uuid::Uuid::parse_str(s).map(uuid::Uuid::into_bytes).map_err(|e| format!("uuid {s:?}: {e}"))
}

/// Parses a byte count: digits with an optional K/M/G/T suffix (powers of 1024; `B`/`iB` allowed).
pub(crate) fn bytes(size: &str) -> Result<u64, String> {
    let t = size.trim().trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
        Some(b'T' | b't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("size {size:?}: not a number with an optional K/M/G/T suffix"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("size {size:?} overflows 64 bits"))
}

/// A guest size for `demo`: [`bytes`], a positive multiple of 4096.
pub(crate) fn guest_size(s: &str) -> Result<u64, String> {
    let b = bytes(s)?;
    if b == 0 || !b.is_multiple_of(4096) {
        return Err(format!("size {s:?}: {b} bytes is not a positive multiple of 4096"));
    }
    Ok(b)
}

/// Parses `NAME:SIZE` (SIZE as [`bytes`]).
pub(crate) fn prealloc(s: &str) -> Result<(Vec<u8>, u64), String> {
    let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("--prealloc {s:?}: expected NAME:SIZE"))?;
    if name.is_empty() {
        return Err(format!("--prealloc {s:?}: empty block name"));
    }
    let b = bytes(size).map_err(|e| format!("--prealloc {s:?}: {e}"))?;
    if b == 0 {
        return Err(format!("--prealloc {s:?}: size is zero"));
    }
    Ok((name.as_bytes().to_vec(), b))
}

/// Longest timeout accepted: a year. Longer ones are almost certainly typos, and every duration
/// below it is safe to add to an `Instant`.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// A timeout in seconds from the command line; `None` for 0 (no limit).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeout(pub(crate) Option<Duration>);

/// Parses a timeout in seconds (fractions allowed): 0 means no limit; at most a year.
pub(crate) fn timeout(s: &str) -> Result<Timeout, String> {
    let range =
        || format!("{s}: a timeout is a number of seconds, at most {MAX_TIMEOUT_SECS} (a year); 0 means no limit");
    let v: f64 = s.trim().parse().map_err(|_| range())?;
    if !v.is_finite() || !(0.0..=MAX_TIMEOUT_SECS).contains(&v) {
        return Err(range());
    }
    let d = Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Timeout((!d.is_zero()).then_some(d)))
}

/// Parses a list of compression methods for `recv --compression`: `none`, `zlib`, `zstd`,
/// comma-separated, at least one.
pub(crate) fn accept(s: &str) -> Result<multifd_std::multifd_core::codec::Accept, String> {
    use multifd_std::multifd_core::{codec::Accept, wire::Compression};
    let mut set = Accept::empty();
    for name in s.split(',').map(str::trim) {
        set = set.with(match name {
            "none" => Compression::None,
            "zlib" => Compression::Zlib,
            "zstd" => Compression::Zstd,
            _ => return Err(format!("{name:?} is not a compression method (none, zlib, zstd)")),
        });
    }
    if set.is_empty() {
        return Err("no compression method given (none, zlib, zstd)".into());
    }
    Ok(set)
}

/// Parses `recv --zstd-max-window`: [`bytes`] in [`multifd_std::codec::ZSTD_WINDOW_RANGE`].
pub(crate) fn zstd_window(s: &str) -> Result<u64, String> {
    let b = bytes(s)?;
    let range = multifd_std::codec::ZSTD_WINDOW_RANGE;
    if !range.contains(&b) {
        return Err(format!("{s:?}: a zstd window is {} to {} bytes (1K to 2G)", range.start(), range.end()));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_powers_of_1024_and_overflow_is_refused() {
        assert_eq!(bytes("4K"), Ok(4096));
        assert_eq!(bytes("1GiB"), Ok(1 << 30));
        assert_eq!(bytes("2T"), Ok(2 << 40));
        assert!(bytes("17179869184G").unwrap_err().contains("overflows"), "2^64 bytes");
        bytes("1.5G").unwrap_err();
        guest_size("1000").unwrap_err();
        guest_size("0").unwrap_err();
        assert_eq!(prealloc("pc.ram:1G"), Ok((b"pc.ram".to_vec(), 1 << 30)));
        for bad in [":1G", "m0:0", "m0"] {
            prealloc(bad).unwrap_err();
        }
    }

    #[test]
    fn timeouts_are_range_checked_without_panicking() {
        assert!(timeout("0").unwrap().0.is_none());
        assert_eq!(timeout("1.5").unwrap().0, Some(Duration::from_millis(1500)));
        for bad in ["1e19", "1e20", "inf", "NaN", "-1", "x", "31536001"] {
            let e = timeout(bad).map(|t| t.0).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn uuids_take_32_hex_digits_plain_or_in_the_standard_forms() {
        let want: [u8; 16] =
            [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        for ok in [
            "00112233-4455-6677-8899-aabbccddeeff",
            "00112233445566778899aabbccddeeff",
            "00112233-4455-6677-8899-AABBCCDDEEFF",
            "{00112233-4455-6677-8899-aabbccddeeff}",
            "urn:uuid:00112233-4455-6677-8899-aabbccddeeff",
        ] {
            assert_eq!(uuid(ok), Ok(want), "{ok}");
        }
        for bad in [
            "0011",
            &"g".repeat(32),
            "0011-22334455-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeeff0",
            " 00112233445566778899aabbccddeeff",
            "",
        ] {
            let e = uuid(bad).unwrap_err();
            assert!(e.starts_with(&format!("uuid {bad:?}: ")), "{bad}: {e}");
        }
    }

    #[test]
    fn compression_lists_and_zstd_windows_are_checked() {
        use multifd_std::multifd_core::wire::Compression;
        let set = accept("zlib, zstd").unwrap();
        assert!(set.contains(Compression::Zlib) && set.contains(Compression::Zstd) && !set.contains(Compression::None));
        assert!(accept("lz4").unwrap_err().contains("\"lz4\" is not a compression method"));
        accept("").unwrap_err();
        assert_eq!(zstd_window("8M"), Ok(8 << 20));
        assert!(zstd_window("512").unwrap_err().contains("1K to 2G"));
        zstd_window("4G").unwrap_err();
    }
}
