//! The `vmm` binary end to end: synthetic kernels (an ELF with a PVH note, an ELF without one,
//! a bzImage) whose code prints the command line and the initrd's first byte on COM1 and powers
//! off through ACPI, run on the host's /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const LOAD: u64 = 0x10_0000;

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipped: /dev/kvm is absent");
        false
    }
}

/// Runs vmm; kills it after two minutes so that a guest that never stops fails the test
/// instead of hanging it.
fn vmm(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..1200 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            // SAFETY: `id` is our child, not yet reaped (wait_with_output has not returned).
            unsafe { libc::kill(id, libc::SIGKILL) };
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    out
}

/// Powers off: SLP_TYP=5|SLP_EN to PM1a_CNT (the same bytes in 32- and 64-bit code).
const POWEROFF: &[u8] = &[
    0xba, 0x04, 0x06, 0x00, 0x00, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xf4,
];

/// 32-bit PVH entry: `ebx` = hvm_start_info. Prints the command line (cmdline_paddr at +24),
/// the first byte of module 0 (modlist_paddr at +16) and a newline.
fn pvh_code() -> Vec<u8> {
    let mut c = vec![
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0x8b, 0x73, 0x18, // mov esi, [ebx+24]
        0x8a, 0x06, 0x84, 0xc0, 0x74, 0x04, 0xee, 0x46, 0xeb, 0xf6, // print the string at esi
        0x8b, 0x7b, 0x10, // mov edi, [ebx+16]
        0x8b, 0x3f, // mov edi, [edi]
        0x8a, 0x07, 0xee, // mov al, [edi]; out dx, al
        0xb0, b'\n', 0xee,
    ];
    c.extend_from_slice(POWEROFF);
    c
}

/// 64-bit entry: `rsi` = the zero page. Prints the command line (cmd_line_ptr at 0x228), the
/// first byte of the initrd (ramdisk_image at 0x218) and a newline.
fn zero_page_code() -> Vec<u8> {
    let mut c = vec![
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0x8b, 0xbe, 0x18, 0x02, 0x00, 0x00, // mov edi, [rsi+0x218]
        0x8b, 0xb6, 0x28, 0x02, 0x00, 0x00, // mov esi, [rsi+0x228]
        0x8a, 0x06, 0x84, 0xc0, 0x74, 0x06, 0xee, 0x48, 0xff, 0xc6, 0xeb,
        0xf4, // print [rsi..]
        0x8a, 0x07, 0xee, // mov al, [rdi]; out dx, al
        0xb0, b'\n', 0xee,
    ];
    c.extend_from_slice(POWEROFF);
    c
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at 1 MiB, and (if `pvh`) a PT_NOTE with
/// XEN_ELFNOTE_PHYS32_ENTRY pointing at it.
fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &(if pvh { 2u16 } else { 1 }).to_le_bytes());
    let phdr = |p_type: u32, off: u64, addr: u64, len: u64| {
        let mut h = Vec::new();
        h.extend_from_slice(&p_type.to_le_bytes());
        h.extend_from_slice(&5u32.to_le_bytes());
        for v in [off, addr, addr, len, len, 0x1000] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    };
    put(&mut f, 64, &phdr(1, 0x1000, LOAD, code.len() as u64));
    if pvh {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(LOAD as u32).to_le_bytes());
        put(&mut f, 120, &phdr(4, 0x200, 0, note.len() as u64));
        put(&mut f, 0x200, &note);
    }
    f.extend_from_slice(code);
    f
}

/// A minimal bzImage (boot protocol 2.12): one setup sector, then the protected-mode part,
/// whose 64-bit entry is at +0x200.
fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    put(&mut f, 0x1f1, &[1]); // setup_sects
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x020cu16.to_le_bytes());
    put(&mut f, 0x211, &[1]); // LOADED_HIGH
    put(&mut f, 0x214, &(LOAD as u32).to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut f, 0x236, &1u16.to_le_bytes()); // XLF_KERNEL_64
    put(&mut f, 0x238, &0x7ffu32.to_le_bytes()); // cmdline_size
    f.extend_from_slice(&[0u8; 0x200]);
    f.extend_from_slice(code);
    f
}

