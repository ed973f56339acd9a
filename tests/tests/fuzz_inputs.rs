//! The fuzz targets on the inputs that matter outside a fuzzing run.
//!
//! - Every input a fuzzer once crashed, hung or ran out of memory on is kept under
//!   `fuzz/regressions/TARGET/` and replayed here: each must now pass (return, without a
//!   panic) on stable Rust, without a fuzzer.
//! - The seeds `scripts/fuzz.sh seeds` makes with qemu-img, qemu-io and qemu-nbd are replayed
//!   too, and each must get past opening and read data: a target that refused well-formed
//!   images would fuzz nothing but its first error path.

mod common;

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target(name: &str) -> fuzz_harness::Target {
    fuzz_harness::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
        .1
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn saved_crashing_inputs_pass() {
    let root = repo().join("fuzz/regressions");
    let mut replayed = 0;
    for dir in files(&root) {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let run = target(&name);
        for input in files(&dir) {
            let data = std::fs::read(&input).unwrap();
            eprintln!("replaying {}", input.display());
            run(&data);
            replayed += 1;
        }
    }
    eprintln!("{replayed} saved inputs replayed");
}

#[test]
fn seeds_made_by_qemu_reach_the_code_under_test() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(repo().join("scripts/fuzz.sh"))
        .arg("seeds")
        .env("FUZZ_CORPUS", dir.path())
        .env("IMG_BIN", common::img_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/fuzz.sh seeds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = Vec::new();
    for (name, run) in fuzz_harness::TARGETS {
        let seeds = files(&dir.path().join(name));
        assert!(seeds.len() >= 5, "{name}: only {} seeds", seeds.len());
        for seed in &seeds {
            let file = seed.file_name().unwrap().to_str().unwrap();
            let reached = run(&std::fs::read(seed).unwrap());
            if file.starts_with("descriptor-") || file.starts_with("refused-") {
                // Descriptors' extent files are not where the target opens them; refused-*
                // are images of features img does not read (their names say which).
                assert!(!reached.opened, "{name}/{file} opened");
                continue;
            }
            assert!(reached.opened, "{name}: seed {file} was not opened");
            assert!(
                reached.bytes_read > 0,
                "{name}: nothing read from seed {file}"
            );
        }
        counts.push(format!("{name}: {}", seeds.len()));
    }
    eprintln!("seeds: {}", counts.join(", "));
}
