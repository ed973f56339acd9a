//! Internal snapshot create, apply and delete by img, checked by qemu-img: every step leaves
//! an image `qemu-img check` finds clean (no errors, no leaks), each snapshot reads back (by
//! `qemu-img convert -l`) as the disk was when it was taken, and snapshots made by qemu-img
//! are applied and deleted by img the same way. A proptest mixes writes with the operations
//! against a model.

mod common;

use common::*;
use img_core::qcow2::Qcow2;
use img_core::{Image, OpenOptions};
use proptest::prelude::*;
use std::path::Path;

fn open_rw(path: &Path) -> Image {
    img_core::open_image(path, &OpenOptions::default()).expect("open read-write")
}

fn qcow2(image: &mut Image) -> &mut Qcow2 {
    img_core::qcow2::driver_of(image).expect("a qcow2 image")
}

fn create(path: &Path, name: &str) {
    let mut image = open_rw(path);
    qcow2(&mut image)
        .create_snapshot(name, (1_700_000_000, 5))
        .unwrap();
    image.close().unwrap();
}

fn apply(path: &Path, id_or_name: &str) {
    let mut image = open_rw(path);
    qcow2(&mut image).apply_snapshot(id_or_name).unwrap();
    image.close().unwrap();
}

fn delete(path: &Path, name: &str) {
    let mut image = open_rw(path);
    qcow2(&mut image).delete_snapshot(name).unwrap();
    image.close().unwrap();
}

/// The guest disk as qemu-img reads it (the active state, or a snapshot's).
fn disk(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("{}.raw", snapshot.unwrap_or("active")));
    let p = path.display().to_string();
    let o = out.display().to_string();
    let mut args = vec!["convert", "-O", "raw"];
    let sel;
    if let Some(s) = snapshot {
        sel = format!("snapshot.name={s}");
        args.extend(["-l", &sel]);
    }
    args.extend([p.as_str(), o.as_str()]);
    qemu_img(&args);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn write(path: &Path, seed: u8, off: u64, len: u64) {
    qemu_io("qcow2", path, &[format!("write -P {seed} {off} {len}")]);
}

#[test]
fn create_apply_delete_checked_by_qemu() {
    for cluster in ["65536", "4096", "512"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.qcow2");
        let opts = format!("cluster_size={cluster}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().unwrap(),
            "8M",
        ]);
        write(&img, 1, 0, 3 << 20);
        qemu_io(
            "qcow2",
            &img,
            &["write -c -P 7 4M 64k".into(), "write -z 1M 64k".into()],
        );
        let first = disk(&img, None);
        create(&img, "one");
        assert_qemu_check_clean(&img);
        assert_eq!(disk(&img, Some("one")), first, "{cluster}: snapshot one");

        // Writes after the snapshot copy instead of overwriting it.
        write(&img, 2, 100_000, 200_000);
        write(&img, 3, 4 << 20, 4096);
        assert_qemu_check_clean(&img);
        let second = disk(&img, None);
        assert_eq!(
            disk(&img, Some("one")),
            first,
            "{cluster}: one after writes"
        );
        create(&img, "two");
        write(&img, 4, 2 << 20, 2 << 20);
        assert_qemu_check_clean(&img);

        // qemu-img lists both, with the IDs img gave them.
        let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        assert!(
            list.contains("1         one") || list.contains("1       one"),
            "{list}"
        );
        assert!(list.contains("two"), "{list}");

        apply(&img, "one");
        assert_qemu_check_clean(&img);
        assert_eq!(disk(&img, None), first, "{cluster}: applied one");
        apply(&img, "2");
        assert_qemu_check_clean(&img);
        assert_eq!(disk(&img, None), second, "{cluster}: applied two by ID");

        delete(&img, "one");
        assert_qemu_check_clean(&img);
        assert_eq!(disk(&img, Some("two")), second);
        assert_eq!(disk(&img, None), second);
        delete(&img, "two");
        assert_qemu_check_clean(&img);
        assert_eq!(disk(&img, None), second);
        let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        assert!(list.is_empty(), "{list}");
    }
}

#[test]
fn snapshots_made_by_qemu_are_applied_and_deleted_by_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
    write(&img, 1, 0, 1 << 20);
    let a = disk(&img, None);
    qemu_img(&["snapshot", "-c", "a", p]);
    write(&img, 2, 512 << 10, 1 << 20);
    let b = disk(&img, None);
    qemu_img(&["snapshot", "-c", "b", p]);
    write(&img, 3, 0, 4 << 20);
    apply(&img, "a");
    assert_qemu_check_clean(&img);
    assert_eq!(disk(&img, None), a);
    delete(&img, "a");
    assert_qemu_check_clean(&img);
    assert_eq!(disk(&img, Some("b")), b);
    // And qemu-img applies what img left.
    qemu_img(&["snapshot", "-a", "b", p]);
    assert_qemu_check_clean(&img);
    assert_eq!(disk(&img, None), b);
    // Errors name what was asked for.
    let mut image = open_rw(&img);
    let e = qcow2(&mut image).delete_snapshot("a").unwrap_err();
    assert!(matches!(e, img_core::Error::SnapshotNotFound { .. }), "{e}");
    let e = qcow2(&mut image).apply_snapshot("zz").unwrap_err();
    assert!(matches!(e, img_core::Error::SnapshotNotFound { .. }), "{e}");
}

