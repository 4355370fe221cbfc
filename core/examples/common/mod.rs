//! Shared by `embed_send` and `embed_recv`: a guest image, an in-memory transport, and the far side
//! of each example's migration in its simplest form (one thread, the workers run inline).
#![allow(dead_code)]

use std::marker::PhantomData;
use std::sync::Mutex;
use std::thread::{self, Scope, ScopedJoinHandle};

use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{AtomicRegion, AtomicU8, BlockSpec, BlockTable, ZeroPagePolicy};
use multifd_core::lifecycle::{ChannelId, Platform, Wake, WorkerExit};
use multifd_core::recv::{Identity, MainStream, RecvError, RecvSession, SessionConfig, Totals};
use multifd_core::send::{MainSink, Notify, Precopy, RoundStats, SendChannel, SendEngine, SourceBlocks, Step, precopy};
use multifd_core::wire::{Geometry, Layout, PacketConfig};

pub(crate) const PAGE: usize = 4096;
pub(crate) const PAGES: usize = 64;
pub(crate) const CHANNELS: u8 = 2;
pub(crate) const BLOCK: &[u8] = b"pc.ram";

/// A deterministic guest: every third page is zero, the others carry their page number.
pub(crate) fn image() -> Vec<u8> {
    (0..PAGES * PAGE)
        .map(|i| if (i / PAGE).is_multiple_of(3) { 0 } else { (i / PAGE) as u8 ^ (i % 251) as u8 })
        .collect()
}

pub(crate) fn geometry() -> Geometry {
    Geometry::new(PAGE as u32).expect("4 KiB pages")
}

/// Channel workers as scoped threads. The lifecycle stores an index as the handle: the coordinator
/// outlives the scope, so its handle type cannot borrow it.
/// `E` is the lifecycle's error type (starting a thread never fails here).
pub(crate) struct Threads<'s, 'e, F, E> {
    scope: &'s Scope<'s, 'e>,
    work: &'e F,
    joins: Mutex<Vec<Option<ScopedJoinHandle<'s, ()>>>>,
    _error: PhantomData<fn() -> E>,
}

impl<'s, 'e, F, E> Threads<'s, 'e, F, E> {
    pub(crate) fn new(scope: &'s Scope<'s, 'e>, work: &'e F) -> Self {
        Self { scope, work, joins: Mutex::new(Vec::new()), _error: PhantomData }
    }
}

impl<F: Sync, E> Wake for Threads<'_, '_, F, E> {
    fn wake(&self, id: ChannelId) {
        Yield.wake(id);
    }
    fn idle(&self, id: ChannelId) {
        Yield.idle(id);
    }
}

impl<F: Fn(ChannelId) + Sync, E> Platform for Threads<'_, '_, F, E> {
    type Handle = usize;
    type Error = E;
    fn start(&self, id: ChannelId) -> Result<usize, Self::Error> {
        let (work, mut joins) = (self.work, self.joins.lock().unwrap());
        joins.push(Some(self.scope.spawn(move || work(id))));
        Ok(joins.len() - 1)
    }
    fn join(&self, _: ChannelId, handle: usize) -> WorkerExit {
        let t = self.joins.lock().unwrap()[handle].take();
        if t.is_some_and(|t| t.join().is_err()) { WorkerExit::Panicked } else { WorkerExit::Returned }
    }
}

/// How a worker waits: it yields its thread. Nothing to interrupt on wake: in-memory reads and
/// writes never block.
pub(crate) struct Yield;

impl Wake for Yield {
    fn wake(&self, _: ChannelId) {}
    fn idle(&self, _: ChannelId) {
        thread::yield_now();
    }
}

/// The in-memory transport: the bytes of every connection, the main stream first.
pub(crate) struct Wire {
    pub(crate) conns: Vec<Mutex<Vec<u8>>>,
}

impl Wire {
    pub(crate) fn new() -> Self {
        Self { conns: (0..=CHANNELS).map(|_| Mutex::new(Vec::new())).collect() }
    }
    pub(crate) fn push(&self, conn: usize, bytes: &[u8]) {
        self.conns[conn].lock().unwrap().extend_from_slice(bytes);
    }
    pub(crate) fn take(self) -> Vec<Vec<u8>> {
        self.conns.into_iter().map(|c| c.into_inner().unwrap()).collect()
    }
}

/// One guest image as the send engine's source.
pub(crate) struct Source<'a>(pub(crate) &'a [u8]);

impl SourceBlocks for Source<'_> {
    fn count(&self) -> usize {
        1
    }
    fn name(&self, _: usize) -> &[u8] {
        BLOCK
    }
    fn used_len(&self, _: usize) -> u64 {
        self.0.len() as u64
    }
    fn page(&self, _: usize, offset: u64, len: usize) -> &[u8] {
        &self.0[offset as usize..offset as usize + len]
    }
}

/// Round 0 sends every page; nothing is dirtied after it.
pub(crate) struct AllPages(pub(crate) [u64; PAGES / 64], pub(crate) [u64; PAGES / 64]);

impl Precopy for AllPages {
    fn dirty(&mut self, round: u32, _: usize) -> &[u64] {
        if round == 0 { &self.0 } else { &self.1 }
    }
    fn round_done(&mut self, _: &RoundStats) -> Step {
        Step::Complete
    }
}

