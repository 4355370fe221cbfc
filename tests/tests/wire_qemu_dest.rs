//! Reverse oracle: a main stream from our emitter plus multifd channels from our packet encoder,
//! sent into a real QEMU 10.0 destination (`-M none`, file-backed RAM), must be accepted, and the
//! destination's RAM file must then equal the guest image byte for byte.

mod wire_support;

use core::time::Duration;
use multifd_core::wire::stream::Record;
use multifd_core::wire::{Flags, Geometry, InitPacket, Layout, RamHeader};
use multifd_tests::qemu_dest::QemuDest;
use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;
use wire_support::{PAGE, guest_image};

fn emit(out: &mut Vec<u8>, r: Record<'_>) {
    let start = out.len();
    out.resize(start + r.encoded_len(), 0);
    let n = r.encode(&mut out[start..], PAGE as u32).unwrap();
    assert_eq!(n, r.encoded_len());
}

/// Encodes channel `id`'s bytes: init, setup SYNC, its share of the pages, final SYNC.
fn channel_bytes(id: u8, batches: &[(Vec<u64>, Vec<u64>)], image: &[u8], nums: &mut u64) -> Vec<u8> {
    let geo = Geometry::new(PAGE as u32).unwrap();
    let mut out = vec![0u8; 64];
    InitPacket { uuid: [0; 16], id }.encode(&mut out).unwrap();
    let packet = |out: &mut Vec<u8>, flags: u32, normal: &[u64], zero: &[u64], nums: &mut u64| {
        let start = out.len();
        out.resize(start + geo.header_len(), 0);
        let offs: Vec<u64> = normal.iter().chain(zero).copied().collect();
        let pages = !offs.is_empty();
        RamHeader {
            flags: Flags(flags),
            pages_alloc: if pages { geo.page_count() } else { 0 },
            normal_pages: normal.len() as u32,
            next_packet_size: (normal.len() * PAGE) as u32,
            packet_num: *nums,
            zero_pages: zero.len() as u32,
            block: if pages { b"m0" } else { b"" },
        }
        .encode(&offs, geo, Layout::V9_0, &mut out[start..])
        .unwrap();
        *nums += 1;
        for &o in normal {
            out.extend_from_slice(&image[o as usize..o as usize + PAGE]);
        }
    };
    packet(&mut out, Flags::SYNC, &[], &[], nums);
    for (normal, zero) in batches {
        packet(&mut out, 0, normal, zero, nums);
    }
    packet(&mut out, Flags::SYNC, &[], &[], nums);
    out
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_destination_accepts_our_streams() {
    if !multifd_tests::require_tool("qemu-system-x86_64", "qemu_destination_accepts_our_streams") {
        return;
    }
    const CHANNELS: usize = 2;
    let size = 4usize << 20;
    let image = guest_image(7, size);
    // Poison in every page the image has non-zero; zero pages start zero, as QEMU assumes of a
    // fresh destination (it only clears a zero page it has received data for before).
    let poisoned: Vec<u8> =
        image.chunks(PAGE).flat_map(|p| if p.iter().all(|&b| b == 0) { [0u8; PAGE] } else { [0x5au8; PAGE] }).collect();
    let mut dest = QemuDest::start("wire-dest", size, &poisoned, CHANNELS as u8);
    let port = dest.port;

    // Pages: zero ones as zero offsets, others as data; 128 per packet, round-robin.
    let mut per_channel: Vec<Vec<(Vec<u64>, Vec<u64>)>> = vec![Vec::new(); CHANNELS];
    for (i, chunk) in image.chunks(128 * PAGE).enumerate() {
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        for (j, page) in chunk.chunks(PAGE).enumerate() {
            let off = ((i * 128 + j) * PAGE) as u64;
            if page.iter().all(|&b| b == 0) { zero.push(off) } else { normal.push(off) }
        }
        per_channel[i % CHANNELS].push((normal, zero));
    }
    let mut nums = 0;
    let channel_data: Vec<Vec<u8>> =
        (0..CHANNELS).map(|c| channel_bytes(c as u8, &per_channel[c], &image, &mut nums)).collect();

    let mut main = Vec::new();
    emit(&mut main, Record::FileHeader);
    emit(&mut main, Record::Configuration { machine: b"none" });
    emit(&mut main, Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 });
    emit(&mut main, Record::MemSize { total: size as u64 });
    emit(&mut main, Record::BlockEntry { name: b"m0", used_length: size as u64 });
    emit(&mut main, Record::MultifdFlush);
    emit(&mut main, Record::Eos);
    emit(&mut main, Record::Footer { section_id: 1 });
    emit(&mut main, Record::SectionPart { end: true, section_id: 1 });
    emit(&mut main, Record::MultifdFlush);
    emit(&mut main, Record::Eos);
    emit(&mut main, Record::Footer { section_id: 1 });
    emit(&mut main, Record::Eof);
    // A QEMU destination blocks reading this after EOF (unless its machine suppresses it).
    emit(&mut main, Record::VmDescription { json: br#"{"page_size": 4096, "devices": []}"# });

    let connect = || {
        let t0 = Instant::now();
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => return s,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect to the destination: {e}"),
            }
        }
    };
    let mut main_sock = connect();
    let senders: Vec<_> = channel_data
        .into_iter()
        .map(|data| {
            let mut s = connect();
            std::thread::spawn(move || s.write_all(&data).expect("send a channel"))
        })
        .collect();
    main_sock.write_all(&main).expect("send the main stream");
    for s in senders {
        s.join().unwrap();
    }

    let status = dest.wait_done(30);
    drop(main_sock);
    assert!(status.contains("\"completed\""), "destination did not complete: {status}");
    let got = dest.ram();
    let bad: Vec<usize> =
        (0..size / PAGE).filter(|&i| got[i * PAGE..(i + 1) * PAGE] != image[i * PAGE..(i + 1) * PAGE]).collect();
    assert!(
        bad.is_empty(),
        "destination RAM differs from the guest image in {} pages, first {:?}",
        bad.len(),
        bad.first()
    );
}
