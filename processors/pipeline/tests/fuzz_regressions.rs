//! Every saved fuzz crash (`fuzz/regressions/<target>/*`) replayed through the same code as its
//! fuzz target (`fuzz/shared/<target>.rs`), without libFuzzer or sanitizers: a few milliseconds, so
//! `cargo test` and `scripts/fuzz --regressions` catch a regression at once. A crash that comes
//! back (panic, abort, stack overflow) fails this test binary.

use std::path::{Path, PathBuf};

mod decode_framed {
    include!("../../../fuzz/shared/decode_framed.rs");
}

mod topology {
    include!("../../../fuzz/shared/topology.rs");
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions").join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// On a thread with the main thread's usual 8 MiB stack, as under libFuzzer.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let files = inputs(target);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let name = f.display().to_string();
        let r = std::thread::Builder::new().stack_size(8 << 20).spawn(move || run(&bytes)).unwrap().join();
        assert!(r.is_ok(), "fuzz regression {name} crashes again");
    }
    files.len()
}

#[test]
fn saved_decode_framed_crashes_stay_fixed() {
    let n = replay("decode_framed", decode_framed::run_one);
    assert!(n >= 1, "fuzz/regressions/decode_framed holds the saved crashes (found {n})");
}

#[test]
fn saved_topology_crashes_stay_fixed() {
    replay("topology", topology::run_one);
}
