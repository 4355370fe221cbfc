//! The receive session driven cooperatively over in-memory streams, as the firmware and the fuzz
//! harness drive it: identification, the block list, epochs, and every completion condition.

use super::*;
use crate::bitmap::{AtomicWord, words_for};
use crate::block::{AtomicRegion, AtomicU8, BlockName, BlockSpec, ZeroPagePolicy};
use crate::lifecycle::{Platform, WorkerExit};
use crate::recv::Want;
use crate::wire::stream::Record;
use crate::wire::{Flags, Geometry, Layout, RamHeader};
use std::vec;
use std::vec::Vec;

const PS: usize = 1024;
const PAGES: usize = 4;
const UUID: [u8; 16] = [7; 16];

type Session = RecvSession<(), RecvError, 4>;

fn name(n: &[u8]) -> BlockName {
    BlockName::new(n).unwrap()
}

fn geo() -> Geometry {
    Geometry::new(PS as u32).unwrap()
}

fn session(channels: u8) -> Session {
    let cfg = SessionConfig { uuid: Some(UUID), ..SessionConfig::new(channels, PacketConfig::new(geo())) };
    RecvSession::new(cfg).unwrap()
}

struct Inline;
impl Wake for Inline {
    fn wake(&self, _: ChannelId) {}
}
impl Platform for Inline {
    type Handle = ();
    type Error = RecvError;
    fn start(&self, _: ChannelId) -> Result<(), RecvError> {
        Ok(())
    }
    fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
        WorkerExit::Returned
    }
}

fn init(id: u8) -> [u8; 64] {
    let mut b = [0u8; 64];
    InitPacket { uuid: UUID, id }.encode(&mut b).unwrap();
    b
}

fn emit(out: &mut Vec<u8>, r: Record<'_>) {
    let at = out.len();
    out.resize(at + r.encoded_len(), 0);
    r.encode(&mut out[at..], PS as u32).unwrap();
}

/// The main stream's start up to the end of a block list of `blocks` (name, bytes).
fn main_head(blocks: &[(&[u8], u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    emit(&mut out, Record::FileHeader);
    emit(&mut out, Record::Configuration { machine: b"none" });
    let start = Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 };
    emit(&mut out, start);
    emit(&mut out, Record::MemSize { total: blocks.iter().map(|b| b.1).sum() });
    for &(name, used_length) in blocks {
        emit(&mut out, Record::BlockEntry { name, used_length });
    }
    out
}

/// `markers` rounds of (flush, EOS), then EOF: in flush mode, each flush is a marker.
fn main_tail(markers: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..markers {
        emit(&mut out, Record::MultifdFlush);
        emit(&mut out, Record::Eos);
        emit(&mut out, Record::Footer { section_id: 1 });
        if i + 1 < markers {
            emit(&mut out, Record::SectionPart { end: false, section_id: 1 });
        }
    }
    emit(&mut out, Record::Eof);
    out
}

fn packet(flags: u32, normal: &[u64], fill: u8) -> Vec<u8> {
    let mut out = vec![0u8; geo().header_len()];
    RamHeader {
        flags: Flags(flags),
        pages_alloc: if normal.is_empty() { 0 } else { geo().page_count() },
        normal_pages: normal.len() as u32,
        next_packet_size: (normal.len() * PS) as u32,
        packet_num: 0,
        zero_pages: 0,
        block: if normal.is_empty() { b"" } else { b"m0" },
    }
    .encode(normal, geo(), Layout::V9_0, &mut out)
    .unwrap();
    for _ in normal {
        out.extend(core::iter::repeat_n(fill, PS));
    }
    out
}

struct Guest {
    mem: Vec<AtomicU8>,
    words: Vec<AtomicWord>,
}

impl Guest {
    fn new() -> Self {
        Self {
            mem: (0..PAGES * PS).map(|_| AtomicU8::new(0)).collect(),
            words: (0..words_for(PAGES)).map(|_| AtomicWord::new(0)).collect(),
        }
    }
}

fn table<'a>(region: &'a AtomicRegion<'a>, words: &'a [AtomicWord]) -> BlockTable<'a, AtomicRegion<'a>, 2> {
    let mut t = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    let spec = BlockSpec { name: b"m0", used_len: (PAGES * PS) as u64, page_size: geo(), memory_zeroed: true };
    t.add(&spec, region, words).unwrap();
    t
}

