//! `multifd inspect` on real captures: the table and JSON name what the capture holds, and bad
//! input gives errors naming the file, the offset and the field.

mod wire_support;

use multifd_core::wire::Layout;
use multifd_std::inspect::{InspectError, Options, inspect};
use std::path::PathBuf;

fn unpack(capture: &str, file: &str, dir: &std::path::Path) -> PathBuf {
    let data = wire_support::gunzip(&wire_support::fixtures().join(capture).join(format!("{file}.bin.gz")));
    let path = dir.join(format!("{capture}-{file}.bin"));
    std::fs::write(&path, data).unwrap();
    path
}

const OPTS: Options = Options { page_size: 4096, layout: Layout::V9_0, json: false };

#[test]
fn table_and_json_of_a_capture() {
    let dir = std::env::temp_dir().join(format!("multifd-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let main = unpack("q10-ch4-multifd", "main", &dir);
    let ch = unpack("q10-ch4-multifd", "ch2", &dir);
    let text = inspect(&[main.clone(), ch.clone()], OPTS).unwrap();
    assert!(text.contains("block \"m0\" used_length 0x400000"), "{text}");
    assert_eq!(text.matches("MULTIFD_FLUSH").count(), 3, "{text}");
    assert!(text.contains("multifd channel 2"), "{text}");
    let json = inspect(core::slice::from_ref(&ch), Options { json: true, ..OPTS }).unwrap();
    assert!(json.starts_with("{\"files\":[{"), "{json}");
    assert!(json.contains("\"channel\":2"));
    assert_eq!(json.matches("\"sync\":true").count(), 3);
    assert!(json.contains("\"block\":\"m0\""));

    // Truncated inside a payload: the error names the packet's offset.
    let bytes = std::fs::read(&ch).unwrap();
    let cut = dir.join("cut.bin");
    std::fs::write(&cut, &bytes[..64 + 1344 + 1344 + 10]).unwrap();
    let err = inspect(&[cut], OPTS).unwrap_err();
    assert!(matches!(err, InspectError::Invalid { offset: 1408, .. }), "{err}");
    // A bad version in the second packet header.
    let mut bad = bytes.clone();
    bad[1408 + 7] = 9;
    let badp = dir.join("bad.bin");
    std::fs::write(&badp, &bad).unwrap();
    let err = inspect(&[badp], OPTS).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: at byte offset 1408: version is 9, expected 1", dir.join("bad.bin").display())
    );
    let err = inspect(&[dir.join("missing.bin")], OPTS).unwrap_err();
    assert!(matches!(err, InspectError::Io { .. }), "{err}");
    let txt = dir.join("t.txt");
    std::fs::write(&txt, b"hello").unwrap();
    assert!(matches!(inspect(&[txt], OPTS).unwrap_err(), InspectError::UnknownStream { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A compressed channel capture (init packet, then two zstd packets made by our encoder, one with a
/// zero page): the table shows each packet's compressed and raw sizes and the file's total, the
/// JSON carries the method and both sizes, and the payloads are skipped by their compressed length
/// (a wrong skip would misread the second header).
#[test]
fn a_compressed_capture_shows_compressed_and_raw_sizes() {
    use multifd_core::codec::Compress;
    use multifd_core::lifecycle::ChannelId;
    use multifd_core::wire::{Flags, Geometry, RamHeader};
    let geo = Geometry::new(4096).unwrap();
    let mut enc = multifd_std::codec::ZstdEncoder::new(1).unwrap();
    let mut wire = multifd_core::send::init_packet(ChannelId(1), [0; 16]).to_vec();
    let mut raw_total = 0;
    let mut packed_total = 0;
    for (n, fill) in [(3usize, b'a'), (1, b'b')] {
        let pages: Vec<Vec<u8>> = (0..n).map(|i| vec![fill + i as u8; 4096]).collect();
        let mut payload = vec![0u8; 2 * n * 4096];
        let len = enc.compress(&mut pages.iter().map(|p| p.as_slice()), &mut payload).unwrap();
        let offs: Vec<u64> = (0..n as u64 + 1).map(|p| p * 4096).collect();
        let mut header = vec![0u8; geo.header_len()];
        RamHeader {
            flags: Flags(0x4),
            pages_alloc: geo.page_count(),
            normal_pages: n as u32,
            next_packet_size: len as u32,
            packet_num: n as u64,
            zero_pages: 1,
            block: b"m0",
        }
        .encode(&offs, geo, Layout::V9_0, &mut header)
        .unwrap();
        wire.extend(&header);
        wire.extend(&payload[..len]);
        raw_total += n * 4096;
        packed_total += len;
    }
    let dir = std::env::temp_dir().join(format!("multifd-inspect-zstd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zstd-ch1.bin");
    std::fs::write(&path, &wire).unwrap();
    let text = inspect(core::slice::from_ref(&path), OPTS).unwrap();
    assert_eq!(text.matches("[zstd: ").count(), 2, "{text}");
    assert!(text.contains(&format!("zstd: {raw_total} bytes of pages in {packed_total} compressed bytes")), "{text}");
    assert!(text.contains(&format!("2 packets, {} bytes", wire.len())), "{text}");
    let json = inspect(&[path], Options { json: true, ..OPTS }).unwrap();
    assert_eq!(json.matches("\"compression\":\"zstd\"").count(), 2, "{json}");
    assert!(json.contains("\"raw_bytes\":12288"), "{json}");
    std::fs::remove_dir_all(&dir).unwrap();
}
