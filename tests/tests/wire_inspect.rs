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
