//! A safe wrapper around one libiscsi session to one LUN: login, and the synchronous SCSI
//! commands the storage needs. Each command returns a [`Task`] that frees libiscsi's task when
//! dropped; a status other than GOOD becomes an [`IscsiError::Scsi`].

use super::{IscsiError, IscsiUrl};
use libiscsi_sys as sys;
use std::ffi::{CStr, CString};
use std::os::raw::c_int;
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
        // SAFETY: `initiator` is a valid NUL-terminated string for the call; libiscsi copies it.
        let raw = unsafe { sys::iscsi_create_context(initiator.as_ptr()) };
        let ctx = NonNull::new(raw)
            .ok_or_else(|| IscsiError::Session("could not create an iSCSI context".into()))?;
        // From here `Drop` destroys the context on every early return.
        let me = Context {
            ctx,
            lun: c_int::from(url.lun),
        };
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| IscsiError::Url(format!("NUL byte in the {what}")))
        };
        let target = cstr(&url.target, "target name")?;
        let portal = cstr(&url.portal(), "host")?;
        // SAFETY: the context is live; the strings outlive the calls, which copy them.
        let rc = unsafe {
            let mut rc = sys::iscsi_set_targetname(me.raw(), target.as_ptr());
            rc |= sys::iscsi_set_session_type(
                me.raw(),
                sys::iscsi_session_type::ISCSI_SESSION_NORMAL,
            );
            rc |= sys::iscsi_set_header_digest(
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
                sys::iscsi_set_initiator_username_pwd(me.raw(), user.as_ptr(), pw.as_ptr())
            } != 0
            {
                return Err(me.session_error("setting the CHAP credentials"));
            }
        }
        // libiscsi logs in again after a dropped connection, by default forever: a target that
        // is gone for good would hang every request. After this many failed attempts the
        // pending commands fail instead.
        // SAFETY: live context; the call only stores the number.
        unsafe { sys::iscsi_set_reconnect_max_retries(me.raw(), RECONNECT_RETRIES) };
        // SAFETY: live context, valid portal string; blocks until logged in or failed.
        if unsafe { sys::iscsi_full_connect_sync(me.raw(), portal.as_ptr(), me.lun) } != 0 {
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
            let p = sys::iscsi_get_error(self.raw());
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
        loop {
            match self.finish(command, issue()) {
                Err(e) if e.is_unit_attention() && tries < UNIT_ATTENTION_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    fn finish(&self, command: &'static str, task: *mut sys::scsi_task) -> Result<Task, IscsiError> {
        let task = Task(NonNull::new(task).ok_or_else(|| self.session_error(command))?);
        let t = task.get();
        if t.status as u32 == sys::scsi_status::SCSI_STATUS_GOOD {
            return Ok(task);
        }
        let status = status_name(t.status as u32);
        let (sense, key) = if t.status as u32 == sys::scsi_status::SCSI_STATUS_CHECK_CONDITION {
            // SAFETY: the two functions return pointers to static strings (or NULL).
            let words = unsafe {
                (
                    static_str(sys::scsi_sense_key_str(t.sense.key as c_int)),
                    static_str(sys::scsi_sense_ascq_str(t.sense.ascq)),
                )
            };
            (Some(format!("{}, {}", words.0, words.1)), t.sense.key)
        } else if t.status as u32 >= sys::scsi_status::SCSI_STATUS_CANCELLED {
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
            status,
            sense,
            key,
        })
    }

    /// READ CAPACITY(16).
    pub fn read_capacity(&mut self) -> Result<Capacity, IscsiError> {
        // SAFETY: live context, used by this thread alone (`&mut self`).
        let task = self.run("READ CAPACITY(16)", || unsafe {
            sys::iscsi_readcapacity16_sync(self.raw(), self.lun)
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
            sys::iscsi_inquiry_sync(self.raw(), self.lun, 1, page as c_int, 255)
        })
    }

    /// READ(16) of `buf.len() / block_size` blocks at `lba` into `buf`.
    pub fn read16(&mut self, lba: u64, buf: &mut [u8], block_size: u32) -> Result<(), IscsiError> {
        let len = u32::try_from(buf.len()).expect("callers split reads below 4 GiB");
        // SAFETY: live context, exclusive use.
        let task = self.run("READ(16)", || unsafe {
            sys::iscsi_read16_sync(
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
        let len = u32::try_from(buf.len()).expect("callers split writes below 4 GiB");
        // SAFETY: live context, exclusive use. libiscsi takes a `*mut` but only reads the data-out
        // buffer, and the synchronous call is done with it before returning, while `buf` lives.
        self.run("WRITE(16)", || unsafe {
            sys::iscsi_write16_sync(
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
        // SAFETY: live context, exclusive use; LBA 0 and 0 blocks mean the whole medium.
        let r16 = self.run("SYNCHRONIZE CACHE(16)", || unsafe {
            sys::iscsi_synchronizecache16_sync(self.raw(), self.lun, 0, 0, 0, 0)
        });
        match r16 {
            Err(e) if e.is_illegal_request() => {
                // SAFETY: as above.
                self.run("SYNCHRONIZE CACHE(10)", || unsafe {
                    sys::iscsi_synchronizecache10_sync(self.raw(), self.lun, 0, 0, 0, 0)
                })
                .map(drop)
            }
            r => r.map(drop),
        }
    }

    /// UNMAP of `blocks` blocks at `lba` (one descriptor).
    pub fn unmap(&mut self, lba: u64, blocks: u32) -> Result<(), IscsiError> {
        let mut list = sys::unmap_list { lba, num: blocks };
        // SAFETY: live context, exclusive use; `list` is one valid descriptor that outlives the
        // synchronous call.
        self.run("UNMAP", || unsafe {
            sys::iscsi_unmap_sync(self.raw(), self.lun, 0, 0, &mut list, 1)
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
        let zeros = vec![0u8; block_size as usize];
        // SAFETY: live context, exclusive use; `zeros` is one block, only read, and outlives the
        // synchronous call.
        self.run("WRITE SAME(16)", || unsafe {
            sys::iscsi_writesame16_sync(
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
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is live and owned by us; destroy logs out, closes the socket and
        // frees it; nothing uses the pointer afterwards.
        unsafe {
            sys::iscsi_destroy_context(self.raw());
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
            let p = sys::scsi_datain_unmarshall(self.0.as_ptr());
            (p as *const T).as_ref()
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // SAFETY: the task was returned by a synchronous libiscsi call, is complete, and is freed
        // exactly once, here.
        unsafe { sys::scsi_free_scsi_task(self.0.as_ptr()) }
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