/// Runs a whole migration cooperatively: `chans[i]` is connection i's bytes (init packet included).
/// Returns `finish`'s answer, or the first error on the way.
fn migrate(s: &Session, main_bytes: &[u8], chans: &[Vec<u8>]) -> Result<Totals, RecvError> {
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut main: MainStream<2> = MainStream::new(s);
    assert_eq!(s.identify(&main_bytes[..4])?, Identity::Main);
    let list = main.read_block_list(s, main_bytes)?;
    assert!(list.complete, "the block list ends by itself");
    main.start(&t)?;
    let mut rest = &main_bytes[list.used..];
    let created = s.lifecycle().create_all(&Inline, |_| Ok(())).unwrap();
    assert_eq!(created.started, s.config().channels);
    let mut workers = Vec::new();
    for c in chans {
        let Identity::Channel(id) = s.identify(c)? else { panic!("not a channel") };
        workers.push((s.channel(id)?, &c[64..], false));
    }
    loop {
        let mut moved = false;
        for (ch, input, done) in &mut workers {
            if *done {
                continue;
            }
            if !s.poll_sync(ch) {
                continue;
            }
            if input.is_empty() {
                s.channel_done(&Inline, ch, true);
                *done = true;
                moved = true;
                continue;
            }
            let n = ch.receive_bytes(input, &t)?;
            *input = &input[n..];
            moved |= n > 0 || matches!(ch.want(), Want::Sync);
        }
        let step = main.feed(s, rest, &t)?;
        rest = &rest[step.used..];
        moved |= step.used > 0;
        if !moved {
            break;
        }
    }
    main.end()?;
    assert!(main.poll_channels(s)?, "every channel has ended");
    let joined = s.lifecycle().cleanup(&Inline).unwrap();
    s.finish(&joined, &main, &t)
}

fn full_block() -> Vec<u8> {
    main_head(&[(b"m0", (PAGES * PS) as u64)])
}

#[test]
fn a_complete_migration_reports_its_totals() {
    let s = session(2);
    let mut main_bytes = full_block();
    main_bytes.extend(main_tail(1));
    let mut c0 = init(0).to_vec();
    c0.extend(packet(0, &[0, PS as u64], 1));
    c0.extend(packet(Flags::SYNC, &[], 0));
    let mut c1 = init(1).to_vec();
    c1.extend(packet(0, &[2 * PS as u64, 3 * PS as u64], 2));
    c1.extend(packet(Flags::SYNC, &[], 0));
    let t = migrate(&s, &main_bytes, &[c1, c0]).unwrap();
    assert_eq!((t.epochs, t.packets, t.normal_pages, t.zero_pages), (1, 4, 4, 0));
    assert_eq!(s.channel_stats(ChannelId(1)).normal_pages, 2);
}

#[test]
fn a_missing_page_is_incomplete_and_names_the_block() {
    let s = session(1);
    let mut main_bytes = full_block();
    main_bytes.extend(main_tail(1));
    let mut c0 = init(0).to_vec();
    c0.extend(packet(0, &[0, PS as u64, 2 * PS as u64], 1));
    c0.extend(packet(Flags::SYNC, &[], 0));
    let e = migrate(&s, &main_bytes, &[c0]).unwrap_err();
    assert_eq!(e, RecvError::Incomplete { block: name(b"m0"), received: 3, pages: 4 });
}

#[test]
fn a_sync_without_its_marker_fails_when_the_main_stream_ends() {
    let s = session(1);
    let mut main_bytes = full_block();
    main_bytes.extend(main_tail(1));
    let mut c0 = init(0).to_vec();
    c0.extend(packet(0, &[0, PS as u64, 2 * PS as u64, 3 * PS as u64], 1));
    c0.extend(packet(Flags::SYNC, &[], 0));
    c0.extend(packet(Flags::SYNC, &[], 0));
    let e = migrate(&s, &main_bytes, &[c0]).unwrap_err();
    assert_eq!(e, RecvError::SyncWithoutMarker { channel: ChannelId(0), markers: 1 });
}

