//! A FUSE export: an [`img_core::Image`] of any format (raw, qcow2, vmdk, a backing chain)
//! shown as one regular file holding the raw disk contents, as qemu-storage-daemon's FUSE
//! export does.
//!
//! # Why `fuser`
//!
//! The kernel side of FUSE is a message protocol on `/dev/fuse`; writing it ourselves would
//! mean re-deriving the ABI structures of every opcode and the INIT negotiation. The `fuser`
//! crate (version 0.18) is pure Rust (no libfuse needed at build or run time: with
//! `default-features = false` it mounts with mount(2) directly when the process may, which is
//! the case for root, and falls back to the `fusermount3` helper of Debian's `fuse3` package
//! otherwise), it implements every request this export needs (`lseek` for
//! SEEK_DATA/SEEK_HOLE, `fallocate`, `fsync`, `flush`), its filesystem trait takes `&self`,
//! and it runs several request loops on cloned `/dev/fuse` descriptors
//! (`FUSE_DEV_IOC_CLONE`), so requests are served in parallel at no cost to us: [`Image`]'s
//! methods are `&self` and thread-safe. What it does not do (run as a daemon, signals,
//! finding the daemon of a mount) is in the `img mount` command.
//!
//! # Semantics
//!
//! - The mount point may be a regular file, which the image is mounted over (as qemu does),
//!   or a directory, in which the image appears as one file named like the image file
//!   ([`ExportOptions::file_name`], by default the image's file name without its
//!   directory).
//! - The file's size is the virtual disk size. Reads past the end are short; writes that
//!   start at or past the end fail with `ENOSPC` (as on a block device), writes that cross
//!   it are short. The size cannot change: truncating to another size fails with `EPERM`.
//! - `fsync` and `flush` (every `close`) flush the image; unmounting flushes and closes it.
//! - `fallocate(PUNCH_HOLE | KEEP_SIZE)` writes zeros allowing the format to deallocate
//!   (qcow2 zero clusters), `fallocate(ZERO_RANGE)` writes zeros keeping the allocation;
//!   plain allocation inside the disk fails with `EOPNOTSUPP`, as in qemu.
//! - `lseek(SEEK_DATA / SEEK_HOLE)` follows the image's block status (through the backing
//!   chain), so `cp --sparse`, `qemu-img` and other probing tools see the holes.
//! - The file is opened for direct I/O (no page cache copy; `mmap` works where the kernel
//!   allows mmap of direct-I/O files), and writes to it may run in parallel.
//! - A read-only export is mounted read-only: opening the file for writing fails with
//!   `EROFS`; write requests that still arrive fail with `EACCES`.
//! - Any failure of the image becomes `EIO` (`ENOSPC` when the storage is full), and is
//!   logged with the file and offset through [`ExportOptions::log`].

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request, SessionACL,
    TimeOrNow, WriteFlags,
};
use img_core::Image;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attributes never change behind the kernel's back except through us, so they may be cached
/// for a while; one second, as qemu.
const TTL: Duration = Duration::from_secs(1);

/// Inode of the mount's root: the image itself for a file mount point, else the directory.
const ROOT: INodeNo = INodeNo(1);
/// Inode of the image inside a directory mount point.
const IMAGE_INO: INodeNo = INodeNo(2);

/// The largest read the export serves at once (the kernel asks for at most `max_read`).
const MAX_READ: u32 = 1 << 20;

/// Why an export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The mount point does not exist or cannot be examined.
    #[error("Failed to stat '{path}': {source}")]
    MountPoint {
        /// The mount point.
        path: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The mount point is neither a regular file nor a directory.
    #[error("'{0}' is neither a regular file nor a directory")]
    MountPointType(String),
    /// The image is read-only but a writable export was asked for.
    #[error("'{0}': cannot export a read-only image writable")]
    ReadOnlyImage(String),
    /// Mounting failed.
    #[error("Failed to mount '{path}': {source}")]
    Mount {
        /// The mount point.
        path: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The request loop ended with an error.
    #[error("FUSE session on '{path}' failed: {source}")]
    Session {
        /// The mount point.
        path: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Flushing or closing the image at the end failed.
    #[error("{0}")]
    Close(#[from] img_core::Error),
}

/// A logger for request failures (the export runs detached from any terminal as a daemon).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// How to export an image.
pub struct ExportOptions {
    /// Refuse writes (also implied by an image opened read-only).
    pub read_only: bool,
    /// Name of the file inside a directory mount point; `None` takes the image's file name.
    pub file_name: Option<OsString>,
    /// Request loops run in parallel (at least 1).
    pub threads: usize,
    /// Shown as the mount's source in `/proc/mounts` (`findmnt`); `None` shows the image's
    /// path.
    pub fs_name: Option<String>,
    /// Where request failures are reported.
    pub log: Log,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            read_only: false,
            file_name: None,
            threads: 4,
            fs_name: None,
            log: Arc::new(|m| eprintln!("{m}")),
        }
    }
}

/// What the mount point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountKind {
    /// A regular file: the mount's root is the image.
    File,
    /// A directory: the mount's root is a directory holding the image as one file.
    Directory,
}

