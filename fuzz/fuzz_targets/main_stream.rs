//! Main-stream parser: arbitrary bytes in arbitrary chunks never panic, every call makes
//! progress, and page fragments stay inside their page.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::wire::stream::{Event, StreamConfig, StreamParser};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let chunk = usize::from(chunk) + 1;
    // Seed valid prefixes often: a header and configuration make the deeper states reachable.
    let mut stream = Vec::with_capacity(data.len() + 17);
    if chunk % 2 == 0 {
        stream.extend_from_slice(b"QEVM\0\0\0\x03\x07\0\0\0\x04none");
    }
    stream.extend_from_slice(data);
    let mut p = StreamParser::new(StreamConfig::default());
    'outer: for mut c in stream.chunks(chunk) {
        while !c.is_empty() {
            match p.feed(c) {
                Ok((n, ev)) => {
                    assert!(n > 0 && n <= c.len());
                    if let Some(Event::PageData { at, data, .. }) = ev {
                        assert!(at as usize + data.len() <= 4096);
                    }
                    c = &c[n..];
                }
                Err(_) => break 'outer,
            }
        }
    }
    let _ = p.finish();
});