#[test]
fn a_marker_without_the_sync_fails_once_the_channel_ended() {
    let s = session(1);
    let mut main_bytes = full_block();
    main_bytes.extend(main_tail(1));
    let mut c0 = init(0).to_vec();
    c0.extend(packet(0, &[0, PS as u64, 2 * PS as u64, 3 * PS as u64], 1));
    let e = migrate(&s, &main_bytes, &[c0]).unwrap_err();
    assert_eq!(e, RecvError::Epoch(EpochError::ChannelEnded { epoch: 1, arrived: 0, needed: 1 }));
}

#[test]
fn a_channel_cut_inside_a_packet_is_recorded_as_the_migrations_error() {
    let s = session(1);
    let mut main_bytes = full_block();
    main_bytes.extend(main_tail(1));
    let mut c0 = init(0).to_vec();
    c0.extend(&packet(0, &[0], 1)[..100]);
    // The main stream, waiting at its marker, is cancelled by the channel's recorded error.
    let e = migrate(&s, &main_bytes, &[c0]).unwrap_err();
    assert_eq!(e, RecvError::Epoch(EpochError::ChannelEnded { epoch: 1, arrived: 0, needed: 1 }));
    let recorded = s.lifecycle().error().copied();
    let cut = crate::recv::Cut::Header { have: 100, need: geo().header_len() as u32 };
    assert_eq!(recorded, Some(RecvError::Truncated { channel: ChannelId(0), packet: 0, cut }));
}

#[test]
fn finish_after_a_recorded_error_says_terminated() {
    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let main: MainStream<2> = MainStream::new(&s);
    s.lifecycle().record_error(&Inline, RecvError::DuplicateMain);
    let joined = s.lifecycle().cleanup(&Inline).unwrap();
    assert_eq!(s.finish(&joined, &main, &t), Err(RecvError::Terminated));
}

#[test]
fn finish_refuses_a_main_stream_that_did_not_end_and_a_channel_that_did_not_end() {
    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = full_block();
    bytes.extend(main_tail(1));
    let list = main.read_block_list(&s, &bytes).unwrap();
    main.start(&t).unwrap();
    s.identify(&init(0)).unwrap();
    let mut ch = s.channel(ChannelId(0)).unwrap();
    ch.receive_bytes(&packet(0, &[0, PS as u64, 2 * PS as u64, 3 * PS as u64], 1), &t).unwrap();
    ch.receive_bytes(&packet(Flags::SYNC, &[], 0), &t).unwrap();
    assert!(!s.poll_sync(&mut ch));
    assert!(s.lifecycle().all_joined().is_err(), "no cleanup yet");
    let joined = s.lifecycle().cleanup(&Inline).unwrap();
    assert_eq!(s.finish(&joined, &main, &t), Err(RecvError::MainNotEnded));
    let step = main.feed(&s, &bytes[list.used..], &t).unwrap();
    assert_eq!(step.state, MainState::Eof);
    assert!(s.poll_sync(&mut ch));
    main.end().unwrap();
    assert_eq!(s.finish(&joined, &main, &t), Err(RecvError::ChannelNotEnded { channel: ChannelId(0) }));
    s.channel_done(&Inline, &ch, false);
    assert_eq!(
        s.finish(&joined, &main, &t),
        Err(RecvError::ChannelNotEnded { channel: ChannelId(0) }),
        "stopped, not ended"
    );
}

