//! The floor for a compressed migration on this machine: the same codec calls on the same pages, in
//! as many threads, with no I/O. Used by `scripts/bench-compress.sh` as the "floor" variant.
//!
//! Before the clock starts it reads the image, finds its data pages (zero pages are never
//! compressed) and cuts them into packets of up to 128 pages in page order. Then, for each of N
//! channels, one compressing thread runs the channel's stream over packets k ≡ channel (mod N) with
//! `multifd_std::codec`'s compressor and hands each payload over an in-memory queue to the channel's
//! decompressing thread, which decompresses it page by page into a page buffer and copies the page
//! into the destination, as `multifd recv` does. It prints the seconds from the first compression to
//! the last page copied, the compressed bytes, and checks the destination afterwards.
//!
//! Usage: `codec_floor IMAGE CHANNELS zlib|zstd [LEVEL]`

use std::sync::mpsc::sync_channel;
use std::time::Instant;

use multifd_std::codec::{ZSTD_WINDOW_DEFAULT, decoder, encoder};
use multifd_std::multifd_core::wire::Compression;

const PAGE: usize = 4096;
const PACKET_PAGES: usize = 128;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: codec_floor IMAGE CHANNELS zlib|zstd [LEVEL]";
    let (Some(path), Some(ch), Some(method)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let channels: usize = ch.parse().ok().filter(|&c| (1..=255).contains(&c)).unwrap_or_else(|| {
        eprintln!("{usage}: CHANNELS is 1 to 255");
        std::process::exit(2)
    });
    let method = match method.as_str() {
        "zlib" => Compression::Zlib,
        "zstd" => Compression::Zstd,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2)
        }
    };
    let level: u32 = args.get(4).map_or(Some(1), |l| l.parse().ok()).unwrap_or_else(|| {
        eprintln!("{usage}: LEVEL is a number");
        std::process::exit(2)
    });
    let image = std::fs::read(path).unwrap_or_else(|e| {
        eprintln!("codec_floor: {path}: {e}");
        std::process::exit(1)
    });
    let data: Vec<usize> =
        (0..image.len() / PAGE).filter(|&p| image[p * PAGE..][..PAGE].iter().any(|&b| b != 0)).collect();
    let packets: Vec<&[usize]> = data.chunks(PACKET_PAGES).collect();
    // Each channel's destination holds its packets' pages one after the other (made and touched
    // before the clock starts, as `multifd recv --prealloc` memory is).
    let share = |c: usize| (c..packets.len()).step_by(channels).map(|k| packets[k].len() * PAGE).sum::<usize>();
    let mut dest: Vec<Vec<u8>> = (0..channels).map(|c| vec![1u8; share(c)]).collect();
    let t0 = Instant::now();
    let (image, packets) = (&image, &packets);
    let packed: u64 = std::thread::scope(|s| {
        let mut sizes = Vec::new();
        let mut dests = dest.iter_mut();
        for c in 0..channels {
            // Payload buffers go round between the two threads: none is made per packet.
            let (tx, rx) = sync_channel::<(usize, Vec<u8>, usize)>(4);
            let (back_tx, back) = sync_channel::<Vec<u8>>(4);
            for _ in 0..4 {
                back_tx.send(vec![0u8; 2 * PACKET_PAGES * PAGE]).expect("room for 4");
            }
            sizes.push(s.spawn(move || {
                let mut enc = encoder(method, level).expect("level in range").expect("a codec");
                let mut total = 0u64;
                for k in (c..packets.len()).step_by(channels) {
                    let Ok(mut out) = back.recv() else { break };
                    let mut pages = packets[k].iter().map(|&p| &image[p * PAGE..][..PAGE]);
                    let n = enc.compress(&mut pages, &mut out).expect("compresses");
                    total += n as u64;
                    if tx.send((k, out, n)).is_err() {
                        break;
                    }
                }
                total
            }));
            let dest = dests.next().expect("one per channel");
            s.spawn(move || {
                let mut dec = decoder(method, ZSTD_WINDOW_DEFAULT).expect("window in range").expect("a codec");
                let mut page = vec![0u8; PAGE];
                let mut at = 0;
                for (k, payload, n) in rx {
                    let mut input = &payload[..n];
                    let expected = (packets[k].len() * PAGE) as u64;
                    for i in 0..packets[k].len() {
                        dec.decompress(&mut input, &mut page, (i * PAGE) as u64, expected).expect("decompresses");
                        dest[at..at + PAGE].copy_from_slice(&page);
                        at += PAGE;
                    }
                    dec.end_packet(&mut input, expected).expect("ends cleanly");
                    assert!(input.is_empty(), "packet {k}: bytes left");
                    let _ = back_tx.send(payload);
                }
            });
        }
        sizes.into_iter().map(|h| h.join().expect("compressor")).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut at = vec![0usize; channels];
    for (k, packet) in packets.iter().enumerate() {
        let c = k % channels;
        for &p in *packet {
            assert_eq!(&dest[c][at[c]..at[c] + PAGE], &image[p * PAGE..][..PAGE], "page {p} differs");
            at[c] += PAGE;
        }
    }
    let raw = (data.len() * PAGE) as u64;
    println!("codec floor: {secs:.6} s, {packed} compressed bytes for {raw} bytes of data pages");
}
