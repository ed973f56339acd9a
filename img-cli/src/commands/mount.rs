//! `img mount` and `img unmount`: export an image of any format as one raw file through FUSE
//! (see the `fuse-export` crate), as qemu-storage-daemon's FUSE export does.
//!
//! By default `img mount` returns once the file is live, leaving a daemon that serves it: the
//! command forks before anything else (no thread or lock exists yet), and waits until the
//! child reports the mount done or fails (its exit code and messages are the command's).

use crate::daemon;
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::options::parse_kv;
use crate::{CliError, CmdResult};
use blockdev::{Aio, CacheMode};
use fuse_export::{unmount_path, Export, ExportOptions, Log};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('r'), Some("readonly"), false),
    opt(None, Some("read-only"), false),
    opt(None, Some("foreground"), false),
    opt(Some('o'), Some("options"), true),
    opt(Some('t'), Some("cache"), true),
    opt(Some('u'), Some("unmount"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img mount [-f FMT | --image-opts] [-r|--readonly] [--foreground]
                 [-t CACHE] [-o OPTIONS] IMAGE MOUNTPOINT
       img unmount MOUNTPOINT      (also: img mount -u MOUNTPOINT)

Exports the disk of IMAGE (any format: raw, qcow2, vmdk, with its backing chain) as one
regular file holding the raw disk contents, through FUSE, like qemu-storage-daemon's
FUSE export. The file can then be used as a raw disk, e.g. `mount -o loop` (see
`img partitions` for the offset of a partition).

MOUNTPOINT is either a regular file, which the image is mounted over, or a directory,
in which the image appears as one file named like the image (its file name without
the directory; `-o name=NAME` names it otherwise).

The file has the disk's virtual size and cannot be resized: reads past the end are
short, writes starting past the end fail with ENOSPC, truncation fails with EPERM.
fsync and close flush the image; fallocate(PUNCH_HOLE) deallocates (writes zeros),
fallocate(ZERO_RANGE) writes zeros; lseek(SEEK_DATA/SEEK_HOLE) reports the image's
allocation. Failed requests return EIO and are logged (to stderr with --foreground,
else to syslog).

`img mount` returns once the file is live; a daemon keeps serving it, holding the
image and its lock, until the mount point is unmounted by `img unmount`, umount(8),
`fusermount3 -u`, or SIGTERM/SIGINT/SIGHUP to the daemon. Unmounting flushes and closes
the image; `img unmount` waits until the daemon has done so, so the image can be used
right after it returns.

  -f, --format FMT        image format (default: probed)
  --image-opts            IMAGE is an option string (driver=qcow2,file.filename=...)
  -r, --readonly          export read-only (writes fail with EROFS)
  --foreground            serve in this process until unmounted
  -t, --cache CACHE       cache mode: writeback (default), none, writethrough,
                          directsync, unsafe
  -o OPTIONS              comma-separated: cache=CACHE, aio=threads|native|io_uring,
                          discard=ignore|unmap, detect-zeroes=off|on|unmap,
                          threads=N (parallel request loops, default 4),
                          name=NAME (file name in a directory mount point)
  -u, --unmount           unmount MOUNTPOINT (the only argument), as img unmount
  -h, --help              show this help
";

const UNMOUNT_USAGE: &str = "\
Usage: img unmount MOUNTPOINT

Unmounts an image mounted by `img mount` and waits until its daemon has flushed and
closed the image (and released its lock). A busy mount point (a filesystem mounted
from the file, an open file) is refused with EBUSY, as umount(8) does.

  -h, --help              show this help
";

/// The parsed command line of `img mount`.
struct MountArgs {
    spec: ImageSpec,
    mountpoint: PathBuf,
    read_only: bool,
    foreground: bool,
    cache: CacheMode,
    aio: Aio,
    threads: usize,
    name: Option<OsString>,
}

/// Runs `img mount` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut read_only = false;
    let mut foreground = false;
    let mut unmount = false;
    let mut cache = CacheMode::Writeback;
    let mut aio = Aio::default();
    let mut threads = 4usize;
    let mut name = None;
    let mut discard = None;
    let mut detect_zeroes = None;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "format" => fmt = Some(v),
            "image-opts" => image_opts = true,
            "readonly" | "read-only" => read_only = true,
            "foreground" => foreground = true,
            "unmount" => unmount = true,
            "cache" => {
                cache = open::parse_cache(&v)
                    .ok_or_else(|| CliError::new(format!("Invalid cache option: {v}")))?
            }
            "options" => {
                for (k, val) in parse_kv(&v)? {
                    match k.as_str() {
                        "cache" => {
                            cache = open::parse_cache(&val).ok_or_else(|| {
                                CliError::new(format!("Invalid cache option: {val}"))
                            })?
                        }
                        "aio" => {
                            aio = Aio::parse(&val).ok_or_else(|| {
                                CliError::new(format!("Invalid aio option: {val}"))
                            })?
                        }
                        "discard" => discard = Some(val),
                        "detect-zeroes" => detect_zeroes = Some(val),
                        "threads" => {
                            threads = val
                                .parse::<usize>()
                                .ok()
                                .filter(|n| (1..=64).contains(n))
                                .ok_or_else(|| {
                                    CliError::new(format!(
                                        "Invalid threads option: {val} (expected 1 to 64)"
                                    ))
                                })?
                        }
                        "name" => {
                            if val.is_empty() || val.contains('/') || val == "." || val == ".." {
                                return Err(CliError::new(format!(
                                    "Invalid name option: '{val}' is not a file name"
                                )));
                            }
                            name = Some(OsString::from(val))
                        }
                        _ => return Err(CliError::new(format!("Invalid option: '{k}'"))),
                    }
                }
            }
            // --object defines secrets, which unencrypted images do not need.
            _ => {}
        }
    }
    if unmount {
        if pos.len() != 1 {
            return Err(CliError::usage("Expecting one mount point"));
        }
        return unmount_and_wait(Path::new(&pos[0]));
    }
    if pos.len() != 2 {
        return Err(CliError::usage(
            "Expecting an image file name and a mount point",
        ));
    }
    let mut spec = ImageSpec::from_args_checked(&pos[0], image_opts, fmt.as_deref())?;
    if discard.is_some() {
        spec.options.discard = discard;
    }
    if detect_zeroes.is_some() {
        spec.options.detect_zeroes = detect_zeroes;
    }
    let args = MountArgs {
        spec,
        mountpoint: PathBuf::from(&pos[1]),
        read_only,
        foreground,
        cache,
        aio,
        threads,
        name,
    };
    if !args.foreground {
        // Checked before forking, so that the error is the command's own.
        check_mountpoint(&args.mountpoint)?;
    }
    let mut readiness = daemon::fork_when_ready(!args.foreground)?;
    serve(&args, &mut readiness)
}