#[test]
fn identification_refuses_duplicates_bad_ids_and_wrong_uuids() {
    let s = session(2);
    assert_eq!(s.identify(b"QE").unwrap(), Identity::NeedMore { need: 4 });
    assert_eq!(s.identify(b"QEVM").unwrap(), Identity::Main);
    assert_eq!(s.identify(b"QEVM"), Err(RecvError::DuplicateMain));
    let mut bad = init(2);
    assert_eq!(
        s.identify(&bad),
        Err(RecvError::Handshake { error: DecodeError::ChannelIdOutOfRange { id: 2, channels: 2 } })
    );
    InitPacket { uuid: [0; 16], id: 0 }.encode(&mut bad).unwrap();
    assert!(matches!(s.identify(&bad), Err(RecvError::Handshake { error: DecodeError::UuidMismatch { .. } })));
    assert_eq!(s.identify(&init(0)).unwrap(), Identity::Channel(ChannelId(0)));
    assert_eq!(s.identify(&init(0)), Err(RecvError::Handshake { error: DecodeError::DuplicateChannel { id: 0 } }));
    assert!(s.channel_connected(ChannelId(0)) && !s.channel_connected(ChannelId(1)) && !s.all_connected());
    assert!(matches!(s.identify(b"GARB"), Err(RecvError::Handshake { .. })));
    assert_eq!(s.closed_unidentified(3), RecvError::ClosedEarly { have: 3 });
}

#[test]
fn a_channel_is_handed_to_one_worker_only() {
    let s = session(2);
    assert_eq!(s.channel(ChannelId(0)).unwrap_err(), RecvError::ChannelClaim { channel: ChannelId(0) });
    s.identify(&init(0)).unwrap();
    let _worker = s.channel(ChannelId(0)).unwrap();
    assert_eq!(s.channel(ChannelId(0)).unwrap_err(), RecvError::ChannelClaim { channel: ChannelId(0) });
    assert_eq!(s.channel(ChannelId(3)).unwrap_err(), RecvError::ChannelClaim { channel: ChannelId(3) });
}

fn list_error(blocks: &[(&[u8], u64)], max_ram: u64) -> RecvError {
    let cfg = SessionConfig { max_ram, ..SessionConfig::new(1, PacketConfig::new(geo())) };
    let s: Session = RecvSession::new(cfg).unwrap();
    let mut main: MainStream<2> = MainStream::new(&s);
    let bytes = main_head(blocks);
    // One byte at a time: the checks do not depend on how the input is cut.
    let mut complete = false;
    for b in bytes.chunks(1) {
        match main.read_block_list(&s, b) {
            Ok(step) => complete = step.complete,
            Err(e) => return e,
        }
    }
    panic!("block list accepted (complete: {complete})");
}

#[test]
fn block_list_entries_are_checked_as_they_arrive() {
    let ps = PS as u64;
    let bad = |e| RecvError::BlockList(e);
    assert_eq!(
        list_error(&[(b"a", ps), (b"b", ps), (b"c", ps)], u64::MAX),
        bad(BlockListError::TooManyBlocks { max: 2 })
    );
    assert_eq!(
        list_error(&[(b"a", ps), (b"a", ps)], u64::MAX),
        bad(BlockListError::DuplicateBlock { block: name(b"a") })
    );
    assert_eq!(
        list_error(&[(b"a", ps), (b"b", 2 * ps)], 2 * ps),
        bad(BlockListError::TooMuchRam { block: name(b"b"), size: 2 * ps, total: 3 * ps, limit: 2 * ps })
    );
    assert_eq!(
        list_error(&[(b"a", ps + 1), (b"b", ps - 1)], u64::MAX),
        bad(BlockListError::BadBlock {
            block: name(b"a"),
            error: BlockError::BadUsedLength { used_len: ps + 1, page_size: PS as u32 }
        })
    );
    assert_eq!(list_error(&[], u64::MAX), bad(BlockListError::Empty));
}

