//! Embedding the send side: the core's `SendEngine` migrates a guest image over an in-memory
//! transport with one thread per channel, in two precopy rounds; the receive session (see `common`)
//! then takes the bytes and checks the migration completed, and the destination is compared byte
//! for byte. Run: `cargo run -p multifd-core --example embed_send`.
// Receive errors carry whole block names (see `BlockName`), so results holding them are large.
#![allow(clippy::result_large_err)]

mod common;

use std::thread;

use common::{CHANNELS, MainOut, PAGES, Source, Threads, Wire, Yield, geometry, image, receive_inline};
use multifd_core::block::AtomicU8;
use multifd_core::lifecycle::ChannelId;
use multifd_core::send::{Notify, Precopy, Quiescent, RoundStats, SendEngine, SendError, Step, precopy};
use multifd_core::wire::Layout;

/// The migration's error, recorded in the engine's lifecycle.
#[derive(Debug)]
enum Failure {
    Send(SendError),
}

type Engine<'b> = SendEngine<'b, Source<'b>, usize, Failure, 8>;

/// The producer's and the workers' wake-ups: everyone polls (yields) in this example, so there is
/// nothing to signal. An embedder with parked threads unparks the channel's thread in `job`.
struct Polling;

impl Notify for Polling {
    fn job(&self, _: ChannelId) {}
    fn producer_idle(&self) {
        thread::yield_now();
    }
    fn channel_done(&self, _: ChannelId) {}
}

/// One channel's worker: its init packet, then each packet the engine builds, as one write each
/// (header, then the guest's pages straight from its memory), until the migration ends.
fn worker(engine: &Engine<'_>, id: ChannelId, wire: &Wire) -> Result<(), SendError> {
    let mut ch = engine.channel(id)?; // each channel's worker state is handed out once
    wire.push(1 + id.index(), &ch.init_packet([0; 16]));
    ch.ready(&Polling);
    loop {
        match ch.next(&Yield) {
            Ok(out) => {
                wire.push(1 + id.index(), out.header());
                out.pages().for_each(|page| wire.push(1 + id.index(), page));
            }
            Err(SendError::Cancelled) => return Ok(()), // cleanup ended the migration
            Err(e) => return Err(e),
        }
        ch.done(&Polling);
    }
}

/// Round 0 sends every page; round 1 sends pages 1 and 5 again, as if the guest had written them.
struct TwoRounds {
    all: [u64; PAGES / 64],
    dirty: [u64; PAGES / 64],
}

impl Precopy for TwoRounds {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        if round == 0 { &self.all } else { &self.dirty }
    }
    fn between_rounds(&mut self, round: u32, _quiescent: &Quiescent<'_>) {
        // Every channel is idle here: a guest could run now and dirty pages.
        println!("embed_send: round {round} sent, guest may run");
        self.dirty[0] = 0b10_0010;
    }
    fn round_done(&mut self, stats: &RoundStats) -> Step {
        println!("embed_send: round {}: {} pages ({} zero)", stats.round, stats.pages, stats.zero_pages);
        if stats.round == 0 { Step::Iterate } else { Step::Complete }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (guest, wire) = (image(), Wire::new());
    let source = Source(&guest);
    let engine: Engine<'_> = SendEngine::new(CHANNELS, &source, geometry(), Layout::V9_0)?;
    let work = |id: ChannelId| {
        if let Err(e) = worker(&engine, id, &wire) {
            engine.lifecycle().record_error(&Yield, Failure::Send(e)); // ends every wait
        }
    };
    let summary = thread::scope(|scope| {
        let threads = Threads::<_, Failure>::new(scope, &work);
        engine.lifecycle().create_all(&threads, |_| Ok(()))?;
        let mut producer = engine.producer()?;
        let mut rounds = TwoRounds { all: [u64::MAX; PAGES / 64], dirty: [0; PAGES / 64] };
        // The main stream is written on this thread; precopy waits for the channels between rounds.
        let sent = precopy(&mut producer, &Polling, &mut MainOut(&wire), &mut rounds, b"none");
        engine.lifecycle().cleanup(&threads)?; // ends and joins every worker
        Ok::<_, Box<dyn std::error::Error>>(sent?)
    })?;
    if let Some(Failure::Send(e)) = engine.lifecycle().error() {
        return Err(e.to_string().into());
    }
    let dest: Vec<AtomicU8> = (0..guest.len()).map(|_| AtomicU8::new(0)).collect();
    let totals = receive_inline(&wire.take(), &dest)?;
    assert!(dest.iter().map(|b| b.load(std::sync::atomic::Ordering::Relaxed)).eq(guest.iter().copied()));
    println!(
        "embed_send: {} rounds, {} syncs per channel; received: {totals:?}",
        summary.rounds, summary.syncs_per_channel
    );
    Ok(())
}
