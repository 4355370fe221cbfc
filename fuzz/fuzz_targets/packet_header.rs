//! Packet headers: decode (both layouts, several page sizes) and page checks never panic; every
//! accepted RAM header keeps its counts within page_count and re-encodes to an equal header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::wire::{BlockInfo, CommonHeader, Geometry, Layout, Packet, PacketConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else { return };
    let page_size = [1024u32, 4096, 16384, 65536][usize::from(sel & 3)];
    let geo = Geometry::new(page_size).expect("valid page size");
    let layout = if sel & 4 != 0 { Layout::V7_2 } else { Layout::V9_0 };
    let cfg = PacketConfig { layout, ..PacketConfig::new(geo) };
    if let Ok(c) = CommonHeader::decode(data) {
        assert!(c.header_len(geo) >= 12);
    }
    match Packet::decode(data, &cfg) {
        Ok(Packet::Ram(p)) => {
            let h = *p.header();
            assert!(h.pages_alloc <= geo.page_count());
            assert!(u64::from(h.normal_pages) + u64::from(h.zero_pages) <= u64::from(h.pages_alloc));
            let used = u64::from(sel) << 16;
            let lookup = |_: &[u8]| Some(BlockInfo { used_length: used, page_size: geo });
            if let Ok(Some(info)) = p.check_pages(&lookup) {
                for off in p.normal_offsets().chain(p.zero_offsets()) {
                    assert!(off % u64::from(page_size) == 0 && off + u64::from(page_size) <= info.used_length);
                }
            }
            let offs: Vec<u64> = p.normal_offsets().chain(p.zero_offsets()).collect();
            let mut out = vec![0u8; geo.header_len()];
            h.encode(&offs, geo, layout, &mut out).expect("re-encode");
            let Ok(Packet::Ram(q)) = Packet::decode(&out, &cfg) else { panic!("re-decode") };
            assert_eq!(*q.header(), h);
        }
        Ok(Packet::DeviceState(d)) => assert!(d.next_packet_size > 0),
        Err(_) => {}
    }
});
