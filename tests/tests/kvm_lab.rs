//! The KVM lab: `scripts/kvm-lab.sh` boots a Linux L1 guest under QEMU 7.2 TCG with an emulated
//! AMD CPU (SVM, nested paging), where kvm-amd gives a real `/dev/kvm`, and runs host binaries
//! there, chrooted into the host's root shared over 9p. These tests check the lab itself: that
//! an L2 Linux guest boots under KVM inside L1 (`check`), that `run` hands back the command's
//! output, exit status and files, and that an L1 without KVM fails the lab instead of passing.
//! The script fetches what it needs (QEMU, kernel, busybox) into /var/cache/img-lab.
//! One L1 boot takes about 4 s here, `check` about 20 s.
//!
//! `scripts/vmm-lab.sh` runs in the same lab: Debian's kernel on our own `vmm`, with disks on
//! virtio-blk and virtio-scsi, a CD-ROM, and QMP (see that script for its cases).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// One L1 at a time: TCG guests are CPU-bound and the machine has few cores (the script also
/// serialises its runs with a lock; this keeps the tests from waiting on each other's timeouts).
static ONE_L1: Mutex<()> = Mutex::new(());

/// The status `kvm-lab.sh` exits with when the lab itself failed.
const LAB_FAILURE: i32 = 125;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("scripts/kvm-lab.sh")
}

/// Runs the lab script with `args` and extra environment; prints and returns its output.
fn kvm_lab(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_script(&script(), args, env)
}

/// Runs `script` (one of the lab's) with `args` and extra environment, one L1 at a time.
fn run_script(script: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let _guard = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    println!("status: {:?}", out.status);
    println!("stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    println!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Removes the work dir the script kept after a failure it was made to have.
fn remove_kept_work_dir(stderr: &str) {
    for line in stderr.lines() {
        if let Some(dir) = line.strip_prefix("kvm-lab: work dir kept: ") {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn kvm_lab_check_boots_an_l2_guest_under_kvm() {
    let out = kvm_lab(&["check"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kvm-lab.sh check failed:\n{stdout}\n{stderr}"
    );
    // Not only the exit status: both checks must have reported from inside L1.
    assert!(
        stdout.contains("KVM-LAB-IOCTLS KVM_GET_API_VERSION=12 KVM_CREATE_VM fd="),
        "no KVM ioctl report from L1:\n{stdout}"
    );
    assert!(
        stdout.contains("KVM-LAB-L2 booted: "),
        "no L2 boot report from L1:\n{stdout}"
    );
    assert!(
        stderr.contains("kvm-lab: check passed"),
        "no pass line:\n{stderr}"
    );
}

/// `run` gives back the command's stdout, stderr and exit status separately, runs it in the
/// caller's working directory with /dev/kvm, and what it writes to a `--share`d directory
/// lands on the host.
#[test]
fn kvm_lab_run_returns_output_status_and_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "from the host\n").unwrap();
    let d = dir.path().to_str().unwrap();
    let cmd = format!(
        "test -c /dev/kvm || exit 3; \
         cat {d}/in.txt; echo to-stderr >&2; pwd; \
         echo from L1 > {d}/out.txt; exit 7"
    );
    let out = kvm_lab(&["run", "--share", d, "--", "sh", "-c", &cmd], &[]);
    assert_eq!(out.status.code(), Some(7), "the command's exit status");
    let here = std::env::current_dir().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("from the host\n{}\n", here.display())
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("to-stderr\n"), "CMD's stderr:\n{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("kvm-lab:"),
        "the lab's own lines belong on stderr"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "from L1\n"
    );
}

/// An L1 whose CPU lacks SVM has no /dev/kvm: the lab must say so and fail with its own
/// status, not run the command.
#[test]
fn kvm_lab_fails_without_kvm() {
    let out = kvm_lab(&["run", "--", "true"], &[("KVM_LAB_L1_CPU", "qemu64,-svm")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    remove_kept_work_dir(&stderr);
    assert_eq!(
        out.status.code(),
        Some(LAB_FAILURE),
        "the lab passed without KVM:\n{stderr}"
    );
    assert!(
        stderr.contains("no /dev/kvm"),
        "the lab failed, but not for the missing /dev/kvm:\n{stderr}"
    );
}

/// Our own VMM boots Debian's kernel under the lab's real KVM: PVH and bzImage, one and two
/// vCPUs, power-off and reset, a qcow2 virtio-blk disk written and checked (on a file, and on an
/// iSCSI LUN that tgtd serves inside the lab), and the `qmp` case
/// (virtio-blk and virtio-scsi disks, a CD-ROM whose medium changes, stop/cont and the power
/// button over QMP, both images clean by `qemu-img check` afterwards).
#[test]
fn vmm_lab_boots_debian_with_disks_and_qmp() {
    let script = script().with_file_name("vmm-lab.sh");
    let out = run_script(&script, &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmm-lab.sh failed:\n{stderr}");
    for case in [
        "ok   poweroff",
        "ok   smp2",
        "ok   bzimage",
        "ok   reboot",
        "ok   reset",
        "ok   qemu",
        "ok   disk image",
        "ok   iscsi image",
        "ok   qmp",
    ] {
        assert!(stderr.contains(case), "no '{case}' line:\n{stderr}");
    }
}