/// Runs `img unmount` with its arguments.
pub fn run_unmount(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, &[opt(Some('h'), Some("help"), false)])?;
    if opts.iter().any(|o| o.name == "help") {
        print!("{UNMOUNT_USAGE}");
        return Ok(0);
    }
    if pos.len() != 1 {
        return Err(CliError::usage("Expecting one mount point"));
    }
    unmount_and_wait(Path::new(&pos[0]))
}

/// Refuses a mount point that cannot be mounted on before a daemon is started for it.
fn check_mountpoint(path: &Path) -> Result<(), CliError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(_) => Err(CliError::new(format!(
            "'{}' is neither a regular file nor a directory",
            path.display()
        ))),
        Err(e) => Err(CliError::new(format!(
            "Failed to stat '{}': {}",
            path.display(),
            os_message(&e)
        ))),
    }
}

/// The OS message of an I/O error without Rust's " (os error N)".
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Opens the image, mounts it, reports readiness, and serves until unmounted.
fn serve(args: &MountArgs, readiness: &mut daemon::Readiness) -> CmdResult {
    let daemon = !args.foreground;
    // Signals that end the export are taken by a thread of their own; every other thread,
    // created later, inherits the mask and never sees them.
    daemon::block_stop_signals();
    let image = open::open_with_aio(&args.spec, args.read_only, args.cache, args.aio)?;
    let read_only = args.read_only || image.is_read_only();
    let log: Log = if daemon {
        Arc::new(syslog)
    } else {
        Arc::new(|m: &str| eprintln!("{m}"))
    };
    let fs_name = std::fs::canonicalize(&args.spec.path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| args.spec.path.clone());
    let export = Export::mount(
        image,
        &args.mountpoint,
        ExportOptions {
            read_only,
            file_name: args.name.clone(),
            threads: args.threads,
            fs_name: Some(fs_name),
            log: log.clone(),
        },
    )
    .map_err(|e| CliError::new(e.to_string()))?;
    let unmounter = export.unmounter();
    daemon::on_stop_signal(move |sig| match unmounter.unmount() {
        Ok(()) => true,
        Err(e) => {
            log(&format!(
                "img mount: unmounting after signal {sig} failed: {e}"
            ));
            false
        }
    })
    .map_err(|e| CliError::new(format!("Could not start the signal thread: {e}")))?;
    readiness.ready();
    if daemon {
        daemon::detach_stdio();
        // The daemon keeps no directory busy.
        let _ = std::env::set_current_dir("/");
    }
    export.run().map_err(|e| {
        if daemon {
            syslog(&format!("img mount: {e}"));
        }
        CliError::new(e.to_string())
    })?;
    Ok(0)
}

