//! Embedding the receive side: one thread per channel plus the main stream's thread receive a
//! migration from an in-memory transport (its bytes made by the send engine, see `common`). The
//! core's `RecvSession` decides everything; this file only moves bytes and runs threads.
//! Run: `cargo run -p multifd-core --example embed_recv`.
// Receive errors carry whole block names (see `BlockName`), so results holding them are large.
#![allow(clippy::result_large_err)]

mod common;

use std::sync::Mutex;
use std::thread;

use common::{CHANNELS, Threads, Yield, geometry, image, send_inline};
use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{BlockSpec, BlockTable, GuestMemory, ZeroPagePolicy};
use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{Identity, MainState, MainStream, RecvError, RecvSession, SessionConfig};
use multifd_core::wire::PacketConfig;

/// A small guest memory: bytes behind a lock (a VMM maps guest RAM and `readv`s into it through
/// `GuestMemory::raw_range` instead).
struct Ram(Mutex<Vec<u8>>);

impl GuestMemory for Ram {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn write(&self, at: usize, data: &[u8]) {
        self.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
    }
    fn fill_zero(&self, at: usize, len: usize) {
        self.0.lock().unwrap()[at..at + len].fill(0);
    }
    fn read(&self, at: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.0.lock().unwrap()[at..at + out.len()]);
    }
}

type Session = RecvSession<usize, RecvError, 8>;
type Table<'a> = BlockTable<'a, Ram, 4>;

/// One channel's worker: gives the channel what it asks for from its connection's bytes.
fn channel(s: &Session, id: ChannelId, mut input: &[u8], table: &Table<'_>) -> Result<(), RecvError> {
    let (mut ch, waker) = (s.channel(id)?, Yield);
    // After an error the worker just returns it: the caller records it, which ends the migration.
    loop {
        if ch.is_parked() {
            s.wait_sync(&waker, &mut ch)?; // counted in at the barrier; waits for the epoch's release
        } else if input.is_empty() {
            s.channel_done(&waker, &ch, true); // the connection closed: the session checks where
            return Ok(());
        } else {
            // Copies through `GuestMemory::write` and stops at a SYNC. With raw guest addresses an
            // embedder asks `ch.want()` instead and reads each page straight into place.
            let n = ch.receive_bytes(input, table)?;
            input = &input[n..];
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (source, s) = (image(), Session::new(SessionConfig::new(CHANNELS, PacketConfig::new(geometry())))?);
    let conns = send_inline(&source);
    // Identify every connection from its first bytes; the session checks each init packet.
    let (mut main_in, mut chans) = (&[][..], vec![&[][..]; CHANNELS.into()]);
    for c in &conns {
        match s.identify(c)? {
            Identity::Main => main_in = c,
            Identity::Channel(id) => chans[id.index()] = &c[64..],
            Identity::NeedMore { .. } => return Err(s.closed_unidentified(c.len()).into()),
        }
    }
    // The block list comes first and says what to map; the session checks it and ends it.
    let mut main: MainStream<4> = MainStream::new(&s);
    main_in = &main_in[main.read_block_list(&s, main_in)?.used..];
    let d = *main.declared().next().ok_or("no block")?;
    let ram = Ram(Mutex::new(vec![0; d.used_length as usize]));
    let words: Vec<AtomicWord> = (0..words_for(ram.len() / 4096)).map(|_| AtomicWord::new(0)).collect();
    let mut table: Table<'_> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    let (name, used_len) = (d.name.as_bytes(), d.used_length);
    table.add(
        &BlockSpec { name, used_len, page_size: multifd_core::wire::Geometry::DEFAULT, memory_zeroed: true },
        &ram,
        &words,
    )?;
    main.start(&table)?;
    let work = |id: ChannelId| {
        if let Err(e) = channel(&s, id, chans[id.index()], &table) {
            s.lifecycle().record_error(&Yield, e); // ends every wait of the session
        }
    };
    let totals = thread::scope(|scope| {
        let threads = Threads::<_, RecvError>::new(scope, &work);
        s.lifecycle().create_all(&threads, |_| Ok(()))?;
        while !main_in.is_empty() {
            let step = main.feed(&s, main_in, &table)?; // records applied to the table
            main_in = &main_in[step.used..];
            if step.state == MainState::AtMarker {
                main.wait_marker(&s, &threads, ChannelId(0))?; // every channel reached its SYNC
            }
        }
        main.end()?;
        main.wait_channels(&s, &threads, ChannelId(0))?;
        let joined = s.lifecycle().cleanup(&threads)?;
        Ok::<_, Box<dyn std::error::Error>>(s.finish(&joined, &main, &table)?)
    })?;
    assert!(*ram.0.lock().unwrap() == source, "the destination differs from the source");
    println!("embed_recv: {} bytes received byte for byte: {totals:?}", source.len());
    Ok(())
}
