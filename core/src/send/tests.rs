//! Unit tests of the send engine on real threads, and (under `--cfg loom`) loom models of the batch
//! hand-over and of sync requests versus data jobs.

use super::*;
use crate::lifecycle::ChannelId;
use std::vec::Vec;

/// Guest memory for tests: one or more blocks in plain vectors (read-only during a round).
struct Mem {
    blocks: Vec<(&'static [u8], Vec<u8>)>,
}

impl SourceBlocks for Mem {
    fn count(&self) -> usize {
        self.blocks.len()
    }
    fn name(&self, block: usize) -> &[u8] {
        self.blocks[block].0
    }
    fn used_len(&self, block: usize) -> u64 {
        self.blocks[block].1.len() as u64
    }
    fn page(&self, block: usize, offset: u64, len: usize) -> &[u8] {
        &self.blocks[block].1[offset as usize..offset as usize + len]
    }
}

struct Spin;
impl Wake for Spin {
    fn wake(&self, _channel: ChannelId) {}
    fn idle(&self, _channel: ChannelId) {
        crate::sync::spin_loop();
        #[cfg(not(loom))]
        std::thread::yield_now();
    }
}
impl Notify for Spin {
    fn job(&self, _channel: ChannelId) {}
    fn producer_idle(&self) {
        crate::sync::spin_loop();
        #[cfg(not(loom))]
        std::thread::yield_now();
    }
    fn channel_done(&self, _channel: ChannelId) {}
}

#[cfg(not(loom))]
mod threads {
    use super::*;
    use crate::wire::stream::{Event, StreamConfig, StreamParser};
    use crate::wire::{Packet, PacketConfig};

    const PS: usize = 4096;

    type Engine<'b> = SendEngine<'b, Mem, (), SendError, 8>;

    fn geometry() -> Geometry {
        Geometry::new(PS as u32).unwrap()
    }

    /// A block of `pages` pages: page i is zero when i % 3 == 0, else filled with its index.
    fn block(pages: usize) -> Vec<u8> {
        let mut v = std::vec![0u8; pages * PS];
        for (i, p) in v.chunks_mut(PS).enumerate() {
            if i % 3 != 0 {
                p.fill((i % 251) as u8 + 1);
            }
        }
        v
    }

    /// A packet as a worker wrote it.
    #[derive(Debug, Clone)]
    struct Sent {
        channel: u8,
        bytes: Vec<u8>,
    }

    /// Runs `channels` workers that collect their packets until cancelled, and `body` as the producer.
    fn run<R>(engine: &Engine<'_>, body: impl FnOnce(&Engine<'_>) -> R) -> (R, Vec<Vec<Sent>>) {
        std::thread::scope(|s| {
            let workers: Vec<_> = engine
                .lifecycle()
                .ids()
                .map(|id| {
                    s.spawn(move || {
                        let mut ch = engine.channel(id).unwrap();
                        ch.ready(&Spin);
                        let mut sent = Vec::new();
                        while let Ok(out) = ch.next(&Spin) {
                            let mut bytes = out.header().to_vec();
                            for p in out.pages() {
                                bytes.extend_from_slice(p);
                            }
                            assert_eq!(bytes.len(), out.wire_len());
                            sent.push(Sent { channel: id.0, bytes });
                            ch.done(&Spin);
                        }
                        sent
                    })
                })
                .collect();
            let r = body(engine);
            engine.lifecycle().terminate(&Spin);
            (r, workers.into_iter().map(|w| w.join().unwrap()).collect())
        })
    }

    fn decode(bytes: &[u8]) -> (u32, u64, Vec<u64>, Vec<u64>, Vec<u8>) {
        let cfg = PacketConfig::new(geometry());
        match Packet::decode(bytes, &cfg).unwrap() {
            Packet::Ram(p) => (
                p.header().flags.0,
                p.header().packet_num,
                p.normal_offsets().collect(),
                p.zero_offsets().collect(),
                p.header().block.to_vec(),
            ),
            Packet::DeviceState(_) => panic!("device state packet from the send engine"),
        }
    }

