//! `img nbd`: serves an image over NBD, with qemu-nbd's options.

use crate::daemon;
use crate::getopt::{opt, parse};
use crate::open::{open_with_aio, ImageSpec};
use crate::{CliError, CmdResult};
use blockdev::{Aio, CacheMode};
use img_core::{DetectZeroes, DiscardMode};
use nbd_server::{Export, Listener, ServeOptions};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SPECS: &[crate::getopt::OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('V'), Some("version"), false),
    opt(Some('p'), Some("port"), true),
    opt(Some('b'), Some("bind"), true),
    opt(Some('k'), Some("socket"), true),
    opt(Some('e'), Some("shared"), true),
    opt(Some('t'), Some("persistent"), false),
    opt(Some('v'), Some("verbose"), false),
    opt(Some('x'), Some("export-name"), true),
    opt(Some('D'), Some("description"), true),
    opt(Some('f'), Some("format"), true),
    opt(Some('r'), Some("read-only"), false),
    opt(Some('s'), Some("snapshot"), false),
    opt(Some('l'), Some("load-snapshot"), true),
    opt(Some('n'), Some("nocache"), false),
    opt(Some('c'), Some("connect"), true),
    opt(Some('d'), Some("disconnect"), false),
    opt(Some('L'), Some("list"), false),
    opt(Some('o'), Some("offset"), true),
    opt(None, Some("cache"), true),
    opt(None, Some("aio"), true),
    opt(None, Some("discard"), true),
    opt(None, Some("detect-zeroes"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("fork"), false),
    opt(None, Some("pid-file"), true),
    opt(None, Some("handshake-limit"), true),
    opt(None, Some("object"), true),
];

/// Set by SIGTERM/SIGINT/SIGHUP: stop serving, flush and close the image.
static STOP: AtomicBool = AtomicBool::new(false);

struct Args {
    port: u16,
    bind: String,
    socket: Option<String>,
    shared: usize,
    persistent: bool,
    verbose: bool,
    export: String,
    description: Option<String>,
    format: Option<String>,
    read_only: bool,
    snapshot: Option<img_core::qcow2::SnapshotSelector>,
    /// `-s`: writes go to a temporary qcow2 overlay, the image itself stays untouched.
    overlay: bool,
    cache: CacheMode,
    aio: Aio,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
    image_opts: bool,
    fork: bool,
    pid_file: Option<String>,
    /// Seconds a client may take for each negotiation message (0: unlimited).
    handshake_limit: u64,
    file: String,
}

fn parse_args(args: &[String]) -> Result<Option<Args>, CliError> {
    let (opts, files) = parse(args, SPECS)?;
    let mut a = Args {
        port: blockdev::nbd::proto::DEFAULT_PORT,
        bind: "0.0.0.0".into(),
        socket: None,
        shared: 1,
        persistent: false,
        verbose: false,
        export: String::new(),
        description: None,
        format: None,
        read_only: false,
        snapshot: None,
        overlay: false,
        cache: CacheMode::Writeback,
        aio: Aio::Threads,
        discard: DiscardMode::Ignore,
        detect_zeroes: DetectZeroes::Off,
        image_opts: false,
        fork: false,
        pid_file: None,
        handshake_limit: 10,
        file: String::new(),
    };
    for o in opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print_help();
                return Ok(None);
            }
            "version" => {
                println!("img nbd {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "port" => {
                a.port = v
                    .parse()
                    .map_err(|_| CliError::new(format!("Invalid port number '{v}'")))?
            }
            "bind" => a.bind = v,
            "socket" => a.socket = Some(v),
            "shared" => {
                a.shared = v
                    .parse()
                    .map_err(|_| CliError::new(format!("Invalid shared device number '{v}'")))?
            }
            "persistent" => a.persistent = true,
            "verbose" => a.verbose = true,
            "export-name" => a.export = v,
            "description" => a.description = Some(v),
            "format" => a.format = Some(v),
            "read-only" => a.read_only = true,
            "snapshot" => a.overlay = true,
            "load-snapshot" => {
                a.snapshot = Some(super::snapshot::parse_snapshot_param(&v)?);
                a.read_only = true;
            }
            "nocache" => a.cache = CacheMode::None,
            "cache" => {
                a.cache = CacheMode::parse(&v)
                    .ok_or_else(|| CliError::new(format!("Invalid cache mode `{v}'")))?
            }
            "aio" => {
                a.aio = Aio::parse(&v)
                    .ok_or_else(|| CliError::new(format!("Invalid aio mode '{v}'")))?
            }
            "discard" => {
                a.discard = DiscardMode::parse(&v)
                    .ok_or_else(|| CliError::new("Invalid discard mode `{v}'".replace("{v}", &v)))?
            }
            "detect-zeroes" => {
                a.detect_zeroes = DetectZeroes::parse(&v).ok_or_else(|| {
                    CliError::new(format!(
                        "Invalid detect-zeroes mode '{v}': expected 'off', 'on' or 'unmap'"
                    ))
                })?
            }
            "image-opts" => a.image_opts = true,
            "fork" => a.fork = true,
            "pid-file" => a.pid_file = Some(v),
            "connect" | "disconnect" => {
                return Err(CliError::new(
                    "-c/--connect and -d/--disconnect need the kernel NBD client, which img \
                     does not drive; connect with 'nbd-client' or a userspace client instead",
                ))
            }
            "list" => return Err(CliError::new("-L/--list is not supported by img nbd")),
            "offset" => return Err(CliError::new("-o/--offset is not supported by img nbd")),
            "object" => return Err(CliError::new("--object is not supported by img nbd")),
            "handshake-limit" => {
                a.handshake_limit = v
                    .parse()
                    .map_err(|_| CliError::new(format!("Invalid handshake limit '{v}'")))?
            }
            other => return Err(CliError::new(format!("option --{other} is not supported"))),
        }
    }
    if a.detect_zeroes == DetectZeroes::Unmap && a.discard != DiscardMode::Unmap {
        return Err(CliError::new(
            "setting detect-zeroes to unmap is not allowed without setting discard operation \
             to unmap",
        ));
    }
    if files.len() != 1 {
        return Err(CliError::new(
            "Invalid number of arguments\nTry `img nbd --help' for more information.",
        ));
    }
    a.file = files[0].clone();
    if a.overlay && a.image_opts {
        return Err(CliError::new(
            "-s/--snapshot cannot be combined with --image-opts in img nbd",
        ));
    }
    Ok(Some(a))
}