/// The filesystem handed to fuser: one image, one file.
struct ImageFs {
    /// `None` once closed at the end of the session.
    image: Option<Image>,
    writable: bool,
    kind: MountKind,
    name: OsString,
    /// Permission bits of the image file (`chmod` may change them, as with qemu).
    mode: AtomicU32,
    uid: u32,
    gid: u32,
    /// Seconds since the epoch of the last write (the file's mtime), mount time at first.
    mtime: AtomicU64,
    /// Path of the top image file, for `st_blocks`.
    host_path: PathBuf,
    log: Log,
    /// The result of closing the image, filled in by `destroy`.
    closed: Arc<Mutex<Option<img_core::Result<()>>>>,
}

/// A mounted export; [`Export::run`] serves requests until it is unmounted.
pub struct Export {
    session: fuser::Session<ImageFs>,
    mountpoint: PathBuf,
    kind: MountKind,
    closed: Arc<Mutex<Option<img_core::Result<()>>>>,
}

/// Unmounts an export from another thread (a signal handler thread, for example).
pub struct Unmounter {
    mountpoint: PathBuf,
}

impl Unmounter {
    /// Unmounts the export, which ends [`Export::run`]. A busy mount (a loop device or an open
    /// file on it) is detached lazily: the request loop then ends once the last user is gone.
    pub fn unmount(&self) -> std::io::Result<()> {
        unmount_path(&self.mountpoint)
    }
}

/// Unmounts the FUSE mount at `path` with umount(2), lazily when it is busy, and through
/// `fusermount3 -u` when the process may not unmount itself (not root).
pub fn unmount_path(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        Some(libc::EPERM) => {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(path)
                .status()?;
            if status.success() {
                Ok(())
            } else {
                Err(err)
            }
        }
        _ => Err(err),
    }
}

impl Export {
    /// Mounts `image` at `mountpoint` (a regular file or a directory) and completes the
    /// FUSE handshake: when this returns, the file is live. Requests are served only once
    /// [`Export::run`] is called.
    pub fn mount(
        image: Image,
        mountpoint: &Path,
        opts: ExportOptions,
    ) -> Result<Self, ExportError> {
        let shown = mountpoint.display().to_string();
        let meta = std::fs::metadata(mountpoint).map_err(|source| ExportError::MountPoint {
            path: shown.clone(),
            source,
        })?;
        let kind = if meta.is_file() {
            MountKind::File
        } else if meta.is_dir() {
            MountKind::Directory
        } else {
            return Err(ExportError::MountPointType(shown));
        };
        let writable = !opts.read_only;
        if writable && image.is_read_only() {
            return Err(ExportError::ReadOnlyImage(image.file_name().to_string()));
        }
        let host_path = PathBuf::from(image.file_name());
        let name = opts.file_name.clone().unwrap_or_else(|| {
            host_path
                .file_name()
                .map(OsStr::to_os_string)
                .unwrap_or_else(|| OsString::from("image"))
        });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let closed = Arc::new(Mutex::new(None));
        let fs_name = opts
            .fs_name
            .clone()
            .unwrap_or_else(|| image.file_name().to_string());
        let fs = ImageFs {
            image: Some(image),
            writable,
            kind,
            name,
            mode: AtomicU32::new(if writable { 0o600 } else { 0o400 }),
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            mtime: AtomicU64::new(now),
            host_path,
            log: opts.log.clone(),
            closed: closed.clone(),
        };
        let mut mount_options = vec![
            // mount(2) takes the source as it is, but fusermount3 (used when not root)
            // splits its option string at commas. `img unmount` finds the daemon through
            // this name when it is the image's path, which has no comma in practice.
            MountOption::FSName(fs_name.replace(',', "_")),
            MountOption::Subtype("img".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoAtime,
            MountOption::CUSTOM(format!("max_read={MAX_READ}")),
        ];
        mount_options.push(if writable {
            MountOption::RW
        } else {
            MountOption::RO
        });
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = SessionACL::Owner;
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let session =
            fuser::Session::new(fs, mountpoint, &config).map_err(|source| ExportError::Mount {
                path: shown.clone(),
                source,
            })?;
        Ok(Export {
            session,
            mountpoint: mountpoint
                .canonicalize()
                .unwrap_or_else(|_| mountpoint.to_path_buf()),
            kind,
            closed,
        })
    }

    /// Whether the image was mounted over a file or into a directory.
    pub fn kind(&self) -> MountKind {
        self.kind
    }

    /// A handle that unmounts the export from another thread.
    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mountpoint: self.mountpoint.clone(),
        }
    }

    /// Serves requests until the export is unmounted (by [`Unmounter::unmount`], `umount`
    /// or `fusermount3 -u`), then flushes and closes the image and reports how that went.
    pub fn run(self) -> Result<(), ExportError> {
        let path = self.mountpoint.display().to_string();
        let result = self.session.run();
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner()).take();
        result.map_err(|source| ExportError::Session { path, source })?;
        match closed {
            Some(r) => r.map_err(ExportError::Close),
            None => Ok(()),
        }
    }
}