#[test]
fn the_block_list_ends_with_its_last_entry_and_the_table_must_match_it() {
    let s = session(1);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = main_head(&[(b"m0", (PAGES * PS) as u64)]);
    let head = bytes.len();
    bytes.extend(main_tail(1));
    let step = main.read_block_list(&s, &bytes).unwrap();
    assert_eq!(step, BlockListStep { used: head, complete: true });
    let d: Vec<_> = main.declared().map(|d| (d.name.as_bytes().to_vec(), d.used_length)).collect();
    assert_eq!(d, vec![(b"m0".to_vec(), (PAGES * PS) as u64)]);
    // A table with another size is refused.
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem[..PS]);
    let mut t: BlockTable<'_, AtomicRegion<'_>, 2> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    let spec = BlockSpec { name: b"m0", used_len: PS as u64, page_size: geo(), memory_zeroed: true };
    t.add(&spec, &region, &g.words).unwrap();
    assert_eq!(main.start(&t), Err(RecvError::BlockList(BlockListError::TableMismatch { block: name(b"m0") })));
    // Feeding before a successful start is refused too.
    assert_eq!(main.feed(&s, &bytes[head..], &t).unwrap_err(), RecvError::BlockList(BlockListError::NotComplete));
}

#[test]
fn data_before_the_block_list_and_a_second_list_are_refused() {
    let s = session(1);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = Vec::new();
    emit(&mut bytes, Record::FileHeader);
    emit(&mut bytes, Record::Configuration { machine: b"none" });
    let start = Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 };
    emit(&mut bytes, start);
    let at = bytes.len() as u64;
    emit(&mut bytes, Record::Eos);
    assert_eq!(
        main.read_block_list(&s, &bytes),
        Err(RecvError::BlockList(BlockListError::DataBeforeList { position: at }))
    );

    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = full_block();
    let head = bytes.len();
    emit(&mut bytes, Record::MemSize { total: PS as u64 });
    main.read_block_list(&s, &bytes[..head]).unwrap();
    main.start(&t).unwrap();
    assert_eq!(
        main.feed(&s, &bytes[head..], &t),
        Err(RecvError::BlockList(BlockListError::Repeated { position: head as u64 }))
    );
}

#[test]
fn the_main_stream_waits_at_a_marker_until_every_channel_synced() {
    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = full_block();
    let head = bytes.len();
    bytes.extend(main_tail(1));
    main.read_block_list(&s, &bytes[..head]).unwrap();
    main.start(&t).unwrap();
    let step = main.feed(&s, &bytes[head..], &t).unwrap();
    assert_eq!(step.state, MainState::AtMarker);
    // Nothing more is consumed while at the marker.
    let again = main.feed(&s, &bytes[head + step.used..], &t).unwrap();
    assert_eq!(again, MainStep { used: 0, state: MainState::AtMarker });
    s.identify(&init(0)).unwrap();
    let mut ch = s.channel(ChannelId(0)).unwrap();
    assert_eq!(ch.receive_bytes(&packet(Flags::SYNC, &[], 0), &t).unwrap(), geo().header_len());
    assert!(!s.poll_sync(&mut ch), "arrived, not released yet");
    assert!(main.poll_marker(&s).unwrap(), "every channel arrived: released");
    assert!(s.poll_sync(&mut ch), "released");
    let rest = main.feed(&s, &bytes[head + step.used..], &t).unwrap();
    assert_eq!(rest.state, MainState::Eof);
    main.end().unwrap();
    assert_eq!(main.poll_channels(&s), Ok(false), "the channel has not ended");
}

#[test]
fn a_main_stream_closed_early_names_its_position() {
    let s = session(1);
    let mut main: MainStream<2> = MainStream::new(&s);
    let bytes = full_block();
    main.read_block_list(&s, &bytes[..bytes.len() - 3]).unwrap();
    assert!(matches!(main.end(), Err(RecvError::MainClosed { position, .. }) if position == bytes.len() as u64 - 3));
}

#[test]
fn finish_refuses_the_token_of_another_coordinator() {
    let s = session(1);
    let other = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let main: MainStream<2> = MainStream::new(&s);
    let foreign = other.lifecycle().cleanup(&Inline).unwrap();
    assert!(matches!(s.finish(&foreign, &main, &t), Err(RecvError::ForeignToken(_))));
}