pub(crate) struct MainOut<'w>(pub(crate) &'w Wire);

impl MainSink for MainOut<'_> {
    type Error = core::convert::Infallible;
    fn write(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.push(0, bytes);
        Ok(())
    }
}

type Engine<'b> = SendEngine<'b, Source<'b>, (), (), 4>;

/// Workers that run inline: a job for a channel builds and writes its packet at once.
struct Inline<'e, 'b> {
    engine: &'e Engine<'b>,
    wire: &'e Wire,
    workers: Mutex<Vec<Option<SendChannel<'e, 'b, Source<'b>, (), (), 4>>>>,
}

impl Wake for Inline<'_, '_> {
    fn wake(&self, _: ChannelId) {}
}

impl Platform for Inline<'_, '_> {
    type Handle = ();
    type Error = ();
    fn start(&self, id: ChannelId) -> Result<(), ()> {
        let ch = self.engine.channel(id).map_err(|_| ())?;
        self.wire.push(1 + id.index(), &ch.init_packet([0; 16]));
        ch.ready(self);
        self.workers.lock().unwrap()[id.index()] = Some(ch);
        Ok(())
    }
    fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
        WorkerExit::Returned
    }
}

impl Notify for Inline<'_, '_> {
    fn job(&self, id: ChannelId) {
        let mut ch = self.workers.lock().unwrap()[id.index()].take().expect("a started worker");
        if let Ok(out) = ch.next(self) {
            self.wire.push(1 + id.index(), out.header());
            out.pages().for_each(|p| self.wire.push(1 + id.index(), p));
        }
        ch.done(self);
        self.workers.lock().unwrap()[id.index()] = Some(ch);
    }
    fn channel_done(&self, _: ChannelId) {}
}

/// Migrates `image` into a fresh [`Wire`], one thread.
pub(crate) fn send_inline(image: &[u8]) -> Vec<Vec<u8>> {
    let (source, wire) = (Source(image), Wire::new());
    let engine = Engine::new(CHANNELS, &source, geometry(), Layout::V9_0).expect("engine");
    let inline = Inline { engine: &engine, wire: &wire, workers: Mutex::new((0..CHANNELS).map(|_| None).collect()) };
    engine.lifecycle().create_all(&inline, |_| Ok(())).expect("create");
    let mut producer = engine.producer().expect("the only producer");
    precopy(
        &mut producer,
        &inline,
        &mut MainOut(&wire),
        &mut AllPages([u64::MAX; PAGES / 64], [0; PAGES / 64]),
        b"none",
    )
    .expect("send");
    engine.lifecycle().cleanup(&inline).expect("cleanup");
    drop(inline);
    wire.take()
}

pub(crate) struct NoThreads;

impl Wake for NoThreads {
    fn wake(&self, _: ChannelId) {}
}

impl Platform for NoThreads {
    type Handle = ();
    type Error = RecvError;
    fn start(&self, _: ChannelId) -> Result<(), RecvError> {
        Ok(())
    }
    fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
        WorkerExit::Returned
    }
}

/// Receives the connections' bytes into `dest` with the receive session, one thread; returns what
/// the session's completion checks said.
pub(crate) fn receive_inline(conns: &[Vec<u8>], dest: &[AtomicU8]) -> Result<Totals, RecvError> {
    let s: RecvSession<(), RecvError, 4> =
        RecvSession::new(SessionConfig::new(CHANNELS, PacketConfig::new(geometry()))).expect("2 of 4 channels");
    let (region, words): (_, Vec<AtomicWord>) =
        (AtomicRegion::new(dest), (0..words_for(PAGES)).map(|_| AtomicWord::new(0)).collect());
    let mut table: BlockTable<'_, _, 1> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    let spec = BlockSpec {
        name: BLOCK,
        used_len: dest.len() as u64,
        page_size: multifd_core::wire::Geometry::DEFAULT,
        memory_zeroed: true,
    };
    table.add(&spec, &region, &words).expect("one block");
    let mut main: MainStream<1> = MainStream::new(&s);
    let mut chans = Vec::new();
    for c in conns {
        match s.identify(c)? {
            Identity::Main => {}
            Identity::Channel(id) => chans.push((s.channel(id)?, &c[64..], false)),
            Identity::NeedMore { .. } => return Err(s.closed_unidentified(c.len())),
        }
    }
    let mut input = &conns[0][main.read_block_list(&s, &conns[0])?.used..];
    main.start(&table)?;
    s.lifecycle().create_all(&NoThreads, |_| Ok(())).expect("fresh lifecycle");
    loop {
        let mut moved = false;
        for (ch, rest, done) in chans.iter_mut().filter(|c| !c.2) {
            if s.poll_sync(ch) && rest.is_empty() {
                s.channel_done(&NoThreads, ch, true);
                (*done, moved) = (true, true);
            } else if s.poll_sync(ch) {
                let n = ch.receive_bytes(rest, &table)?;
                (*rest, moved) = (&rest[n..], moved || n > 0 || ch.is_parked());
            }
        }
        let step = main.feed(&s, input, &table)?;
        (input, moved) = (&input[step.used..], moved || step.used > 0);
        if !moved {
            break;
        }
    }
    main.end()?;
    main.poll_channels(&s)?;
    let joined = s.lifecycle().cleanup(&NoThreads).expect("the only cleanup");
    s.finish(&joined, &main, &table)
}
