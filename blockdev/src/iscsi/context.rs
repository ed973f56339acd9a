//! A safe wrapper around one libiscsi session to one LUN: login, and the synchronous SCSI
//! commands the storage needs. Each command returns a [`Task`] that frees libiscsi's task when
//! dropped; a status other than GOOD becomes an [`IscsiError::Scsi`].

use super::{IscsiError, IscsiUrl};
use libiscsi_sys as sys;
use std::ffi::{CStr, CString};
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

/// The initiator name we log in with (targets may restrict access by it).
const INITIATOR: &str = "iqn.2026-11.org.img:initiator";

/// Attempts libiscsi makes to log in again after the connection drops (each waits longer than
/// the one before) before failing the commands in flight.
const RECONNECT_RETRIES: c_int = 4;

/// How often one command is reissued after UNIT ATTENTION (each new condition, such as power on
/// then a changed capacity, is reported once).
const UNIT_ATTENTION_RETRIES: u32 = 4;

/// Capacity and provisioning facts from READ CAPACITY(16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Logical block provisioning management enabled (the LUN is thin).
    pub lbpme: bool,
    /// Unmapped blocks read as zeros.
    pub lbprz: bool,
}

/// What the Block Limits and Logical Block Provisioning VPD pages say (zeros: no limit given or
/// the page is missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Maximum transfer length in blocks.
    pub max_xfer_blocks: u32,
    /// Maximum blocks one UNMAP may name.
    pub max_unmap_blocks: u32,
    /// Maximum blocks of one WRITE SAME.
    pub max_write_same_blocks: u64,
    /// The target supports UNMAP.
    pub unmap: bool,
    /// The target supports WRITE SAME(16) with the UNMAP bit.
    pub write_same_unmap: bool,
}

/// A logged-in libiscsi session to one LUN.
pub struct Context {
    ctx: NonNull<sys::iscsi_context>,
    lun: c_int,
    /// Where we logged in, to log in afresh after the session failed for good.
    url: IscsiUrl,
    /// The session failed for good (libiscsi gave up logging in again) and `ctx` is a fresh,
    /// not logged-in context: the next command logs in first.
    broken: bool,
}

// SAFETY: a libiscsi context has no thread affinity (no thread-local state, the socket is just
// a descriptor); it must only not be used by two threads at once, which `&mut self` on every
// command guarantees (the storage keeps the context behind a Mutex).
unsafe impl Send for Context {}