/// A main stream that read its block list from `head` and started on `t`.
fn started(s: &Session, t: &BlockTable<'_, AtomicRegion<'_>, 2>, head: &[u8]) -> MainStream<2> {
    let mut main: MainStream<2> = MainStream::new(s);
    main.read_block_list(s, head).unwrap();
    main.start(t).unwrap();
    main
}

/// A RAM_SAVE_FLAG_PAGE record for offset 0 of `m0` with its page: what a source not using multifd
/// sends on the main stream.
fn plain_page() -> Vec<u8> {
    let mut out = 0x08u64.to_be_bytes().to_vec();
    out.push(2);
    out.extend_from_slice(b"m0");
    out.extend(core::iter::repeat_n(0x5a, PS));
    out
}

#[test]
fn a_page_on_the_main_stream_means_no_multifd_and_is_refused() {
    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut bytes = full_block();
    let head = bytes.len();
    bytes.extend(plain_page());
    let mut main = started(&s, &t, &bytes[..head]);
    // Looking ahead finds it without applying anything; feeding refuses it.
    // The position is the page data's: after the record's 8-byte header and the block name.
    let data = head as u64 + 8 + 3;
    assert_eq!(main.scan_ahead(&bytes[head..]), Err(RecvError::NotMultifd { position: data }));
    assert_eq!(main.feed(&s, &bytes[head..], &t), Err(RecvError::NotMultifd { position: data }));
    assert!(g.mem.iter().all(|b| b.load(Ordering::Relaxed) == 0), "the page was written");
}

#[test]
fn looking_ahead_from_a_marker_finds_a_page_after_it_and_nothing_in_a_multifd_stream() {
    let s = session(1);
    let g = Guest::new();
    let region = AtomicRegion::new(&g.mem);
    let t = table(&region, &g.words);
    let mut bytes = full_block();
    let head = bytes.len();
    emit(&mut bytes, Record::Eos);
    emit(&mut bytes, Record::Footer { section_id: 1 });
    emit(&mut bytes, Record::SectionPart { end: false, section_id: 1 });
    let page_at = bytes.len() as u64;
    bytes.extend(plain_page());
    let mut main = started(&s, &t, &bytes[..head]);
    let step = main.feed(&s, &bytes[head..], &t).unwrap();
    assert_eq!(step.state, MainState::AtMarker, "the first EOS is a marker");
    let rest = &bytes[head + step.used..];
    assert_eq!(main.scan_ahead(rest), Err(RecvError::NotMultifd { position: page_at + 8 + 3 }));
    // Cut inside the page record's header, before its data: nothing to say yet.
    assert_eq!(main.scan_ahead(&rest[..rest.len() - PS - 2]), Ok(()));
    // A multifd stream's tail after its marker holds no page.
    let mut multifd = full_block();
    multifd.extend(main_tail(2));
    let mut main = started(&s, &t, &multifd[..head]);
    let step = main.feed(&s, &multifd[head..], &t).unwrap();
    assert_eq!(step.state, MainState::AtMarker);
    assert_eq!(main.scan_ahead(&multifd[head + step.used..]), Ok(()));
}

#[test]
fn a_return_path_request_is_refused_where_it_is() {
    let s = session(1);
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = Vec::new();
    emit(&mut bytes, Record::FileHeader);
    emit(&mut bytes, Record::Configuration { machine: b"none" });
    let at = bytes.len() as u64;
    emit(&mut bytes, Record::Command { cmd: 1, data: &[] });
    // The position is the command header's, after the section-type byte.
    assert_eq!(main.read_block_list(&s, &bytes), Err(RecvError::ReturnPath { position: at + 1 }));
    // Other commands (a ping, switchover start) are skipped as before.
    let mut main: MainStream<2> = MainStream::new(&s);
    let mut bytes = Vec::new();
    emit(&mut bytes, Record::FileHeader);
    emit(&mut bytes, Record::Configuration { machine: b"none" });
    emit(&mut bytes, Record::Command { cmd: 2, data: &[0, 0, 0, 1] });
    assert_eq!(main.read_block_list(&s, &bytes).map(|st| st.complete), Ok(false));
}