    #[test]
    fn batches_are_handed_over_whole_and_zero_pages_sorted_out() {
        let pages = if cfg!(miri) { 20 } else { 1000 };
        let mem = Mem { blocks: std::vec![(&b"m0"[..], block(pages)), (&b"m1"[..], block(7))] };
        let engine = Engine::new(3, &mem, geometry(), Layout::V9_0).unwrap();
        let ((), sent) = run(&engine, |e| {
            let mut p = e.producer().unwrap();
            assert_eq!(e.producer().unwrap_err(), SendError::ProducerTaken);
            for b in 0..2 {
                for i in 0..mem.used_len(b) / PS as u64 {
                    p.queue_page(&Spin, b, i * PS as u64).unwrap();
                }
            }
            p.sync_all(&Spin).unwrap();
            assert_eq!(e.credits(), 3, "credits balance once every channel is idle");
        });
        // Every page exactly once, in a packet of its own block, classified right, data intact.
        let mut seen = [std::vec![0u32; pages], std::vec![0u32; 7]];
        for s in sent.iter().flatten() {
            let (flags, _, normal, zero, name) = decode(&s.bytes);
            if flags & Flags::SYNC != 0 {
                assert!(normal.is_empty() && zero.is_empty(), "a SYNC packet carried pages");
                continue;
            }
            let b = usize::from(name == b"m1");
            assert!(normal.len() + zero.len() <= 128);
            let data = &s.bytes[geometry().header_len()..];
            assert_eq!(data.len(), normal.len() * PS);
            for (k, off) in normal.iter().enumerate() {
                let i = *off as usize / PS;
                assert_ne!(i % 3, 0, "zero page {i} sent as data");
                assert_eq!(&data[k * PS..(k + 1) * PS], &mem.blocks[b].1[i * PS..(i + 1) * PS]);
                seen[b][i] += 1;
            }
            for off in zero {
                let i = off as usize / PS;
                assert_eq!(i % 3, 0, "data page {i} sent as zero");
                seen[b][i] += 1;
            }
        }
        for (b, s) in seen.iter().enumerate() {
            assert!(s.iter().all(|&n| n == 1), "block {b}: pages not sent exactly once: {s:?}");
        }
        // One SYNC per channel.
        for (c, list) in sent.iter().enumerate() {
            let syncs = list.iter().filter(|s| decode(&s.bytes).0 & Flags::SYNC != 0).count();
            assert_eq!(syncs, 1, "channel {c}");
        }
    }

    #[test]
    fn bad_pages_are_refused_with_their_values() {
        let mem = Mem { blocks: std::vec![(&b"m0"[..], block(4))] };
        let engine = Engine::new(1, &mem, geometry(), Layout::V9_0).unwrap();
        let mut p = engine.producer().unwrap();
        assert_eq!(p.queue_page(&Spin, 1, 0), Err(SendError::NoSuchBlock { block: 1, count: 1 }));
        assert_eq!(
            p.queue_page(&Spin, 0, 4 * PS as u64),
            Err(SendError::BadOffset { block: 0, offset: 4 * PS as u64, used_len: 4 * PS as u64 })
        );
        assert_eq!(p.queue_page(&Spin, 0, 5), Err(SendError::BadOffset { block: 0, offset: 5, used_len: 16384 }));
        let long = Mem { blocks: std::vec![(&[b'x'; 256][..], block(1))] };
        assert_eq!(
            Engine::new(1, &long, geometry(), Layout::V9_0).unwrap_err(),
            SendError::BlockName { block: 0, len: 256 }
        );
    }

    /// Two workers on one job slot would both read its batch and both give it back; the engine hands
    /// out each channel's worker state once, and refuses ids outside the migration.
    #[test]
    fn a_channel_is_taken_once() {
        let mem = Mem { blocks: std::vec![(&b"m0"[..], block(4))] };
        let engine = Engine::new(2, &mem, geometry(), Layout::V9_0).unwrap();
        {
            let first = engine.channel(ChannelId(0)).unwrap();
            assert_eq!(first.id(), ChannelId(0));
            assert_eq!(engine.channel(ChannelId(0)).unwrap_err(), SendError::ChannelTaken { channel: ChannelId(0) });
        }
        assert_eq!(
            engine.channel(ChannelId(0)).unwrap_err(),
            SendError::ChannelTaken { channel: ChannelId(0) },
            "still taken after the first was dropped"
        );
        assert_eq!(engine.channel(ChannelId(1)).map(|c| c.id()).ok(), Some(ChannelId(1)));
        assert_eq!(
            engine.channel(ChannelId(2)).unwrap_err(),
            SendError::NoSuchChannel { channel: ChannelId(2), channels: 2 }
        );
        let uuid = [7; 16];
        let packet = init_packet(ChannelId(1), uuid);
        assert_eq!(InitPacket::decode(&packet).map(|p| (p.uuid, p.id)), Ok((uuid, 1)));
    }