struct Files {
    dir: tempfile::TempDir,
}
impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn write(&self, name: &str, data: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn boot(kernel: &[u8], extra: &[&str]) -> (Output, String) {
    let f = Files::new();
    let k = f.write("kernel", kernel);
    let rd = f.write("initrd", b"Zinitrd");
    let mut args = vec![
        "-m",
        "64",
        "-kernel",
        &k,
        "-initrd",
        &rd,
        "-append",
        "hello world",
    ];
    args.extend_from_slice(extra);
    let out = vmm(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

#[test]
fn pvh_elf_boots_with_cmdline_and_initrd() {
    if !kvm_available() {
        return;
    }
    let (out, stdout) = boot(&elf(&pvh_code(), true), &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "hello worldZ\n");
}

#[test]
fn elf_without_pvh_note_boots_through_the_zero_page() {
    if !kvm_available() {
        return;
    }
    let (out, stdout) = boot(&elf(&zero_page_code(), false), &["-smp", "2"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "hello worldZ\n");
}

#[test]
fn bzimage_boots_through_the_64_bit_entry() {
    if !kvm_available() {
        return;
    }
    let (out, stdout) = boot(&bzimage(&zero_page_code()), &["-m", "1G"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "hello worldZ\n");
}

#[test]
fn serial_to_a_file_and_daemonize_with_a_pidfile() {
    if !kvm_available() {
        return;
    }
    let f = Files::new();
    let k = f.write("kernel", &elf(&pvh_code(), true));
    let rd = f.write("initrd", b"Q");
    let console = f.path("console");
    let pid = f.path("pid");
    let serial = format!("file:{}", console.display());
    let out = vmm(&[
        "-kernel",
        &k,
        "-initrd",
        &rd,
        "-append",
        "daemon",
        "-serial",
        &serial,
        "-daemonize",
        "-pidfile",
        pid.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    // The daemon powers off right away and removes its pid file on the way out.
    let mut waited = 0;
    while pid.exists() && waited < 6000 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    assert!(!pid.exists(), "the daemon did not exit");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "daemonQ\n");
}

#[test]
fn daemonize_reports_setup_errors_from_the_child() {
    let f = Files::new();
    let k = f.write("kernel", b"not a kernel");
    let out = vmm(&["-kernel", &k, "-daemonize"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an ELF vmlinux or a bzImage"), "{err}");
}

#[test]
fn usage_errors() {
    for (args, msg) in [
        (&[][..], "-kernel is required"),
        (&["-kernel", "k", "-bogus"][..], "-bogus: invalid option"),
        (&["-kernel", "k", "-m", "12Q"][..], "Parameter 'size'"),
        (&["-kernel", "k", "-smp", "0"][..], "Invalid SMP CPUs 0"),
        (
            &["-kernel", "k", "-serial", "pty"][..],
            "unsupported character device",
        ),
        (
            &["-kernel", "k", "-serial", "stdio", "-daemonize"][..],
            "incompatible with -daemonize",
        ),
        (&["-kernel"][..], "requires an argument"),
        (
            &["-kernel", "/nonexistent/kernel"][..],
            "/nonexistent/kernel: No such file",
        ),
    ] {
        let out = vmm(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("vmm: ") && err.contains(msg),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let f = Files::new();
    // A guest that never stops: jmp $.
    let k = f.write("kernel", &elf(&[0xeb, 0xfe], true));
    let pid = f.path("pid");
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "-kernel",
            &k,
            "-serial",
            "none",
            "-pidfile",
            pid.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The pid file appears once the machine is built.
    let mut waited = 0;
    while !pid.exists() && waited < 6000 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    let id: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(id as u32, child.id());
    // SAFETY: signalling our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(id, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmm: terminating on signal 15"), "{err}");
    assert!(!pid.exists());
}

/// A QMP client for the tests: commands answered in order, events kept aside.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects (retrying while the socket is not there yet) and negotiates capabilities.
    fn connect(path: &Path) -> Self {
        let mut tries = 0;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if tries < 600 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("connecting to {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read().expect("greeting");
        assert!(greeting["QMP"]["version"]["qemu"].is_object(), "{greeting}");
        q.ok("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn read(&mut self) -> Option<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    /// Runs `cmd`; the whole answer (`return` or `error`).
    fn cmd(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let r = self
                .read()
                .unwrap_or_else(|| panic!("{cmd}: connection closed"));
            if r.get("event").is_some() {
                self.events.push(r);
            } else {
                return r;
            }
        }
    }

    /// Runs `cmd`, which must succeed; its `return`.
    fn ok(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.cmd(cmd, args);
        assert!(r.get("return").is_some(), "{cmd}: {r}");
        r["return"].clone()
    }

    /// The next event called `name` (waiting for it).
    fn event(&mut self, name: &str) -> serde_json::Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let e = self
                .read()
                .unwrap_or_else(|| panic!("connection closed before {name}"));
            self.events.push(e);
        }
    }
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

/// The disks of the command line as QMP sees them: a virtio-blk disk, a virtio-scsi disk
/// served by an -object iothread and a CD-ROM whose medium is ejected and changed, with
/// QEMU's answers and events; the images are locked against other writers while the guest
/// runs, and clean after it.
#[test]
fn drives_devices_and_qmp_block_commands() {
    if !kvm_available() {
        return;
    }
    let f = Files::new();
    let k = f.write("kernel", &elf(&[0xeb, 0xfe], true)); // jmp $
    for (name, size) in [("blk.qcow2", "16M"), ("scsi.qcow2", "32M")] {
        let p = f.path(name);
        let out = qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size]);
        assert!(out.status.success(), "{out:?}");
    }
    let cd_a = f.write("a.iso", &vec![0xa5; 1 << 20]);
    let cd_b = f.write("b.iso", &vec![0x5a; 2 << 20]);
    let (blk, scsi, sock) = (
        f.path("blk.qcow2"),
        f.path("scsi.qcow2"),
        f.path("qmp.sock"),
    );
    let drive = |p: &Path, rest: &str| format!("file={},{rest}", p.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["-kernel", &k, "-serial", "none"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .args([
            "-drive",
            &drive(&blk, "format=qcow2,if=virtio,cache=none,l2-cache-size=1M"),
        ])
        .args(["-object", "iothread,id=io0"])
        .args(["-device", "virtio-scsi-pci,id=scsi0,iothread=io0"])
        .args([
            "-drive",
            &drive(&scsi, "format=qcow2,if=none,id=disk1,discard=unmap"),
        ])
        .args(["-device", "scsi-hd,drive=disk1,bus=scsi0.0,id=hd1"])
        .args([
            "-drive",
            &format!("file={cd_a},format=raw,if=none,id=cd0,media=cdrom"),
        ])
        .args(["-device", "scsi-cd,drive=cd0,id=cd"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut q = Qmp::connect(&sock);

    let blocks = q.ok("query-block", serde_json::json!({}));
    let by = |dev: &str| {
        blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == dev)
            .unwrap_or_else(|| panic!("{dev} not in {blocks}"))
            .clone()
    };
    assert_eq!(by("virtio0")["inserted"]["drv"], "qcow2");
    assert_eq!(by("virtio0")["removable"], false);
    assert_eq!(
        by("virtio0")["inserted"]["cache"],
        serde_json::json!({"writeback": true, "direct": true, "no-flush": false}),
        "cache=none"
    );
    assert_eq!(by("disk1")["inserted"]["drv"], "qcow2");
    assert_eq!(by("disk1")["qdev"], "hd1");
    assert_eq!(by("cd0")["inserted"]["file"], cd_a.as_str());
    assert_eq!(
        (
            by("cd0")["removable"].clone(),
            by("cd0")["tray_open"].clone()
        ),
        (serde_json::json!(true), serde_json::json!(false))
    );

    // Another writer is refused while the guest has the disks.
    for p in [&blk, &scsi] {
        let out = Command::new("qemu-io")
            .args(["-c", "write 0 512", p.to_str().unwrap()])
            .output()
            .unwrap();
        let msg = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
        assert!(msg.contains("lock"), "qemu-io wrote a disk in use: {msg}");
    }

    // A disk is not removable; the CD's tray opens, and a new medium closes it again.
    let r = q.cmd("eject", serde_json::json!({"device": "disk1"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    q.ok("eject", serde_json::json!({"id": "cd"}));
    assert_eq!(q.event("DEVICE_TRAY_MOVED")["data"]["tray-open"], true);
    q.ok(
        "blockdev-change-medium",
        serde_json::json!({"id": "cd", "filename": cd_b, "format": "raw"}),
    );
    assert_eq!(q.event("DEVICE_TRAY_MOVED")["data"]["tray-open"], false);
    let blocks = q.ok("query-block", serde_json::json!({}));
    let cd = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "cd0");
    assert_eq!(cd.unwrap()["inserted"]["file"], cd_b.as_str());
    let r = q.cmd("eject", serde_json::json!({"device": "nope"}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    // An internal snapshot of a running qcow2 disk; the raw CD cannot have one.
    q.ok(
        "blockdev-snapshot-internal-sync",
        serde_json::json!({"device": "virtio0", "name": "before-boot"}),
    );
    let r = q.cmd(
        "blockdev-snapshot-internal-sync",
        serde_json::json!({"device": "cd0", "name": "x"}),
    );
    assert!(r.get("error").is_some(), "{r}");

    // The machine commands: stop and cont (with their events), query-kvm, and quit, whose
    // answer arrives before the process exits.
    let status = q.ok("query-status", serde_json::json!({}));
    assert_eq!(
        status,
        serde_json::json!({"status": "running", "running": true})
    );
    assert_eq!(
        q.ok("query-kvm", serde_json::json!({})),
        serde_json::json!({"enabled": true, "present": true})
    );
    q.ok("stop", serde_json::json!({}));
    q.event("STOP");
    assert_eq!(
        q.ok("query-status", serde_json::json!({}))["status"],
        "paused"
    );
    q.ok("cont", serde_json::json!({}));
    q.event("RESUME");
    q.ok("quit", serde_json::json!({}));
    let shutdown = q.event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        serde_json::json!({"guest": false, "reason": "host-qmp-quit"})
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the QMP socket is removed at exit");
    for p in [&blk, &scsi] {
        let out = qemu_img(&["check", p.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }
    let out = qemu_img(&["snapshot", "-l", blk.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("before-boot"),
        "{out:?}"
    );
}

/// `-qmp ...,wait=on` holds the guest until a client connects: the guest (which prints and
/// powers off at once) has not run while nobody is connected.
#[test]
fn qmp_wait_on_holds_the_guest_until_a_client_connects() {
    if !kvm_available() {
        return;
    }
    let f = Files::new();
    let k = f.write("kernel", &elf(&pvh_code(), true));
    let rd = f.write("initrd", b"Zinitrd");
    let sock = f.path("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["-kernel", &k, "-initrd", &rd, "-append", "hi"])
        .args(["-qmp", &format!("unix:{},server=on", sock.display())])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the guest ran before a QMP client connected"
    );
    let _q = Qmp::connect(&sock);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hiZ\n");
}

/// A guest that resets itself (the i8042's reset line) is rebooted on a new machine, again and
/// again, until QMP's quit; with -no-reboot the first reset ends the VMM.
#[test]
fn a_reset_reboots_unless_no_reboot() {
    if !kvm_available() {
        return;
    }
    let f = Files::new();
    // mov al, 0xfe; out 0x64, al; jmp $
    let k = f.write("kernel", &elf(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], true));
    let sock = f.path("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["-kernel", &k, "-serial", "none"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .spawn()
        .unwrap();
    let mut q = Qmp::connect(&sock);
    for _ in 0..3 {
        let reset = q.event("RESET");
        assert_eq!(
            reset["data"],
            serde_json::json!({"guest": true, "reason": "guest-reset"})
        );
    }
    // And a reset asked for over QMP.
    q.ok("system_reset", serde_json::json!({}));
    q.ok("quit", serde_json::json!({}));
    assert!(child.wait().unwrap().success());

    let out = vmm(&["-kernel", &k, "-serial", "none", "-no-reboot"]);
    assert!(out.status.success(), "{out:?}");
}

/// A lab script of the project (scripts/NAME) with `env`; its stdout, trimmed.
fn lab_script(name: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name);
    let out = Command::new(&script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Drives on network storage: a qcow2 image on an iSCSI LUN (tgtd, scripts/iscsi-lab.sh) as a
/// virtio-blk disk and one on RBD (a Ceph cluster, scripts/ceph-lab.sh) as a scsi-hd, opened by
/// the engine from their names. QMP shows them; an internal snapshot is taken of both while
/// the guest runs; afterwards qemu-img 7.2 (which has the iscsi and rbd drivers) finds them
/// clean and holding the snapshot.
#[test]
fn network_drives() {
    if !kvm_available() {
        return;
    }
    let required = std::env::var("IMG_REQUIRE_ISCSI").is_ok_and(|v| v == "1")
        && std::env::var("IMG_REQUIRE_CEPH").is_ok_and(|v| v == "1");
    let installed = Path::new("/usr/sbin/tgtd").exists() && Path::new("/usr/bin/ceph-mon").exists();
    if !(required || installed) {
        eprintln!("SKIP: tgt or Ceph is not installed (IMG_REQUIRE_ISCSI/CEPH=1 to fail instead)");
        return;
    }
    let f = Files::new();
    let k = f.write("kernel", &elf(&[0xeb, 0xfe], true)); // jmp $
    let iscsi_dir = f.path("iscsi-lab");
    let lun = lab_script(
        "iscsi-lab.sh",
        &["start", "--size", "64M"],
        &[("ISCSI_LAB_DIR", &iscsi_dir)],
    );
    let conf = lab_script("ceph-lab.sh", &["start"], &[]);
    let image = format!("vmm-{}", std::process::id());
    let _ = Command::new("rbd")
        .args(["-c", &conf, "rm", &format!("rbd/{image}")])
        .output();
    let rbd = format!("rbd:rbd/{image}:conf={conf}");
    let q72 = |args: &[&str]| {
        let out =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-img72.sh"))
                .args(args)
                .output()
                .unwrap();
        assert!(out.status.success(), "qemu-img 7.2 {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    q72(&["create", "-q", "-f", "qcow2", &lun, "32M"]);
    q72(&["create", "-q", "-f", "qcow2", &rbd, "32M"]);

    let sock = f.path("qmp.sock");
    // QEMU's escape: a comma in a -drive value is doubled (none here, but rbd names may have
    // colons, which -drive takes as they are).
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["-kernel", &k, "-serial", "none"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ])
        .args(["-drive", &format!("file={lun},format=qcow2,if=virtio")])
        .args(["-device", "virtio-scsi-pci,id=scsi0"])
        .args([
            "-drive",
            &format!("file={rbd},format=qcow2,if=none,id=disk1"),
        ])
        .args(["-device", "scsi-hd,drive=disk1,bus=scsi0.0,id=hd1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut q = Qmp::connect(&sock);
    let blocks = q.ok("query-block", serde_json::json!({}));
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["inserted"]["file"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(files.contains(&lun) && files.contains(&rbd), "{blocks}");
    for device in ["virtio0", "disk1"] {
        q.ok(
            "blockdev-snapshot-internal-sync",
            serde_json::json!({"device": device, "name": "running"}),
        );
    }
    q.ok("quit", serde_json::json!({}));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for name in [&lun, &rbd] {
        let check = q72(&["check", name]);
        assert!(check.contains("No errors were found"), "{check}");
        let list = q72(&["snapshot", "-l", name]);
        assert!(list.contains("running"), "{list}");
    }
    let _ = Command::new("rbd")
        .args(["-c", &conf, "rm", "--no-progress", &format!("rbd/{image}")])
        .output();
    lab_script("iscsi-lab.sh", &["clean"], &[("ISCSI_LAB_DIR", &iscsi_dir)]);
}