/// The errno a failed image request becomes: `ENOSPC`/`EDQUOT` from the storage are kept
/// (a writer can act on them), everything else is an I/O error.
fn errno_of(e: &img_core::Error) -> Errno {
    if let img_core::Error::ReadOnly { .. } = e {
        return Errno::EACCES;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(code @ (libc::ENOSPC | libc::EDQUOT)) = io.raw_os_error() {
                return Errno::from_i32(code);
            }
        }
        source = s.source();
    }
    Errno::EIO
}

impl ImageFs {
    fn image(&self) -> Result<&Image, Errno> {
        self.image.as_ref().ok_or(Errno::ENODEV)
    }

    fn size(&self) -> u64 {
        self.image.as_ref().map_or(0, Image::size)
    }

    /// Whether `ino` is the image file.
    fn is_image(&self, ino: INodeNo) -> bool {
        match self.kind {
            MountKind::File => ino == ROOT,
            MountKind::Directory => ino == IMAGE_INO,
        }
    }

    fn fail(&self, op: &str, offset: u64, len: u64, e: &img_core::Error) -> Errno {
        (self.log)(&format!(
            "img mount: {op} of {len} bytes at offset {offset} of '{}' failed: {e}",
            self.host_path.display()
        ));
        errno_of(e)
    }

    fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.mtime.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        if let Ok(d) = SystemTime::now().duration_since(UNIX_EPOCH) {
            self.mtime.store(d.as_secs(), Ordering::Relaxed);
        }
    }

    fn image_attr(&self) -> FileAttr {
        let size = self.size();
        // As qemu: the space the image file takes, or the disk size where that is unknown.
        let blocks = std::fs::metadata(&self.host_path)
            .map(|m| m.blocks())
            .ok()
            .filter(|&b| b > 0)
            .unwrap_or(size.div_ceil(512));
        let t = self.time();
        FileAttr {
            ino: match self.kind {
                MountKind::File => ROOT,
                MountKind::Directory => IMAGE_INO,
            },
            size,
            blocks,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: self.mode.load(Ordering::Relaxed) as u16,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn dir_attr(&self) -> FileAttr {
        let t = self.time();
        FileAttr {
            ino: ROOT,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::Directory,
            perm: if self.writable { 0o700 } else { 0o500 },
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if self.is_image(ino) {
            Some(self.image_attr())
        } else if self.kind == MountKind::Directory && ino == ROOT {
            Some(self.dir_attr())
        } else {
            None
        }
    }

    /// SEEK_DATA / SEEK_HOLE from `offset`, following the block status of the chain.
    fn seek(&self, offset: u64, data: bool) -> Result<u64, Errno> {
        let image = self.image()?;
        let size = image.size();
        if offset >= size {
            return Err(Errno::ENXIO);
        }
        let mut pos = offset;
        while pos < size {
            let st = image
                .block_status(pos, size - pos)
                .map_err(|e| self.fail("block status", pos, size - pos, &e))?;
            if st.data == data {
                return Ok(pos);
            }
            // A zero-length answer would loop forever; treat it as corrupt metadata.
            if st.len == 0 {
                (self.log)(&format!(
                    "img mount: block status at offset {pos} returned an empty extent"
                ));
                return Err(Errno::EIO);
            }
            pos = pos.saturating_add(st.len).min(size);
        }
        // The end of the disk is an implicit hole; there is no data past it.
        if data {
            Err(Errno::ENXIO)
        } else {
            Ok(size)
        }
    }

    fn do_fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let image = self.image()?;
        if !self.writable {
            return Err(Errno::EACCES);
        }
        let size = image.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let supported =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
            // Plain allocation: the disk's range exists already; growing is not supported.
            return Err(if end > size {
                Errno::EFBIG
            } else {
                Errno::EOPNOTSUPP
            });
        }
        if end > size && !keep_size {
            // Zeroing past the end would grow the file.
            return Err(Errno::EFBIG);
        }
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        image
            .write_zeroes(offset, end - offset, punch)
            .map_err(|e| self.fail("fallocate", offset, end - offset, &e))?;
        self.touch();
        Ok(())
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel's defaults are fine where it refuses larger values.
        let _ = config.set_max_write(MAX_READ);
        let _ = config.set_max_readahead(MAX_READ);
        // mmap of a direct-I/O file, where the kernel has it (6.6 on); without it mmap fails
        // with ENODEV, as with qemu.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(image) = self.image.take() {
            let r = image.close();
            if let Err(e) = &r {
                (self.log)(&format!("img mount: closing the image failed: {e}"));
            }
            *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.kind == MountKind::Directory && parent == ROOT && name == self.name.as_os_str() {
            reply.entry(&TTL, &self.image_attr(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if !self.is_image(ino) {
            // The directory's attributes are fixed.
            return reply.error(Errno::EPERM);
        }
        if flags.is_some() {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if uid.is_some_and(|u| u != self.uid) || gid.is_some_and(|g| g != self.gid) {
            return reply.error(Errno::EPERM);
        }
        if let Some(s) = size {
            if !self.writable {
                return reply.error(Errno::EACCES);
            }
            // The disk cannot be resized through the export (qemu's non-growable export
            // without resize permission); truncating to its own size is a no-op.
            if s != self.size() {
                return reply.error(Errno::EPERM);
            }
        }
        if let Some(m) = mode {
            if !self.writable && m & 0o222 != 0 {
                return reply.error(Errno::EROFS);
            }
            self.mode.store(m & 0o7777, Ordering::Relaxed);
        }
        // Times are not stored: the export's mtime follows writes.
        reply.attr(&TTL, &self.image_attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.is_image(ino) {
            return reply.error(Errno::EISDIR);
        }
        if !self.writable && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: every request reaches the image, with no second copy of the data in
        // the page cache and no stale cache if the image is read elsewhere.
        // Writes to different ranges may run in parallel: the image orders overlapping
        // allocations itself.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if !self.is_image(ino) {
            return reply.error(Errno::EISDIR);
        }
        let image = match self.image() {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let disk = image.size();
        if offset >= disk {
            return reply.data(&[]);
        }
        // Short at the end of the disk; never more than we told the kernel to send.
        let len = u64::from(size.min(MAX_READ)).min(disk - offset) as usize;
        let mut buf = vec![0u8; len];
        match image.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(self.fail("read", offset, len as u64, &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.is_image(ino) {
            return reply.error(Errno::EISDIR);
        }
        let image = match self.image() {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if !self.writable {
            return reply.error(Errno::EACCES);
        }
        let disk = image.size();
        if data.is_empty() {
            return reply.written(0);
        }
        if offset >= disk {
            // The disk cannot grow: as a block device, no space past its end.
            return reply.error(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(disk - offset) as usize;
        match image.write_at(&data[..len], offset) {
            Ok(()) => {
                self.touch();
                reply.written(len as u32)
            }
            Err(e) => reply.error(self.fail("write", offset, len as u64, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.fsync_reply(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_reply(reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.kind == MountKind::Directory && ino == ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.kind != MountKind::Directory || ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (IMAGE_INO, FileType::RegularFile, self.name.as_os_str()),
        ];
        // The offset of an entry is the index of the one after it.
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.is_image(ino) {
            return reply.error(Errno::EISDIR);
        }
        match self.do_fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if !self.is_image(ino) {
            return reply.error(Errno::EINVAL);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let found = match whence {
            libc::SEEK_DATA => self.seek(offset, true),
            libc::SEEK_HOLE => self.seek(offset, false),
            _ => Err(Errno::EINVAL),
        };
        match found {
            // Offsets below the disk size fit an i64 (the block layer's maximum length).
            Ok(pos) => reply.offset(i64::try_from(pos).unwrap_or(i64::MAX)),
            Err(e) => reply.error(e),
        }
    }
}

impl ImageFs {
    fn fsync_reply(&self, reply: ReplyEmpty) {
        let image = match self.image() {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if !self.writable {
            return reply.ok();
        }
        match image.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("flush", 0, 0, &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_full_keeps_its_errno() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = img_core::Error::Storage(blockdev_io_error(io));
        assert_eq!(errno_of(&e), Errno::ENOSPC);
        let e = img_core::Error::Corrupt {
            file: "f".into(),
            offset: 0,
            reason: "bad".into(),
        };
        assert_eq!(errno_of(&e), Errno::EIO);
        let e = img_core::Error::ReadOnly { file: "f".into() };
        assert_eq!(errno_of(&e), Errno::EACCES);
    }

    /// The filesystem over a fresh 4 MiB qcow2 image (64 KiB clusters) with data at 1 MiB.
    fn fs(dir: &Path, writable: bool) -> ImageFs {
        let path = dir.join("t.qcow2");
        img_core::qcow2::create(
            &path,
            &img_core::qcow2::Qcow2CreateOptions {
                size: 4 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let open = |read_only| {
            img_core::open_image(
                &path,
                &img_core::OpenOptions {
                    format: Some("qcow2".into()),
                    read_only,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let image = open(false);
        image.write_at(&[0xaa; 100_000], 1 << 20).unwrap();
        image.close().unwrap();
        ImageFs {
            image: Some(open(!writable)),
            writable,
            kind: MountKind::File,
            name: "t.qcow2".into(),
            mode: AtomicU32::new(0o600),
            uid: 0,
            gid: 0,
            mtime: AtomicU64::new(0),
            host_path: path,
            log: Arc::new(|_| {}),
            closed: Arc::new(Mutex::new(None)),
        }
    }

    #[test]
    fn seek_follows_the_allocation_and_ends_at_the_disk_end() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path(), false);
        let mib = 1u64 << 20;
        assert_eq!(fs.seek(0, true), Ok(mib));
        assert_eq!(fs.seek(mib + 5, true), Ok(mib + 5));
        // 100_000 bytes written: the data runs to the end of their second cluster.
        assert_eq!(fs.seek(mib, false), Ok(mib + 128 * 1024));
        assert_eq!(fs.seek(2 * mib, true), Err(Errno::ENXIO));
        assert_eq!(fs.seek(2 * mib, false), Ok(2 * mib));
        assert_eq!(fs.seek(4 * mib, false), Err(Errno::ENXIO));
        assert_eq!(fs.seek(u64::MAX, true), Err(Errno::ENXIO));
    }

    #[test]
    fn fallocate_refuses_what_it_cannot_do_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path(), true);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(fs.do_fallocate(u64::MAX, 2, punch), Err(Errno::EFBIG));
        assert_eq!(fs.do_fallocate(0, 4096, 0), Err(Errno::EOPNOTSUPP));
        assert_eq!(fs.do_fallocate(4 << 20, 4096, 0), Err(Errno::EFBIG));
        assert_eq!(
            fs.do_fallocate(0, 4096, libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            fs.do_fallocate((4 << 20) - 512, 4096, libc::FALLOC_FL_ZERO_RANGE),
            Err(Errno::EFBIG)
        );
        // Past the end with KEEP_SIZE: clamped, or nothing to do.
        assert_eq!(fs.do_fallocate((4 << 20) - 512, 4096, punch), Ok(()));
        assert_eq!(fs.do_fallocate(8 << 20, 4096, punch), Ok(()));
        assert_eq!(fs.do_fallocate(1 << 20, 1000, punch), Ok(()));
        let mut buf = vec![1u8; 1000];
        fs.image().unwrap().read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let ro = fs_read_only(dir.path());
        assert_eq!(ro.do_fallocate(0, 4096, punch), Err(Errno::EACCES));
    }

    fn fs_read_only(dir: &Path) -> ImageFs {
        let sub = dir.join("ro");
        std::fs::create_dir(&sub).unwrap();
        fs(&sub, false)
    }

    fn blockdev_io_error(source: std::io::Error) -> blockdev::Error {
        blockdev::Error::Open {
            name: "f".into(),
            source,
        }
    }
}
