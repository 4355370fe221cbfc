//! `multifd demo`'s work directory under `TMPDIR`. The test changes `TMPDIR` for the whole process,
//! so it is the only test of this binary.

use multifd_std::demo::{DemoOptions, run};
use multifd_tests::qemu::temp_dir;

/// Someone who can write to `TMPDIR` plants `multifd-demo-<pid>` as a symbolic link to a directory
/// of theirs before the demo runs. The demo must not follow it: its port file and block files must
/// not land in that directory (the old code took that fixed name and `create_dir_all` accepted the
/// link), and it must leave nothing of its own behind in `TMPDIR`.
#[test]
#[cfg_attr(miri, ignore = "runs sockets and threads")]
fn demo_does_not_follow_a_planted_link_in_tmpdir() {
    let root = temp_dir("demo-tmpdir");
    let (tmp, theirs) = (root.join("tmp"), root.join("theirs"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    let planted = tmp.join(format!("multifd-demo-{}", std::process::id()));
    std::os::unix::fs::symlink(&theirs, &planted).unwrap();
    // SAFETY: this is the only test of its binary and starts no thread before this call, so no other
    // thread of the process reads or writes the environment while it changes.
    unsafe { std::env::set_var("TMPDIR", &tmp) };
    assert_eq!(std::env::temp_dir(), tmp, "TMPDIR is in effect");

    let opts = DemoOptions {
        size: 4 << 20,
        channels: 2,
        rounds: 2,
        zero_percent: 40,
        seed: 3,
        json: true,
        compression: Default::default(),
    };
    let report = run(&opts);
    let listing = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(listing(&theirs), Vec::<String>::new(), "the demo wrote into the planted link's target");
    assert!(report.is_ok(), "the demo failed: {:?}", report.err());
    let planted_name = planted.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(listing(&tmp), vec![planted_name], "the demo left its work directory behind");
    assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink(), "the planted link was replaced");
    let _ = std::fs::remove_dir_all(root);
}
