//! `GuestImage`: the source's guest memory, from a heap buffer or a private mapping of an image file
//! (`multifd send --image`).

use multifd_std::send::{GuestImage, ImageSet};

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("multifd-guest-image-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn a_mapped_file_reads_as_its_contents_at_every_page() {
    let bytes: Vec<u8> = (0..5 * 4096u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let path = temp_file("pages", &bytes);
    let mut img = GuestImage::map_file(&path).unwrap();
    assert_eq!(img.len(), bytes.len());
    for page in 0..5 {
        assert_eq!(img.read(page * 4096, 4096), &bytes[page * 4096..(page + 1) * 4096], "page {page}");
    }
    assert_eq!(img.as_bytes(), &bytes[..]);
    drop(img);
    let _ = std::fs::remove_file(path);
}

#[test]
fn image_set_maps_each_spec_and_names_blocks() {
    let a = temp_file("a.img", &[1u8; 8192]);
    let b = temp_file("b.img", &[2u8; 4096]);
    let set = ImageSet::load(&[format!("{}:m0", a.display()), b.display().to_string()]).unwrap();
    assert_eq!(set.blocks.len(), 2);
    assert_eq!(set.blocks[0].0, "m0");
    assert_eq!(set.blocks[1].0, b.file_stem().unwrap().to_string_lossy());
    assert_eq!(set.blocks[0].1.read(4096, 4096), &[1u8; 4096][..]);
    assert_eq!(set.blocks[1].1.read(0, 4096), &[2u8; 4096][..]);
    let _ = (std::fs::remove_file(a), std::fs::remove_file(b));
}

#[test]
fn an_empty_file_is_an_empty_image_and_a_missing_one_an_error() {
    let p = temp_file("empty", &[]);
    let img = GuestImage::map_file(&p).unwrap();
    assert!(img.is_empty());
    let _ = std::fs::remove_file(&p);
    let err = ImageSet::load(&[p.display().to_string()]).unwrap_err().to_string();
    assert!(err.contains(&p.display().to_string()), "error does not name the file: {err}");
}

#[test]
#[should_panic(expected = "outside its")]
fn a_read_past_the_end_panics_instead_of_reading_outside() {
    let img = GuestImage::new(vec![0u8; 4096]);
    let _ = img.read(4096, 1);
}

/// Resident bytes of the mapping that starts at `addr`, from `/proc/self/smaps`.
fn mapping_rss(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let head = format!("{addr:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    assert!(lines.next().is_some(), "no mapping at {addr:#x}");
    let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
    rss.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_mapped_file_is_resident_before_the_migration_starts() {
    // Populated when mapped, as a running guest's memory is: channels take no page fault per page
    // while sending. Without populating, nothing of the mapping is resident until it is read.
    let len = 8 << 20;
    let bytes: Vec<u8> = (0..len).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    let path = temp_file("populated", &bytes);
    let mut img = GuestImage::map_file(&path).unwrap();
    let rss = mapping_rss(img.as_bytes().as_ptr() as usize);
    assert_eq!(rss, len as u64, "resident bytes of the 8 MiB image mapping");
    assert_eq!(img.as_bytes(), &bytes[..]);
    drop(img);
    let _ = std::fs::remove_file(path);
}