    struct Sink(Vec<u8>);
    impl MainSink for Sink {
        type Error = ();
        fn write(&mut self, bytes: &[u8]) -> Result<(), ()> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// Dirties pages i with i % (round + 2) == 0 for rounds 1..=3, then completes.
    struct Rounds {
        pages: usize,
        bitmap: Vec<u64>,
        stats: Vec<RoundStats>,
    }
    impl Precopy for Rounds {
        fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
            self.bitmap = std::vec![0; self.pages.div_ceil(64)];
            for i in 0..self.pages {
                if round == 0 || (round <= 3 && i % (round as usize + 2) == 0) {
                    self.bitmap[i / 64] |= 1 << (i % 64);
                }
            }
            &self.bitmap
        }
        fn round_done(&mut self, stats: &RoundStats) -> Step {
            self.stats.push(*stats);
            if stats.round >= 2 { Step::Complete } else { Step::Iterate }
        }
    }

    #[test]
    fn every_round_syncs_every_channel_once_paired_with_one_flush() {
        let pages = if cfg!(miri) { 10 } else { 600 };
        let mem = Mem { blocks: std::vec![(&b"m0"[..], block(pages))] };
        let engine = Engine::new(4, &mem, geometry(), Layout::V9_0).unwrap();
        let mut sink = Sink(Vec::new());
        let mut rounds = Rounds { pages, bitmap: Vec::new(), stats: Vec::new() };
        let (summary, sent) = run(&engine, |e| {
            let mut p = e.producer().unwrap();
            precopy(&mut p, &Spin, &mut sink, &mut rounds, b"none").unwrap()
        });
        // Main stream: count MULTIFD_FLUSH records, and it parses to its end.
        let mut parser = StreamParser::new(StreamConfig::default());
        let (mut flushes, mut input) = (0u32, &sink.0[..]);
        while !input.is_empty() {
            let (n, ev) = parser.feed(input).unwrap();
            if let Some(Event::MultifdFlush) = ev {
                flushes += 1;
            }
            input = &input[n..];
        }
        assert!(parser.is_done(), "main stream incomplete");
        assert_eq!(summary.rounds, 4, "rounds 0..=2 plus the final one");
        assert_eq!(flushes, 1 + summary.rounds, "setup flush plus one per round");
        assert_eq!(summary.syncs_per_channel, flushes);
        let mut nums = Vec::new();
        for (c, list) in sent.iter().enumerate() {
            let syncs = list.iter().filter(|s| decode(&s.bytes).0 & Flags::SYNC != 0).count() as u32;
            assert_eq!(syncs, flushes, "channel {c}: {syncs} SYNC packets, {flushes} flushes");
            let per: Vec<u64> = list.iter().map(|s| decode(&s.bytes).1).collect();
            assert!(per.windows(2).all(|w| w[0] < w[1]), "channel {c}: packet numbers not increasing: {per:?}");
            nums.extend(per);
            assert!(list.iter().all(|s| s.channel == c as u8));
        }
        nums.sort_unstable();
        let n = nums.len();
        nums.dedup();
        assert_eq!(nums.len(), n, "packet numbers repeat");
        assert_eq!(nums, (0..n as u64).collect::<Vec<_>>(), "packet numbers are not 0..{n}");
        // Statistics: round 0 is every page; rounds 1, 2 and the last are the dirtied ones.
        let want: Vec<u64> = (0..3).map(|r| (0..pages).filter(|i| r == 0 || i % (r + 2) == 0).count() as u64).collect();
        let got: Vec<u64> = rounds.stats.iter().map(|s| s.pages).collect();
        assert_eq!(got, want);
        let left: Vec<u64> = rounds.stats.iter().map(|s| s.dirty_left).collect();
        let want_left: Vec<u64> = (1..4).map(|r| (0..pages).filter(|i| i % (r + 2) == 0).count() as u64).collect();
        assert_eq!(left, want_left);
        assert_eq!(summary.total.pages, want.iter().sum::<u64>() + want_left[2]);
        assert_eq!(summary.total.zero_pages + summary.total.normal_pages, summary.total.pages);
        assert_eq!(engine.credits(), 4);
    }