fn print_help() {
    println!(
        "Usage: img nbd [OPTIONS] FILE\n\
         Serve an image over NBD (a qemu-nbd compatible server)\n\n\
         \x20 -h, --help                display this help and exit\n\
         \x20 -V, --version             output version information and exit\n\n\
         Connection properties:\n\
         \x20 -p, --port=PORT           port to listen on (default `10809')\n\
         \x20 -b, --bind=IFACE          interface to bind to (default `0.0.0.0')\n\
         \x20 -k, --socket=PATH         path to the unix socket\n\
         \x20 -e, --shared=NUM          device can be shared by NUM clients (default '1'), 0 for unlimited\n\
         \x20 -t, --persistent          don't exit on the last connection\n\
         \x20 -v, --verbose             display extra debugging information\n\
         \x20 -x, --export-name=NAME    expose export by name (default is empty string)\n\
         \x20 -D, --description=TEXT    export a human-readable description\n\
         \x20     --handshake-limit=N   limit client's handshake to N seconds (default 10)\n\n\
         General purpose options:\n\
         \x20 --fork                    fork off the server process and exit the parent\n\
         \x20                           once the server is running\n\
         \x20 --pid-file=PATH           store the server's process ID in the given file\n\n\
         Block device options:\n\
         \x20 -f, --format=FORMAT       set image format (raw, qcow2, vmdk)\n\
         \x20 -r, --read-only           export read-only\n\
         \x20 -s, --snapshot            use FILE as an external snapshot, create a temporary\n\
         \x20                           file with backing_file=FILE, redirect the write to\n\
         \x20                           the temporary one\n\
         \x20 -l, --load-snapshot=SNAPSHOT_PARAM\n\
         \x20                           load an internal snapshot inside FILE and export it\n\
         \x20                           as a read-only device ('snapshot.id=[ID],snapshot.name=[NAME]'\n\
         \x20                           or '[ID_OR_NAME]')\n\
         \x20 -n, --nocache             disable host cache\n\
         \x20     --cache=MODE          set cache mode (none, writeback (default), writethrough,\n\
         \x20                           directsync, unsafe)\n\
         \x20     --aio=MODE            set AIO mode (native, io_uring or threads)\n\
         \x20     --discard=MODE        set discard mode (ignore (default), unmap)\n\
         \x20     --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)\n\
         \x20     --image-opts          treat FILE as a full set of image options\n\n\
         -c/--connect (the kernel NBD client) is not available."
    );
}

/// Runs `img nbd`.
pub fn run(args: &[String]) -> CmdResult {
    let Some(a) = parse_args(args)? else {
        return Ok(0);
    };
    // With --fork, the parent returns once the child listens (or fails), as qemu-nbd does, so
    // a script may connect as soon as the parent exited. Forking comes before anything starts
    // a thread.
    let mut readiness = daemon::fork_when_ready(a.fork)?;
    daemon::block_stop_signals();
    daemon::on_stop_signal(|_| {
        STOP.store(true, Ordering::SeqCst);
        true
    })
    .map_err(|e| CliError::new(format!("Could not start the signal thread: {e}")))?;
    serve(&a, &mut readiness)
}

