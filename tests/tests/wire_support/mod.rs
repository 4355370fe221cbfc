//! Shared by the wire tests: the deterministic guest image and capture loading.
#![allow(dead_code, unreachable_pub)]

use std::io::Read;
use std::path::{Path, PathBuf};

pub const PAGE: usize = 4096;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The guest RAM image of tests/fixtures/capture.py (same algorithm): per page 45% zero,
/// 50% a repeated 64-byte pattern, 5% random.
pub fn guest_image(seed: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut st = seed;
    for _ in 0..size / PAGE {
        let kind = splitmix(&mut st) % 100;
        if kind < 45 {
            out.extend_from_slice(&[0u8; PAGE]);
        } else if kind < 95 {
            let mut pat = Vec::with_capacity(64);
            for _ in 0..8 {
                pat.extend_from_slice(&splitmix(&mut st).to_le_bytes());
            }
            for _ in 0..64 {
                out.extend_from_slice(&pat);
            }
        } else {
            for _ in 0..512 {
                out.extend_from_slice(&splitmix(&mut st).to_le_bytes());
            }
        }
    }
    out
}

pub fn fixtures() -> PathBuf {
    multifd_tests::workspace_root().join("tests/fixtures/captures")
}

/// Reads a `.gz` fixture.
pub fn gunzip(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f).read_to_end(&mut out).expect("valid gzip");
    out
}

/// One captured migration: info.txt fields, the main stream, the channels by id.
pub struct Capture {
    pub qemu: String,
    pub zpd: String,
    pub seed: u64,
    pub mib: usize,
    pub main: Vec<u8>,
    pub channels: Vec<Vec<u8>>,
}

pub fn load(name: &str) -> Capture {
    let dir = fixtures().join(name);
    let info = std::fs::read_to_string(dir.join("info.txt")).expect("info.txt");
    let field = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("{k} in info.txt"))
            .to_string()
    };
    let n: usize = field("channels").parse().unwrap();
    Capture {
        qemu: field("qemu"),
        zpd: field("zpd"),
        seed: field("seed").parse().unwrap(),
        mib: field("mib").parse().unwrap(),
        main: gunzip(&dir.join("main.bin.gz")),
        channels: (0..n).map(|i| gunzip(&dir.join(format!("ch{i}.bin.gz")))).collect(),
    }
}
