//! What each fuzz target does with one input.
//!
//! The cargo-fuzz targets under `fuzz/` are one line each: they hand their input to a function
//! here. The same functions replay every saved input (`fuzz/regressions/`) in the ordinary test
//! suite, so an input that once crashed stays a test on stable Rust without a fuzzer.
//!
//! A target passes when the function returns: errors are the expected answer to hostile
//! input, a panic, an abort, a hang or an allocation past the fuzzer's limit is a bug.
//! Every target works on memory only ([`MemStorage`]) and bounds how much guest data it reads,
//! so that the time an input takes depends on how the code treats it, not on the disk size an
//! image claims.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Once};

use blockdev::mem::MemStorage;
use blockdev::Storage;
use img_core::qcow2::check::{check, Fix};
use img_core::qcow2::{Qcow2CreateOptions, SnapshotSelector};
use img_core::{BackingPolicy, Image, OpenOptions};

/// Guest bytes a target reads per image at most.
pub const READ_BUDGET: u64 = 4 << 20;
/// Block-status extents a target walks per image at most.
pub const EXTENT_BUDGET: usize = 512;
/// Bytes a target's storage may grow to through writes.
const MEM_CAP: u64 = 64 << 20;

/// The options every target opens with: read-only, no backing files (an input cannot reach
/// the file system through a backing name), the default caches.
fn open_options(format: &str) -> OpenOptions {
    OpenOptions {
        format: Some(format.into()),
        read_only: true,
        backing: BackingPolicy::none(),
        ..OpenOptions::default()
    }
}

/// The storage an input becomes. The name sits in a directory that does not exist, so relative
/// file names in the input (VMDK extents) fail to open instead of reaching real files.
fn storage(data: &[u8], read_only: bool) -> Arc<dyn Storage> {
    Arc::new(MemStorage::new(
        "/nonexistent-fuzz-dir/input",
        data.to_vec(),
        read_only,
        MEM_CAP,
    ))
}

/// How far a target got with an input: tests that replay well-formed images use it to tell a
/// target that reads them from one that fails early and so would fuzz nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reached {
    /// The image (or the NBD negotiation) was accepted.
    pub opened: bool,
    /// Guest bytes read successfully (for NBD: bytes the server sent back).
    pub bytes_read: u64,
}

/// Reads what the image maps, within the budgets: the block-status walk and the reads are
/// where L1/L2 tables, grain tables and compressed clusters are decoded. Returns the bytes
/// read successfully.
fn walk(image: &Image) -> u64 {
    let size = image.size();
    let mut offset = 0;
    let mut read = 0;
    let mut good = 0;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..EXTENT_BUDGET {
        if offset >= size || read >= READ_BUDGET {
            break;
        }
        let Ok(status) = image.block_status(offset, size - offset) else {
            // Reading the next cluster may still work where its mapping did not.
            offset = offset.saturating_add(64 << 10);
            continue;
        };
        if status.len == 0 {
            break;
        }
        if status.data || status.compressed {
            let n = status.len.min(buf.len() as u64).min(READ_BUDGET - read);
            if image.read_at(&mut buf[..n as usize], offset).is_ok() {
                good += n;
            }
            read += n;
        }
        offset = offset.saturating_add(status.len);
    }
    // The last bytes of the disk: tables at the end of the L1 and past-the-end arithmetic.
    if size > 0 {
        let n = size.min(4096);
        let _ = image.read_at(&mut buf[..n as usize], size - n);
    }
    good
}

/// Opens `data` as a qcow2 image and reads it, checks it as `qemu-img check` would (without
/// repairing), and reads its first snapshot.
pub fn qcow2_image(data: &[u8]) -> Reached {
    let file = storage(data, true);
    let _ = check(&file, Fix::NONE);
    let Ok(mut image) = img_core::open::open_storage(file.clone(), &open_options("qcow2")) else {
        return Reached::default();
    };
    let _ = image.format().info();
    let mut bytes_read = walk(&image);
    let first = img_core::qcow2::driver_of(&mut image)
        .and_then(|q| q.snapshots().ok())
        .and_then(|list| list.first().map(|s| s.id.clone()));
    drop(image);
    if let Some(id) = first {
        let opts = OpenOptions {
            snapshot: Some(SnapshotSelector::IdOrName(
                String::from_utf8_lossy(&id).into_owned(),
            )),
            ..open_options("qcow2")
        };
        if let Ok(image) = img_core::open::open_storage(file, &opts) {
            bytes_read += walk(&image);
        }
    }
    Reached {
        opened: true,
        bytes_read,
    }
}

