//! Init packet: decode never panics; whatever decodes re-encodes to the same 28 meaningful bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::wire::InitPacket;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = InitPacket::decode(data) {
        let _ = p.validate(data.len() as u8, None);
        let mut out = [0u8; 64];
        assert_eq!(p.encode(&mut out), Ok(64));
        assert_eq!(out[..25], data[..25]);
        assert_eq!(InitPacket::decode(&out), Ok(p));
    }
});
