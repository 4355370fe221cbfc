//! The main-stream parser must give the same events whatever sizes the bytes arrive in: real QEMU
//! streams (the golden captures) split at every position of their first 4 KiB into two chunks, and
//! fed one byte at a time, produce the same events as the whole stream at once.

mod wire_support;

use multifd_core::wire::{Event, Geometry, StreamConfig, StreamParser};

/// A comparable summary of one event.
fn summarize(ev: &Event<'_>) -> String {
    format!("{ev:?}")
}

/// Parses `chunks` in order; returns the event summaries, or the error with its position.
fn parse(chunks: &[&[u8]]) -> Result<Vec<String>, String> {
    let mut p = StreamParser::new(StreamConfig::new(Geometry::DEFAULT));
    let mut out = Vec::new();
    for chunk in chunks {
        let mut rest = *chunk;
        while !rest.is_empty() {
            let at = p.position();
            let (used, ev) = p.feed(rest).map_err(|e| format!("near stream byte {at}: {e}"))?;
            if let Some(ev) = ev {
                out.push(summarize(&ev));
            }
            rest = &rest[used..];
        }
    }
    p.finish().map_err(|e| format!("finish: {e}"))?;
    Ok(out)
}

/// Page data events carry fragments whose size depends on the chunking: merge consecutive
/// fragments of one page before comparing.
fn normalize(events: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if e.starts_with("PageData") {
            let key: String = e.split(", at:").next().unwrap_or("").to_owned();
            if out.last().is_some_and(|l| l.starts_with(&key)) {
                continue;
            }
            out.push(key);
        } else if e.starts_with("VmDescriptionData") {
            if out.last().is_some_and(|l| l.starts_with("VmDescriptionData")) {
                continue;
            }
            out.push("VmDescriptionData".to_owned());
        } else {
            out.push(e);
        }
    }
    out
}

#[test]
fn real_main_streams_parse_the_same_in_any_chunking() {
    let mut checked = 0;
    for dir in std::fs::read_dir(wire_support::fixtures()).expect("fixtures") {
        let dir = dir.expect("entry").path();
        let main = wire_support::gunzip(&dir.join("main.bin.gz"));
        let whole = normalize(parse(&[&main]).unwrap_or_else(|e| panic!("{}: whole: {e}", dir.display())));
        let limit = main.len().min(4096);
        for cut in 1..limit {
            let split = parse(&[&main[..cut], &main[cut..]])
                .unwrap_or_else(|e| panic!("{}: split at {cut}: {e}", dir.display()));
            assert_eq!(normalize(split), whole, "{}: split at {cut}", dir.display());
        }
        let bytes: Vec<&[u8]> = main.chunks(1).collect();
        let one = parse(&bytes).unwrap_or_else(|e| panic!("{}: byte by byte: {e}", dir.display()));
        assert_eq!(normalize(one), whole, "{}: byte by byte", dir.display());
        checked += 1;
    }
    assert!(checked >= 7, "expected the 7 golden captures, found {checked}");
}

/// QEMU's `timer` device section holds binary clock values, and it is usually section 0, whose
/// footer is `7e 00 00 00 00`. Its payload may therefore contain the footer's bytes (a tick offset
/// ending in 0x7e, followed by the all-zero middle field): the parser must skip it by its known
/// length, not by searching for the footer. Every capture is parsed with the footer pattern written
/// at every offset of the timer payload; the events must be those of the unmodified stream.
#[test]
fn a_footer_lookalike_inside_the_timer_section_is_skipped() {
    let mut checked = 0;
    for dir in std::fs::read_dir(wire_support::fixtures()).expect("fixtures") {
        let dir = dir.expect("entry").path();
        let main = wire_support::gunzip(&dir.join("main.bin.gz"));
        let Some(name_at) = main.windows(6).position(|w| w == b"\x05timer") else { continue };
        let payload = name_at + 6 + 8;
        let whole = normalize(parse(&[&main]).unwrap_or_else(|e| panic!("{}: whole: {e}", dir.display())));
        for at in 0..=24 - 5 {
            let mut m = main.clone();
            m[payload..payload + 24].fill(0);
            m[payload + at] = 0x7e;
            let got = parse(&[&m]).unwrap_or_else(|e| panic!("{}: lookalike at payload byte {at}: {e}", dir.display()));
            assert_eq!(normalize(got), whole, "{}: lookalike at payload byte {at}", dir.display());
        }
        checked += 1;
    }
    assert!(checked >= 7, "expected the 7 golden captures to have a timer section, found {checked}");
}