/// Opens `data` as a qcow2 image for writing, writes, discards and zeroes a little, creates
/// and deletes an internal snapshot, and checks the result: the allocation paths and the
/// snapshot switch meet whatever tables the input holds.
pub fn qcow2_write(data: &[u8]) -> Reached {
    let file = storage(data, false);
    let opts = OpenOptions {
        read_only: false,
        ..open_options("qcow2")
    };
    let Ok(mut image) = img_core::open::open_storage(file.clone(), &opts) else {
        return Reached::default();
    };
    let size = image.size();
    let mut bytes_read = 0;
    if size > 0 {
        let pattern = [0x5au8; 8192];
        for (i, at) in [0, size / 3, size / 2, size - 1].into_iter().enumerate() {
            let n = (size - at).min(pattern.len() as u64);
            let _ = match i {
                2 => image.write_zeroes(at, n, true),
                3 => image.discard(at.saturating_sub(65536), 65536.min(size)),
                _ => image.write_at(&pattern[..n as usize], at),
            };
        }
        let _ = image.flush();
        bytes_read = walk(&image);
    }
    if let Some(q) = img_core::qcow2::driver_of(&mut image) {
        if q.create_snapshot("fuzz", (0, 0)).is_ok() {
            let _ = q.delete_snapshot("fuzz");
        }
    }
    let _ = image.close();
    let _ = check(&file, Fix::NONE);
    Reached {
        opened: true,
        bytes_read,
    }
}

/// Opens `data` as a VMDK image (any subformat whose extents are inside it) and reads it,
/// and runs the format's own check.
pub fn vmdk_image(data: &[u8]) -> Reached {
    let file = storage(data, true);
    let opts = open_options("vmdk");
    if let Ok(vmdk) = img_core::vmdk::Vmdk::open(file.clone(), &opts) {
        let _ = vmdk.check();
    }
    let Ok(image) = img_core::open::open_storage(file, &opts) else {
        return Reached::default();
    };
    let _ = image.format().info();
    Reached {
        opened: true,
        bytes_read: walk(&image),
    }
}

/// The image the NBD target serves: a small empty qcow2 image in memory, so that writes,
/// zeroes and trims from the input reach real allocation.
fn nbd_image() -> Image {
    static TEMPLATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        let mem = Arc::new(MemStorage::new("template", Vec::new(), false, MEM_CAP));
        img_core::qcow2::create::create_on(
            mem.clone(),
            &Qcow2CreateOptions {
                size: 4 << 20,
                cluster_size: 4096,
                ..Qcow2CreateOptions::default()
            },
        )
        .expect("an empty qcow2 image can be made in memory");
        mem.contents()
    });
    let opts = OpenOptions {
        read_only: false,
        ..open_options("qcow2")
    };
    img_core::open::open_storage(storage(template, false), &opts).expect("the template image opens")
}

/// Plays `data` as everything a client sends on one NBD connection (negotiation, then
/// requests with their payloads) to the server, and reads and discards what it answers.
pub fn nbd_session(data: &[u8]) -> Reached {
    static IGNORE_SIGPIPE: Once = Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects; the fuzzer's
    // own main does not ignore SIGPIPE as a Rust main does, and a server replying to a client
    // that stopped reading must get EPIPE rather than die.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let export = nbd_server::Export {
        name: String::new(),
        description: Some("fuzz".into()),
        image: Arc::new(nbd_image()),
        read_only: false,
    };
    let (server, client) = UnixStream::pair().expect("a socket pair");
    let mut sender = client.try_clone().expect("a second handle");
    let mut receiver = client;
    let answered = std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = sender.write_all(data);
            let _ = sender.shutdown(Shutdown::Write);
        });
        let drain = scope.spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0u64;
            while let Ok(n @ 1..) = receiver.read(&mut sink) {
                total += n as u64;
            }
            total
        });
        let _ = nbd_server::serve_connection(blockdev::nbd::Stream::Unix(server), &export, None);
        drain.join().unwrap_or(0)
    });
    // The server's greeting alone is 18 bytes; a session that got further was negotiated.
    Reached {
        opened: answered > 18,
        bytes_read: answered,
    }
}

/// What a target does with one input.
pub type Target = fn(&[u8]) -> Reached;

/// Every target by name, as the fuzz directory and the regression tests call them.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2_image", qcow2_image),
    ("qcow2_write", qcow2_write),
    ("vmdk_image", vmdk_image),
    ("nbd_session", nbd_session),
];