impl Context {
    /// Creates a context and logs in to `url` (full connect: TCP, login, and a TEST UNIT READY
    /// that clears the initial UNIT ATTENTION).
    pub fn connect(url: &IscsiUrl) -> Result<Context, IscsiError> {
        let initiator = CString::new(INITIATOR).expect("no NUL in the initiator name");
        // The first iSCSI name a process opens loads libiscsi (see libiscsi_sys::library).
        let lib = sys::library().map_err(IscsiError::Session)?;
        // SAFETY: `initiator` is a valid NUL-terminated string for the call; libiscsi copies it.
        let raw = unsafe { lib.iscsi_create_context(initiator.as_ptr()) };
        let ctx = NonNull::new(raw)
            .ok_or_else(|| IscsiError::Session("could not create an iSCSI context".into()))?;
        // From here `Drop` destroys the context on every early return.
        let me = Context {
            ctx,
            lun: c_int::from(url.lun),
            url: url.clone(),
            broken: false,
        };
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| IscsiError::Url(format!("NUL byte in the {what}")))
        };
        let target = cstr(&url.target, "target name")?;
        let portal = cstr(&url.portal(), "host")?;
        // SAFETY: the context is live; the strings outlive the calls, which copy them.
        let rc = unsafe {
            let mut rc = sys::loaded().iscsi_set_targetname(me.raw(), target.as_ptr());
            rc |= sys::loaded()
                .iscsi_set_session_type(me.raw(), sys::iscsi_session_type::ISCSI_SESSION_NORMAL);
            rc |= sys::loaded().iscsi_set_header_digest(
                me.raw(),
                sys::iscsi_header_digest::ISCSI_HEADER_DIGEST_NONE_CRC32C,
            );
            rc
        };
        if rc != 0 {
            return Err(me.session_error("setting up the session"));
        }
        if let Some(user) = &url.user {
            let user = cstr(user, "user name")?;
            let pw = cstr(url.password.as_deref().unwrap_or(""), "password")?;
            // SAFETY: live context; the strings outlive the call, which copies them.
            if unsafe {
                sys::loaded().iscsi_set_initiator_username_pwd(me.raw(), user.as_ptr(), pw.as_ptr())
            } != 0
            {
                return Err(me.session_error("setting the CHAP credentials"));
            }
        }
        // libiscsi logs in again after a dropped connection, by default forever: a target that
        // is gone for good would hang every request. After this many failed attempts the
        // pending commands fail instead.
        // SAFETY: live context; the call only stores the number.
        unsafe { sys::loaded().iscsi_set_reconnect_max_retries(me.raw(), RECONNECT_RETRIES) };
        // SAFETY: live context, valid portal string; blocks until logged in or failed.
        if unsafe { sys::loaded().iscsi_full_connect_sync(me.raw(), portal.as_ptr(), me.lun) } != 0
        {
            // qemu's words, so that scripts matching them keep working.
            return Err(me.session_error("iSCSI: Failed to connect to LUN "));
        }
        Ok(me)
    }

    fn raw(&self) -> *mut sys::iscsi_context {
        self.ctx.as_ptr()
    }

    /// libiscsi's message for the last failure, prefixed by what we were doing.
    fn session_error(&self, doing: &str) -> IscsiError {
        // SAFETY: live context; iscsi_get_error returns a pointer into the context (or NULL)
        // that stays valid until the next call on it, and we copy it at once.
        let msg = unsafe {
            let p = sys::loaded().iscsi_get_error(self.raw());
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let msg = if msg.is_empty() {
            "unknown error".into()
        } else {
            msg
        };
        IscsiError::Session(format!("{doing}: {msg}"))
    }

    /// Checks a finished command: NULL (transport failure) or a bad status is an error.
    /// Issues a command with `issue` and checks it (see [`Context::finish`]). A UNIT ATTENTION
    /// is retried: after libiscsi logs in again behind our back (a restarted target, a dropped
    /// connection), the new session's first command reports one (power on or bus reset) though
    /// nothing is wrong with the data, and the command was not executed.
    fn run(
        &self,
        command: &'static str,
        mut issue: impl FnMut() -> *mut sys::scsi_task,
    ) -> Result<Task, IscsiError> {
        let mut tries = 0;
        if self.broken {
            return Err(IscsiError::Session(format!(
                "{command}: the session is down and logging in again failed"
            )));
        }
        loop {
            match self.finish(command, issue()) {
                Err(e) if e.is_unit_attention() && tries < UNIT_ATTENTION_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    fn finish(&self, command: &'static str, task: *mut sys::scsi_task) -> Result<Task, IscsiError> {
        let task = Task(NonNull::new(task).ok_or_else(|| self.session_error(command))?);
        let status = task.get().status as u32;
        self.check(command, task, status)
    }

    /// Checks a completed command's `status` (the task's own, or the one its callback got).
    fn check(&self, command: &'static str, task: Task, status: u32) -> Result<Task, IscsiError> {
        if status == sys::scsi_status::SCSI_STATUS_GOOD {
            return Ok(task);
        }
        let t = task.get();
        let name = status_name(status);
        let (sense, key) = if status == sys::scsi_status::SCSI_STATUS_CHECK_CONDITION {
            // SAFETY: the two functions return pointers to static strings (or NULL).
            let words = unsafe {
                (
                    static_str(sys::loaded().scsi_sense_key_str(t.sense.key as c_int)),
                    static_str(sys::loaded().scsi_sense_ascq_str(t.sense.ascq)),
                )
            };
            (Some(format!("{}, {}", words.0, words.1)), t.sense.key)
        } else if status >= sys::scsi_status::SCSI_STATUS_CANCELLED {
            // libiscsi's own failures (timeout, connection error) leave a message in the context.
            let IscsiError::Session(m) = self.session_error(command) else {
                unreachable!()
            };
            (Some(m), 0)
        } else {
            (None, 0)
        };
        Err(IscsiError::Scsi {
            command,
            status: name,
            sense,
            key,
        })
    }

    /// READ CAPACITY(16).
    pub fn read_capacity(&mut self) -> Result<Capacity, IscsiError> {
        self.ready()?;
        // SAFETY: live context, used by this thread alone (`&mut self`).
        let task = self.run("READ CAPACITY(16)", || unsafe {
            sys::loaded().iscsi_readcapacity16_sync(self.raw(), self.lun)
        })?;
        let rc: &sys::scsi_readcapacity16 = task
            .unmarshall()
            .ok_or_else(|| IscsiError::Protocol("malformed READ CAPACITY(16) data".into()))?;
        if rc.block_length == 0 || !rc.block_length.is_multiple_of(512) {
            return Err(IscsiError::Protocol(format!(
                "unsupported logical block size {}",
                rc.block_length
            )));
        }
        Ok(Capacity {
            blocks: rc.returned_lba + 1,
            block_size: rc.block_length,
            lbpme: rc.lbpme != 0,
            lbprz: rc.lbprz != 0,
        })
    }

    /// The Block Limits and Logical Block Provisioning VPD pages; a target without them gets
    /// the defaults (no limits known, no UNMAP).
    pub fn limits(&mut self) -> Limits {
        let mut l = Limits::default();
        let bl = sys::scsi_inquiry_pagecode::SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS;
        let lbp = sys::scsi_inquiry_pagecode::SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING;
        if let Ok(task) = self.inquiry(bl) {
            if let Some(p) = task.unmarshall::<sys::scsi_inquiry_block_limits>() {
                l.max_xfer_blocks = p.max_xfer_len;
                l.max_unmap_blocks = p.max_unmap;
                l.max_write_same_blocks = p.max_ws_len;
            }
        }
        if let Ok(task) = self.inquiry(lbp) {
            if let Some(p) = task.unmarshall::<sys::scsi_inquiry_logical_block_provisioning>() {
                l.unmap = p.lbpu != 0;
                l.write_same_unmap = p.lbpws != 0;
            }
        }
        l
    }

    fn inquiry(&mut self, page: u32) -> Result<Task, IscsiError> {
        // SAFETY: live context, exclusive use.
        self.run("INQUIRY", || unsafe {
            sys::loaded().iscsi_inquiry_sync(self.raw(), self.lun, 1, page as c_int, 255)
        })
    }

    /// READ(16) of `buf.len() / block_size` blocks at `lba` into `buf`.
    pub fn read16(&mut self, lba: u64, buf: &mut [u8], block_size: u32) -> Result<(), IscsiError> {
        self.ready()?;
        let len = u32::try_from(buf.len()).expect("callers split reads below 4 GiB");
        // SAFETY: live context, exclusive use.
        let task = self.run("READ(16)", || unsafe {
            sys::loaded().iscsi_read16_sync(
                self.raw(),
                self.lun,
                lba,
                len,
                block_size as c_int,
                0,
                0,
                0,
                0,
                0,
            )
        })?;
        let data = task.data_in();
        if data.len() != buf.len() {
            return Err(IscsiError::Protocol(format!(
                "READ(16) returned {} bytes instead of {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(data);
        Ok(())
    }

    /// WRITE(16) of `buf` (a whole number of blocks) at `lba`.
    pub fn write16(&mut self, lba: u64, buf: &[u8], block_size: u32) -> Result<(), IscsiError> {
        self.ready()?;
        let len = u32::try_from(buf.len()).expect("callers split writes below 4 GiB");
        // SAFETY: live context, exclusive use. libiscsi takes a `*mut` but only reads the data-out
        // buffer, and the synchronous call is done with it before returning, while `buf` lives.
        self.run("WRITE(16)", || unsafe {
            sys::loaded().iscsi_write16_sync(
                self.raw(),
                self.lun,
                lba,
                buf.as_ptr() as *mut u8,
                len,
                block_size as c_int,
                0,
                0,
                0,
                0,
                0,
            )
        })
        .map(drop)
    }

    /// SYNCHRONIZE CACHE(16) of the whole LUN, or (10) if the target refuses (16).
    pub fn synchronize_cache(&mut self) -> Result<(), IscsiError> {
        self.ready()?;
        // SAFETY: live context, exclusive use; LBA 0 and 0 blocks mean the whole medium.
        let r16 = self.run("SYNCHRONIZE CACHE(16)", || unsafe {
            sys::loaded().iscsi_synchronizecache16_sync(self.raw(), self.lun, 0, 0, 0, 0)
        });
        match r16 {
            Err(e) if e.is_illegal_request() => {
                // SAFETY: as above.
                self.run("SYNCHRONIZE CACHE(10)", || unsafe {
                    sys::loaded().iscsi_synchronizecache10_sync(self.raw(), self.lun, 0, 0, 0, 0)
                })
                .map(drop)
            }
            r => r.map(drop),
        }
    }

    /// UNMAP of `blocks` blocks at `lba` (one descriptor).
    pub fn unmap(&mut self, lba: u64, blocks: u32) -> Result<(), IscsiError> {
        self.ready()?;
        let mut list = sys::unmap_list { lba, num: blocks };
        // SAFETY: live context, exclusive use; `list` is one valid descriptor that outlives the
        // synchronous call.
        self.run("UNMAP", || unsafe {
            sys::loaded().iscsi_unmap_sync(self.raw(), self.lun, 0, 0, &mut list, 1)
        })
        .map(drop)
    }

    /// WRITE SAME(16) of one block of zeros over `blocks` blocks at `lba`, with the UNMAP bit
    /// when `unmap` (the target may then deallocate them; they read as zeros either way).
    pub fn write_same_zeroes(
        &mut self,
        lba: u64,
        blocks: u32,
        block_size: u32,
        unmap: bool,
    ) -> Result<(), IscsiError> {
        self.ready()?;
        let zeros = vec![0u8; block_size as usize];
        // SAFETY: live context, exclusive use; `zeros` is one block, only read, and outlives the
        // synchronous call.
        self.run("WRITE SAME(16)", || unsafe {
            sys::loaded().iscsi_writesame16_sync(
                self.raw(),
                self.lun,
                lba,
                zeros.as_ptr() as *mut u8,
                block_size,
                blocks,
                0,
                c_int::from(unmap),
                0,
                0,
            )
        })
        .map(drop)
    }

    /// GET LBA STATUS at `lba`: whether the run of blocks starting there is mapped, and how many
    /// blocks the run has (0 when the target's answer does not start at `lba`).
    pub fn lba_status(&mut self, lba: u64) -> Result<(bool, u64), IscsiError> {
        self.ready()?;
        // SAFETY: live context, exclusive use. 16 bytes of parameter data hold the header and
        // the one descriptor we look at.
        let task = self.run("GET LBA STATUS", || unsafe {
            sys::loaded().iscsi_get_lba_status_sync(self.raw(), self.lun, lba, 8 + 16)
        })?;
        let status: &sys::scsi_get_lba_status = task
            .unmarshall()
            .ok_or_else(|| IscsiError::Protocol("malformed GET LBA STATUS data".into()))?;
        if status.num_descriptors == 0 || status.descriptors.is_null() {
            return Ok((true, 0));
        }
        // SAFETY: libiscsi decoded `num_descriptors` (at least one) descriptors into memory
        // owned by the task, which outlives this borrow.
        let d = unsafe { &*status.descriptors };
        if d.lba != lba {
            // The first descriptor must start at the LBA asked for; anything else is a target
            // we do not understand, and "mapped" is always a safe answer.
            return Ok((true, 0));
        }
        let mapped = d.provisioning == sys::scsi_provisioning_type::SCSI_PROVISIONING_TYPE_MAPPED;
        Ok((mapped, u64::from(d.num_blocks)))
    }

    /// Runs READ(16)/WRITE(16) commands with up to `depth` of them in flight on this session
    /// (libiscsi's task API and our own poll loop, the same loop libiscsi's synchronous calls
    /// run, so reconnection behaves as it does for them). Reads land directly in the caller's
    /// buffers. Commands that report UNIT ATTENTION are reissued (see [`Context::run`]). On a
    /// failure no new command is started, the ones in flight are waited for (or, when the
    /// session itself fails, cancelled), and the first error is returned with the index of its
    /// command. Every buffer is released by libiscsi before this returns.
    pub fn run_batch(
        &mut self,
        ios: &mut [Io<'_>],
        block_size: u32,
        depth: usize,
    ) -> Result<(), (usize, IscsiError)> {
        self.ready().map_err(|e| (0, e))?;
        let mut slots: Vec<Slot> = (0..ios.len()).map(|_| Slot::default()).collect();
        let depth = depth.max(1);
        let mut next = 0;
        let mut in_flight = 0usize;
        let mut failed: Option<(usize, IscsiError)> = None;
        loop {
            while failed.is_none() && in_flight < depth && next < ios.len() {
                if let Err(e) = self.submit(&mut ios[next], &mut slots[next], block_size) {
                    failed = Some((next, e));
                    break;
                }
                next += 1;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            if let Err(e) = self.wait_events() {
                // libiscsi gave up on the session (it could not log in again). Our commands
                // may sit in queues we cannot reach (a reconnection's), so the whole context
                // goes: destroying it cancels or frees every queued command, after which
                // nothing in libiscsi refers to our buffers or slots any more.
                self.abandon();
                for slot in slots.iter_mut().filter(|s| !s.task.is_null()) {
                    slot.done = true;
                    slot.status = sys::scsi_status::SCSI_STATUS_CANCELLED as c_int;
                }
                failed.get_or_insert((next.saturating_sub(1), e));
            }
            for (i, slot) in slots.iter_mut().enumerate() {
                if !slot.done || slot.task.is_null() {
                    continue;
                }
                in_flight -= 1;
                let task = Task(NonNull::new(slot.task).expect("checked above"));
                let status = slot.status as u32;
                slot.task = std::ptr::null_mut();
                slot.done = false;
                let command = ios[i].command();
                let result = self
                    .check(command, task, status)
                    .and_then(|t| ios[i].verify(&t));
                match result {
                    Ok(()) => {}
                    Err(e)
                        if e.is_unit_attention()
                            && slot.tries < UNIT_ATTENTION_RETRIES
                            && failed.is_none() =>
                    {
                        slot.tries += 1;
                        match self.submit(&mut ios[i], slot, block_size) {
                            Ok(()) => in_flight += 1,
                            Err(e) => {
                                failed.get_or_insert((i, e));
                            }
                        }
                    }
                    Err(e) => {
                        failed.get_or_insert((i, e));
                    }
                }
            }
        }
        match failed {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Destroys the failed session's context (cancelling whatever it still holds) and leaves a
    /// fresh, not logged-in one marked broken; [`Context::relogin`] logs in again.
    fn abandon(&mut self) {
        let initiator = CString::new(INITIATOR).expect("no NUL in the initiator name");
        // SAFETY: the initiator string is valid for the call; libiscsi copies it.
        let fresh = NonNull::new(unsafe { sys::loaded().iscsi_create_context(initiator.as_ptr()) });
        // SAFETY: the old context is live and ours; destroying it runs the callbacks of the
        // commands it holds (their slots are still alive) and frees its queues. It is not used
        // afterwards: `ctx` is replaced right away.
        unsafe { sys::loaded().iscsi_destroy_context(self.raw()) };
        match fresh {
            Some(fresh) => self.ctx = fresh,
            // Out of memory for a small struct: `ctx` must stay a valid pointer for Drop and
            // there is no sane way on.
            None => panic!("libiscsi could not allocate a context"),
        }
        self.broken = true;
    }

    /// Logs in again first if the session was abandoned.
    fn ready(&mut self) -> Result<(), IscsiError> {
        if self.broken {
            self.relogin()?;
        }
        Ok(())
    }

    /// Logs in again after [`Context::abandon`].
    fn relogin(&mut self) -> Result<(), IscsiError> {
        let fresh = Context::connect(&self.url)?;
        // The old (not logged-in) context is dropped, i.e. destroyed, here.
        *self = fresh;
        Ok(())
    }

    /// Queues one command of a batch; its callback fills `slot`.
    fn submit(
        &mut self,
        io: &mut Io<'_>,
        slot: &mut Slot,
        block_size: u32,
    ) -> Result<(), IscsiError> {
        let private = slot as *mut Slot as *mut c_void;
        let bs = block_size as c_int;
        // SAFETY (all three calls): live context, exclusive use (`&mut self`). The buffers and
        // `slot` outlive the command: `run_batch` does not return before every command it
        // queued has completed or been cancelled, and `slots` is never resized meanwhile.
        let task = match io {
            Io::Read { lba, buf } => unsafe {
                let len = u32::try_from(buf.len()).expect("callers split reads below 4 GiB");
                let t = sys::loaded().iscsi_read16_task(
                    self.raw(),
                    self.lun,
                    *lba,
                    len,
                    bs,
                    0,
                    0,
                    0,
                    0,
                    0,
                    Some(on_done),
                    private,
                );
                // Data-in goes straight into the caller's buffer (no copy from libiscsi's);
                // nothing is read before the next iscsi_service, so adding it now is in time.
                if !t.is_null()
                    && sys::loaded().scsi_task_add_data_in_buffer(t, len as c_int, buf.as_mut_ptr())
                        != 0
                {
                    sys::loaded().iscsi_scsi_cancel_task(self.raw(), t);
                    return Err(IscsiError::Session("could not attach a read buffer".into()));
                }
                t
            },
            Io::Write { lba, buf } => unsafe {
                let len = u32::try_from(buf.len()).expect("callers split writes below 4 GiB");
                // libiscsi takes a `*mut` but only reads the data-out buffer.
                sys::loaded().iscsi_write16_task(
                    self.raw(),
                    self.lun,
                    *lba,
                    buf.as_ptr() as *mut u8,
                    len,
                    bs,
                    0,
                    0,
                    0,
                    0,
                    0,
                    Some(on_done),
                    private,
                )
            },
        };
        if task.is_null() {
            return Err(self.session_error(io.command()));
        }
        slot.task = task;
        slot.done = false;
        Ok(())
    }

    /// Waits for the session's socket and lets libiscsi process what came: completions run
    /// the callbacks. The socket is polled even when libiscsi wants no events (it is waiting
    /// to log in again): an error or hang-up on it is still reported, and passing it on is
    /// what drives libiscsi's reconnection (and its giving up after the set retries). The
    /// wait is short then, and libiscsi is called on every wake-up, even without events, so
    /// that its reconnection timer and command timeouts are looked at.
    fn wait_events(&mut self) -> Result<(), IscsiError> {
        // SAFETY: live context, exclusive use.
        let (fd, events) = unsafe {
            (
                sys::loaded().iscsi_get_fd(self.raw()),
                sys::loaded().iscsi_which_events(self.raw()),
            )
        };
        let mut pfd = libc::pollfd {
            fd,
            events: events as i16,
            revents: 0,
        };
        let timeout = if events == 0 { 100 } else { 1000 };
        // SAFETY: one valid pollfd (poll ignores a negative descriptor and just waits).
        let revents = match unsafe { libc::poll(&mut pfd, 1, timeout) } {
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    return Ok(());
                }
                return Err(IscsiError::Session(format!("poll: {e}")));
            }
            0 => 0,
            _ => c_int::from(pfd.revents),
        };
        if events == 0 && revents != 0 {
            // Waiting to log in again, with the dead socket reporting its hang-up at once on
            // every poll: pace the loop instead of spinning until libiscsi's next attempt.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: live context, exclusive use.
        if unsafe { sys::loaded().iscsi_service(self.raw(), revents) } < 0 {
            return Err(self.session_error("iscsi_service"));
        }
        Ok(())
    }
}

/// One command of [`Context::run_batch`].
pub enum Io<'a> {
    /// READ(16) of `buf.len()` bytes (whole blocks) at `lba` into `buf`.
    Read {
        /// First block.
        lba: u64,
        /// Where the data goes.
        buf: &'a mut [u8],
    },
    /// WRITE(16) of `buf` (whole blocks) at `lba`.
    Write {
        /// First block.
        lba: u64,
        /// The data.
        buf: &'a [u8],
    },
}

impl Io<'_> {
    fn command(&self) -> &'static str {
        match self {
            Io::Read { .. } => "READ(16)",
            Io::Write { .. } => "WRITE(16)",
        }
    }

    /// A read must have filled its whole buffer.
    fn verify(&self, task: &Task) -> Result<(), IscsiError> {
        let t = task.get();
        if let Io::Read { buf, .. } = self {
            if t.residual_status == sys::scsi_residual::SCSI_RESIDUAL_UNDERFLOW && t.residual > 0 {
                return Err(IscsiError::Protocol(format!(
                    "READ(16) returned {} bytes instead of {}",
                    buf.len().saturating_sub(t.residual),
                    buf.len()
                )));
            }
        }
        Ok(())
    }
}

/// Where a queued command's callback leaves its result.
struct Slot {
    /// The task while queued or completed and not yet looked at; NULL otherwise.
    task: *mut sys::scsi_task,
    /// Set by the callback.
    done: bool,
    /// The status the callback got.
    status: c_int,
    /// UNIT ATTENTION reissues so far.
    tries: u32,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            task: std::ptr::null_mut(),
            done: false,
            status: 0,
            tries: 0,
        }
    }
}

/// libiscsi's completion callback for [`Context::run_batch`]: records the status in the slot.
unsafe extern "C" fn on_done(
    _ctx: *mut sys::iscsi_context,
    status: c_int,
    command_data: *mut c_void,
    private: *mut c_void,
) {
    // SAFETY: `private` is the `Slot` given at submission, alive and not otherwise borrowed
    // while libiscsi runs callbacks inside iscsi_service/iscsi_scsi_cancel_task (called from
    // `run_batch`, which only touches the slots between those calls).
    let slot = unsafe { &mut *(private as *mut Slot) };
    if !command_data.is_null() {
        slot.task = command_data as *mut sys::scsi_task;
    }
    slot.status = status;
    slot.done = true;
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is live and owned by us; destroy logs out, closes the socket and
        // frees it; nothing uses the pointer afterwards.
        unsafe {
            sys::loaded().iscsi_destroy_context(self.raw());
        }
    }
}

/// A finished SCSI task, freed on drop.
pub struct Task(NonNull<sys::scsi_task>);

impl Task {
    fn get(&self) -> &sys::scsi_task {
        // SAFETY: the task is live until drop, and nothing else mutates it (its command has
        // completed).
        unsafe { self.0.as_ref() }
    }

    /// The data-in buffer of the command.
    fn data_in(&self) -> &[u8] {
        let d = &self.get().datain;
        if d.data.is_null() || d.size <= 0 {
            return &[];
        }
        // SAFETY: libiscsi allocated `size` bytes at `data` for the task; they live as long as
        // the task, which the returned borrow cannot outlive.
        unsafe { std::slice::from_raw_parts(d.data, d.size as usize) }
    }

    /// The decoded data-in of the command, as the struct libiscsi decodes it into. `T` must be
    /// the struct that matches the command (the callers above pair them).
    fn unmarshall<T>(&self) -> Option<&T> {
        // SAFETY: the task is live and complete; libiscsi decodes into memory owned by the task
        // (freed with it), of the type that matches the command's CDB, which the caller chose.
        unsafe {
            let p = sys::loaded().scsi_datain_unmarshall(self.0.as_ptr());
            (p as *const T).as_ref()
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // SAFETY: the task was returned by a synchronous libiscsi call, is complete, and is freed
        // exactly once, here.
        unsafe { sys::loaded().scsi_free_scsi_task(self.0.as_ptr()) }
    }
}

/// A static C string from libiscsi, or "?" for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that lives for the whole program.
unsafe fn static_str(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        "?".into()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn status_name(status: u32) -> String {
    use sys::scsi_status as s;
    match status {
        s::SCSI_STATUS_CHECK_CONDITION => "CHECK CONDITION".into(),
        s::SCSI_STATUS_BUSY => "BUSY".into(),
        s::SCSI_STATUS_RESERVATION_CONFLICT => "RESERVATION CONFLICT".into(),
        s::SCSI_STATUS_TASK_SET_FULL => "TASK SET FULL".into(),
        s::SCSI_STATUS_TASK_ABORTED => "TASK ABORTED".into(),
        s::SCSI_STATUS_CANCELLED => "cancelled".into(),
        s::SCSI_STATUS_ERROR => "transport error".into(),
        s::SCSI_STATUS_TIMEOUT => "timeout".into(),
        other => format!("status {other:#x}"),
    }
}