/// Logs a message of the daemon to syslog.
fn syslog(message: &str) {
    let Ok(msg) = std::ffi::CString::new(message.replace('\0', " ")) else {
        return;
    };
    // SAFETY: the identifier is a static C string, as openlog requires it to outlive the
    // log; the format is a static "%s" and `msg` a valid C string.
    unsafe {
        libc::openlog(c"img".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON);
        libc::syslog(libc::LOG_ERR, c"%s".as_ptr(), msg.as_ptr());
    }
}

/// A FUSE mount as /proc/self/mountinfo describes it.
struct MountEntry {
    fstype: String,
    source: String,
}

/// Undoes the octal escapes (`\040` for a space) of /proc mount tables.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last mount at `path` in /proc/self/mountinfo (the one visible there).
fn find_mount(path: &Path) -> Option<MountEntry> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in table.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source super
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        if unescape(mp) != want {
            continue;
        }
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default().to_string();
        let source = unescape(r.next().unwrap_or_default());
        found = Some(MountEntry { fstype, source });
    }
    found
}

/// Processes that have both /dev/fuse and `image` open: the daemons serving it.
fn daemons_of(image: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let (mut fuse, mut img) = (false, false);
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if target == Path::new("/dev/fuse") {
                    fuse = true;
                } else if target == Path::new(image) {
                    img = true;
                }
            }
        }
        if fuse && img {
            pids.push(pid);
        }
    }
    pids
}

/// Whether process `pid` is gone (or a zombie, which holds no files).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// Unmounts an `img mount` mount point and waits until its daemon closed the image.
fn unmount_and_wait(mountpoint: &Path) -> CmdResult {
    let shown = mountpoint.display().to_string();
    let canonical = std::fs::canonicalize(mountpoint)
        .map_err(|e| CliError::new(format!("Failed to stat '{shown}': {}", os_message(&e))))?;
    let entry =
        find_mount(&canonical).ok_or_else(|| CliError::new(format!("'{shown}' is not mounted")))?;
    // A mount made with mount(2) directly is of type "fuse" (the subtype only shows when
    // fusermount3 mounted it).
    if entry.fstype != "fuse.img" && entry.fstype != "fuse" {
        return Err(CliError::new(format!(
            "'{shown}' is not mounted by img mount (it is a {} mount)",
            entry.fstype
        )));
    }
    let daemons = daemons_of(&entry.source);
    let fail = |e: std::io::Error| {
        CliError::new(format!("Failed to unmount '{shown}': {}", os_message(&e)))
    };
    unmount_strict(&canonical).map_err(fail)?;
    // The daemon flushes and closes the image once its request loop ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !daemons.iter().all(|&p| exited(p)) {
        if Instant::now() > deadline {
            return Err(CliError::new(format!(
                "'{shown}' was unmounted, but its daemon (pid {daemons:?}) has not exited"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(0)
}

/// Unmounts without lazy detaching: a busy mount point stays, as with umount(8).
fn unmount_strict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // A file of the mount may be held for an instant by a process between fork and exec
    // (every descriptor is copied until exec closes it); such users go away by themselves,
    // so a busy mount is retried for a second before it is refused.
    let mut tries = 0;
    let err = loop {
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) || tries == 20 {
            break err;
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(50));
    };
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper may unmount our own mount.
        return unmount_path(path);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_escapes_are_undone() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape(r"/tmp/x\134y"), r"/tmp/x\y");
        assert_eq!(unescape(r"/tmp/end\04"), r"/tmp/end\04");
        assert_eq!(unescape("plain"), "plain");
    }
}