    #[test]
    fn cancel_ends_the_producer_and_the_workers() {
        let mem = Mem { blocks: std::vec![(&b"m0"[..], block(300))] };
        let engine = Engine::new(2, &mem, geometry(), Layout::V9_0).unwrap();
        // No worker is ready: the producer waits for a credit until cancelled from another thread.
        std::thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut p = engine.producer().unwrap();
                (0..200).try_for_each(|i| p.queue_page(&Spin, 0, i * PS as u64))
            });
            std::thread::sleep(core::time::Duration::from_millis(20));
            engine.lifecycle().terminate(&Spin);
            assert_eq!(producer.join().unwrap(), Err(SendError::Cancelled));
        });
        let mut ch = engine.channel(ChannelId(0)).unwrap();
        assert!(matches!(ch.next(&Spin), Err(SendError::Cancelled)));
    }
}

#[cfg(loom)]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const PS: usize = 1024;

    fn mem() -> Mem {
        let mut v = std::vec![0u8; 2 * PS];
        v[PS] = 9;
        Mem { blocks: std::vec![(&b"m0"[..], v)] }
    }

    /// Producer hands two batches to one channel (the second only after the first came back) and then
    /// a sync request; the worker must see each batch whole (loom checks the cell accesses) and the
    /// sync as a SYNC packet without pages.
    #[test]
    fn loom_send_handover() {
        loom::model(|| {
            let mem: &'static Mem = std::boxed::Box::leak(std::boxed::Box::new(mem()));
            let geometry = Geometry::new(PS as u32).unwrap();
            let engine: Arc<SendEngine<'static, Mem, (), SendError, 1>> =
                Arc::new(SendEngine::new(1, mem, geometry, Layout::V9_0).unwrap());
            let e2 = engine.clone();
            let worker = big(move || {
                let mut ch = e2.channel(ChannelId(0)).unwrap();
                ch.ready(&Spin);
                let mut kinds = Vec::new();
                for _ in 0..3 {
                    let out = ch.next(&Spin).unwrap();
                    kinds.push((out.kind, out.packet_num, out.pages().count()));
                    ch.done(&Spin);
                }
                kinds
            });
            let e3 = engine.clone();
            big(move || {
                let mut p = e3.producer().unwrap();
                p.queue_page(&Spin, 0, 0).unwrap();
                p.flush(&Spin).unwrap();
                p.queue_page(&Spin, 0, PS as u64).unwrap();
                p.flush(&Spin).unwrap();
                p.sync_all(&Spin).unwrap();
            })
            .join()
            .unwrap();
            let kinds = worker.join().unwrap();
            assert_eq!(
                kinds,
                std::vec![
                    (JobKind::Data { normal: 0, zero: 1 }, 0, 0),
                    (JobKind::Data { normal: 1, zero: 0 }, 1, 1),
                    (JobKind::Sync, 2, 0),
                ]
            );
            assert_eq!(engine.credits(), 1);
        });
    }

    /// A data job and a sync request queued back to back (the sync flushes the pending batch first):
    /// the channel sees two distinct jobs, the data packet without SYNC and then a page-less SYNC, never
    /// a SYNC flag on data (B23), and the two packet numbers are distinct.
    #[test]
    fn loom_sync_vs_data() {
        loom::model(|| {
            let mem: &'static Mem = std::boxed::Box::leak(std::boxed::Box::new(mem()));
            let geometry = Geometry::new(PS as u32).unwrap();
            let engine: Arc<SendEngine<'static, Mem, (), SendError, 1>> =
                Arc::new(SendEngine::new(1, mem, geometry, Layout::V9_0).unwrap());
            let e = engine.clone();
            let worker = big(move || {
                let mut ch = e.channel(ChannelId(0)).unwrap();
                ch.ready(&Spin);
                let mut kinds = Vec::new();
                for _ in 0..2 {
                    let out = ch.next(&Spin).unwrap();
                    let sync_flag = out.header()[11] & 1 == 1;
                    kinds.push((out.kind, out.packet_num, sync_flag));
                    ch.done(&Spin);
                }
                kinds
            });
            let e3 = engine.clone();
            big(move || {
                let mut p = e3.producer().unwrap();
                p.queue_page(&Spin, 0, PS as u64).unwrap();
                p.sync_all(&Spin).unwrap();
            })
            .join()
            .unwrap();
            let kinds = worker.join().unwrap();
            assert_eq!(kinds, std::vec![(JobKind::Data { normal: 1, zero: 0 }, 0, false), (JobKind::Sync, 1, true)]);
            assert_eq!(engine.credits(), 1);
        });
    }

    /// A loom thread with a stack large enough for the engine's fixed-size batches and headers.
    fn big<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        thread::Builder::new().stack_size(1 << 20).spawn(f).unwrap()
    }
}