#[test]
fn a_snapshot_of_a_different_size_applies_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
    write(&img, 1, 0, 4 << 20);
    create(&img, "small");
    qemu_img(&["resize", p, "16M"]);
    write(&img, 2, 10 << 20, 1 << 20);
    apply(&img, "small");
    assert_qemu_check_clean(&img);
    let info = qemu_img(&["info", p]);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
}

#[derive(Clone, Debug)]
enum Step {
    Write(u8, u64, u64),
    Create,
    Apply(usize),
    Delete(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u8..250, 0u64..(2 << 20), 1u64..200_000).prop_map(|(s, o, l)| Step::Write(s, o, l)),
        2 => Just(Step::Create),
        1 => (0usize..8).prop_map(Step::Apply),
        1 => (0usize..8).prop_map(Step::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Writes mixed with snapshot operations, against a model of the disk and of each
    /// snapshot; qemu-img checks the image after every operation.
    #[test]
    fn snapshots_follow_a_model(steps in prop::collection::vec(step(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("m.qcow2");
        let size = 2u64 << 20;
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img.to_str().unwrap(), "2M"]);
        let mut model = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut counter = 0;
        for s in steps {
            match s {
                Step::Write(seed, off, len) => {
                    let len = len.min(size - off);
                    write(&img, seed, off, len);
                    model[off as usize..(off + len) as usize].fill(seed);
                }
                Step::Create => {
                    counter += 1;
                    let name = format!("s{counter}");
                    create(&img, &name);
                    snaps.push((name, model.clone()));
                }
                Step::Apply(i) if !snaps.is_empty() => {
                    let (name, data) = &snaps[i % snaps.len()];
                    apply(&img, name);
                    model = data.clone();
                }
                Step::Delete(i) if !snaps.is_empty() => {
                    let (name, _) = snaps.remove(i % snaps.len());
                    delete(&img, &name);
                }
                _ => continue,
            }
            assert_qemu_check_clean(&img);
        }
        prop_assert!(disk(&img, None) == model, "active disk");
        for (name, data) in &snaps {
            prop_assert!(&disk(&img, Some(name)) == data, "snapshot {}", name);
        }
    }
}

/// Runs QEMU's monitor commands against `image` in a machine without devices (the project's
/// scripts/qemu-system.sh unpacks QEMU 7.2 on first use); returns what the monitor printed.
fn monitor(image: &Path, commands: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-system.sh");
    let drive = format!("if=none,id=d0,file={},format=qcow2", image.display());
    let mut child = std::process::Command::new(script)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-S",
        ])
        .args(["-drive", &drive, "-monitor", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/qemu-system.sh");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{commands}\nquit\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "qemu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A snapshot holding VM state saved by QEMU (`savevm`) is kept whole by img's operations on
/// other snapshots and by applying it: QEMU loads its state afterwards (`loadvm` checks the
/// whole state stream), and the disk reads as when it was saved.
#[test]
fn vm_state_saved_by_qemu_survives_img_operations() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"]);
    write(&img, 1, 0, 3 << 20);
    let at_save = disk(&img, None);
    let out = monitor(&img, "savevm vm1");
    assert!(!out.contains("Error"), "savevm: {out}");
    let list = qemu_img(&["snapshot", "-l", p]);
    assert!(
        list.contains("vm1") && !list.contains("   0 B"),
        "a VM state was saved: {list}"
    );

    write(&img, 2, 1 << 20, 4 << 20);
    create(&img, "plain");
    write(&img, 3, 0, 64 << 10);
    apply(&img, "plain");
    delete(&img, "plain");
    assert_qemu_check_clean(&img);
    let out = monitor(&img, "loadvm vm1");
    assert!(
        !out.contains("Error"),
        "loadvm after img's operations: {out}"
    );

    // Applying the VM-state snapshot itself.
    write(&img, 4, 8 << 20, 1 << 20);
    apply(&img, "vm1");
    assert_qemu_check_clean(&img);
    assert_eq!(disk(&img, None), at_save);
    let out = monitor(&img, "loadvm vm1");
    assert!(!out.contains("Error"), "loadvm after img applied it: {out}");
    let list = qemu_img(&["snapshot", "-l", p]);
    assert!(list.contains("vm1"), "{list}");
}