/// qemu-nbd's "Failed to blk_new_open 'FILE': reason", where `img`'s open says
/// "Could not open 'FILE': reason".
fn open_failed(file: &str, e: CliError) -> CliError {
    let prefix = format!("Could not open '{file}': ");
    let reason = e.message.strip_prefix(&prefix).unwrap_or(&e.message);
    CliError::new(format!("Failed to blk_new_open '{file}': {reason}"))
}

/// `-s`: a temporary qcow2 over the image (as qemu-nbd: in $TMPDIR or /var/tmp), opened
/// read-write with the image as its read-only backing file, and unlinked at once so that it
/// disappears with the server.
fn open_overlay(a: &Args) -> Result<img_core::Image, CliError> {
    let fail = |m: String| CliError::new(format!("Failed to blk_new_open '{}': {m}", a.file));
    let base = open_with_aio(
        &ImageSpec::file(&a.file, a.format.as_deref()),
        true,
        a.cache,
        a.aio,
    )
    .map_err(|e| open_failed(&a.file, e))?;
    let (size, format) = (base.size(), base.format().driver().to_string());
    drop(base);
    let full = std::fs::canonicalize(&a.file).map_err(|e| fail(e.to_string()))?;
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let mut template = format!("{dir}/vl.XXXXXX\0").into_bytes();
    // SAFETY: the template is a writable NUL-terminated buffer that mkstemp fills in.
    let fd = unsafe { libc::mkstemp(template.as_mut_ptr().cast()) };
    if fd < 0 {
        return Err(fail(format!(
            "Could not create temporary overlay: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just opened by mkstemp and is ours to close.
    unsafe { libc::close(fd) };
    template.pop();
    let temp = String::from_utf8(template).map_err(|e| fail(e.to_string()))?;
    let created = img_core::qcow2::create(
        std::path::Path::new(&temp),
        &img_core::qcow2::Qcow2CreateOptions {
            size,
            backing_file: Some(full.display().to_string()),
            backing_format: Some(format),
            ..Default::default()
        },
    );
    let opened = created.map_err(|e| fail(e.to_string())).and_then(|()| {
        open_with_aio(
            &ImageSpec::file(&temp, Some("qcow2")),
            false,
            a.cache,
            a.aio,
        )
        .map_err(|e| fail(e.message))
    });
    let _ = std::fs::remove_file(&temp);
    opened
}

fn serve(a: &Args, readiness: &mut daemon::Readiness) -> CmdResult {
    let spec = ImageSpec::from_args(&a.file, a.image_opts, a.format.as_deref())?;
    let mut image = if a.overlay {
        open_overlay(a)?
    } else {
        open_with_aio(&spec, a.read_only, a.cache, a.aio).map_err(|e| open_failed(&a.file, e))?
    };
    if let Some(sel) = &a.snapshot {
        super::snapshot::load(&mut image, sel)?;
    }
    image.set_request_options(a.discard, a.detect_zeroes);
    let listener = match &a.socket {
        Some(path) => {
            // As qemu: a stale socket from an earlier server is replaced.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            Listener::Unix(UnixListener::bind(path).map_err(|e| {
                CliError::new(format!(
                    "Failed to bind socket to {path}: {}",
                    blockdev::os_message(&e)
                ))
            })?)
        }
        None => {
            let host = a.bind.trim_start_matches('[').trim_end_matches(']');
            Listener::Tcp(TcpListener::bind((host, a.port)).map_err(|e| {
                CliError::new(format!(
                    "Failed to bind socket to {}:{}: {}",
                    a.bind,
                    a.port,
                    blockdev::os_message(&e)
                ))
            })?)
        }
    };
    let pid_file = a.pid_file.as_deref().map(daemon::pid_file).transpose()?;
    // SAFETY: ignoring a signal installs no handler. A client hanging up mid-reply must fail
    // the write, not kill the server.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Listening: let a --fork parent go.
    readiness.ready();
    if a.fork {
        daemon::detach_stdio();
    }
    let export = Arc::new(Export {
        name: a.export.clone(),
        description: a.description.clone(),
        image: Arc::new(image),
        read_only: a.read_only,
    });
    let opts = ServeOptions {
        shared: a.shared,
        persistent: a.persistent,
        verbose: a.verbose,
        handshake_limit: (a.handshake_limit > 0)
            .then(|| std::time::Duration::from_secs(a.handshake_limit)),
    };
    let served = nbd_server::serve(listener, export.clone(), &opts, &STOP);
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
    }
    drop(pid_file);
    served.map_err(|e| CliError::new(format!("NBD server failed: {e}")))?;
    let export = Arc::try_unwrap(export)
        .map_err(|_| CliError::new("NBD connections still running at exit"))?;
    let image = Arc::try_unwrap(export.image)
        .map_err(|_| CliError::new("NBD connections still running at exit"))?;
    image.close()?;
    Ok(0)
}
