//! The NBD client: [`NbdStorage`], a [`Storage`] over an export.
//!
//! One connection carries every request. Callers on any thread write their request under a
//! writer lock and wait on a slot of their own; one reader thread reads the replies and matches
//! them to slots by cookie, writing read data straight into the slot's buffer. Requests thus
//! overlap on the wire as qemu's do, which works with servers (like qemu-nbd by default) that
//! accept a single connection. A broken connection or a malformed reply fails every request in
//! flight and every later one; nothing waits forever on a server that went away.

use super::proto::*;
use super::{NbdAddress, Stream};
use crate::{Alignment, Allocation, Error, Result, Storage};
use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Largest range of one TRIM/WRITE_ZEROES/BLOCK_STATUS request (no payload, so only the
/// 32-bit length field limits it; kept well below so servers with 32-bit offsets cope).
const MAX_RANGE: u64 = 1 << 30;
/// Largest block status reply chunk accepted (bounds memory whatever the server sends).
const MAX_STATUS_CHUNK: u32 = 1 << 20;
/// Largest error chunk accepted.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING + 8;

/// What the handshake learned about the export.
#[derive(Clone, Copy, Debug)]
struct ExportInfo {
    size: u64,
    flags: u16,
    min_block: u32,
    max_payload: u32,
    structured: bool,
    allocation_context: Option<u32>,
}

/// The caller's buffer a READ reply lands in: read straight from the socket into it, with
/// no copy.
struct Dest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced (by the reader thread) under the slot's lock while
// the slot is not done; the caller that owns the buffer blocks until it sees the slot done
// under the same lock, so the buffer outlives every access and is never accessed from two
// threads at once.
unsafe impl Send for Dest {}

impl Default for Dest {
    fn default() -> Self {
        Dest {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

impl Dest {
    /// The bytes `at..at + n` of the caller's buffer (bounds checked).
    fn slice(&mut self, at: usize, n: usize) -> io::Result<&mut [u8]> {
        if at.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(protocol_error("reply outside the read buffer"));
        }
        // SAFETY: in bounds of a live buffer (see the Send impl), and the returned borrow of
        // `self` keeps this the only reference to it.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) })
    }
}

/// The state of one request in flight.
#[derive(Default)]
struct SlotState {
    /// READ: where the data goes (zeros where the server sent holes).
    buf: Dest,
    /// Bytes of `buf` covered by data and hole chunks.
    covered: u64,
    /// The server's error, with its message if it gave one.
    error: Option<(u32, String)>,
    /// BLOCK_STATUS: (length, flags) extents.
    extents: Vec<(u32, u32)>,
    /// The connection failed before the reply completed.
    failed: Option<String>,
    done: bool,
}

struct Slot {
    kind: u16,
    offset: u64,
    len: u32,
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl Slot {
    fn finish(&self, f: impl FnOnce(&mut SlotState)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.done = true;
        self.ready.notify_all();
    }
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<u64, Arc<Slot>>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Conn {
    writer: Mutex<Stream>,
    state: Mutex<ConnState>,
    next_cookie: AtomicU64,
    info: ExportInfo,
}

impl Conn {
    fn fail_all(&self, why: String) {
        let pending = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.dead.is_none() {
                st.dead = Some(why.clone());
            }
            std::mem::take(&mut st.pending)
        };
        for slot in pending.into_values() {
            slot.finish(|s| s.failed = Some(why.clone()));
        }
    }

    fn slot(&self, cookie: u64, remove: bool) -> io::Result<Arc<Slot>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = if remove {
            st.pending.remove(&cookie)
        } else {
            st.pending.get(&cookie).cloned()
        };
        slot.ok_or_else(|| protocol_error(format!("reply for unknown cookie {cookie:#x}")))
    }

    /// The reader thread: reads replies until the connection ends or misbehaves.
    fn read_replies(&self, mut r: Stream) {
        let why = match self.read_loop(&mut r) {
            Ok(()) => "Connection closed by server".to_string(),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "Connection closed by server".to_string()
            }
            Err(e) => e.to_string(),
        };
        self.fail_all(why);
    }

    fn read_loop(&self, r: &mut Stream) -> io::Result<()> {
        loop {
            let magic = match read_u32(r) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = read_u32(r)?;
                    let cookie = read_u64(r)?;
                    // The slot stays registered until its reply is read whole, so that a
                    // failure on the way fails it too.
                    let slot = self.slot(cookie, false)?;
                    if slot.kind == CMD_READ && error == 0 {
                        if self.info.structured {
                            return Err(protocol_error(
                                "simple reply with data after structured replies were negotiated",
                            ));
                        }
                        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                        if s.done {
                            return Err(protocol_error("reply to a finished request"));
                        }
                        let len = s.buf.len;
                        r.read_exact(s.buf.slice(0, len)?)?;
                        s.covered = slot.len as u64;
                        drop(s);
                    }
                    self.slot(cookie, true)?;
                    slot.finish(|s| {
                        if error != 0 {
                            s.error = Some((error, String::new()));
                        }
                    });
                }
                STRUCTURED_REPLY_MAGIC if self.info.structured => {
                    let flags = read_u16(r)?;
                    let kind = read_u16(r)?;
                    let cookie = read_u64(r)?;
                    let length = read_u32(r)?;
                    let done = flags & REPLY_FLAG_DONE != 0;
                    let slot = self.slot(cookie, false)?;
                    self.read_chunk(r, &slot, kind, length)?;
                    if done {
                        self.slot(cookie, true)?;
                        slot.finish(|_| {});
                    }
                }
                other => return Err(protocol_error(format!("bad reply magic {other:#x}"))),
            }
        }
    }

    fn read_chunk(&self, r: &mut Stream, slot: &Slot, kind: u16, length: u32) -> io::Result<()> {
        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.done {
            // Failed meanwhile (its caller may have gone): its buffer must not be touched.
            return Err(protocol_error("reply to a finished request"));
        }
        let start = slot.offset;
        let end = slot.offset + slot.len as u64;
        match kind {
            REPLY_TYPE_NONE if length == 0 => {}
            REPLY_TYPE_OFFSET_DATA if slot.kind == CMD_READ => {
                if length < 8 || length - 8 > slot.len {
                    return Err(protocol_error(format!("bad data chunk length {length}")));
                }
                let off = read_u64(r)?;
                let n = (length - 8) as u64;
                if off < start || off.checked_add(n).is_none_or(|e| e > end) {
                    return Err(protocol_error(format!(
                        "data chunk at {off:#x} outside the request"
                    )));
                }
                let at = (off - start) as usize;
                r.read_exact(s.buf.slice(at, n as usize)?)?;
                s.covered += n;
            }
            REPLY_TYPE_OFFSET_HOLE if slot.kind == CMD_READ => {
                if length != 12 {
                    return Err(protocol_error(format!("bad hole chunk length {length}")));
                }
                let off = read_u64(r)?;
                let n = read_u32(r)? as u64;
                if off < start || off + n > end {
                    return Err(protocol_error(format!(
                        "hole chunk at {off:#x} outside the request"
                    )));
                }
                let at = (off - start) as usize;
                s.buf.slice(at, n as usize)?.fill(0);
                s.covered += n;
            }
            REPLY_TYPE_BLOCK_STATUS if slot.kind == CMD_BLOCK_STATUS => {
                if !(12..=MAX_STATUS_CHUNK).contains(&length) || !(length - 4).is_multiple_of(8) {
                    return Err(protocol_error(format!(
                        "bad block status chunk length {length}"
                    )));
                }
                let mut data = vec![0u8; length as usize];
                r.read_exact(&mut data)?;
                let mut p = Payload::new(&data);
                let id = p.u32()?;
                if Some(id) != self.info.allocation_context {
                    // Only base:allocation was asked for; other contexts are ignored.
                    return Ok(());
                }
                while p.remaining() > 0 {
                    let len = p.u32()?;
                    let flags = p.u32()?;
                    s.extents.push((len, flags));
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                    return Err(protocol_error(format!("bad error chunk length {length}")));
                }
                let mut data = vec![0u8; length as usize];
                r.read_exact(&mut data)?;
                let mut p = Payload::new(&data);
                let code = p.u32()?;
                let mlen = p.u16()? as usize;
                let msg = String::from_utf8_lossy(p.bytes(mlen)?).into_owned();
                // An error must carry an error; 0 would read as success.
                s.error = Some((if code == 0 { EIO } else { code }, msg));
            }
            other => {
                return Err(protocol_error(format!(
                    "unexpected reply chunk type {other} (length {length})"
                )))
            }
        }
        Ok(())
    }
}

/// An NBD export opened as storage.
pub struct NbdStorage {
    name: String,
    conn: Arc<Conn>,
    /// Shuts the socket on drop, waking the reader thread.
    control: Stream,
    reader: Option<JoinHandle<()>>,
    read_only: bool,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("name", &self.name)
            .field("size", &self.conn.info.size)
            .finish()
    }
}

fn open_error(name: &str, msg: String) -> Error {
    Error::Open {
        name: name.to_string(),
        source: io::Error::other(msg),
    }
}

/// Reads one option reply: (option, type, data), bounding the data.
fn read_option_reply(r: &mut Stream) -> io::Result<(u32, u32, Vec<u8>)> {
    let magic = read_u64(r)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(protocol_error(format!("bad option reply magic {magic:#x}")));
    }
    let option = read_u32(r)?;
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    if len > MAX_OPTION {
        return Err(protocol_error(format!(
            "option reply too long ({len} bytes)"
        )));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((option, kind, data))
}

/// A server's option error, worded for messages.
fn option_error(kind: u32, data: &[u8], export: &str) -> String {
    let text = String::from_utf8_lossy(data);
    let what = match kind {
        REP_ERR_UNKNOWN => format!("export '{export}' not present"),
        REP_ERR_POLICY => "option denied by server policy".to_string(),
        REP_ERR_TLS_REQD => "TLS negotiation required before option".to_string(),
        REP_ERR_SHUTDOWN => "server shutting down".to_string(),
        REP_ERR_INVALID => "invalid option".to_string(),
        REP_ERR_UNSUP => "option not supported".to_string(),
        REP_ERR_BLOCK_SIZE_REQD => "server wants block size negotiation".to_string(),
        _ => format!("server error {:#x}", kind & !REP_FLAG_ERROR),
    };
    if text.is_empty() {
        format!("Requested export not available\nserver reported: {what}")
    } else {
        format!("Requested export not available\nserver reported: {text}")
    }
}

/// The fixed newstyle handshake, up to transmission.
fn handshake(s: &mut Stream, export: &str) -> io::Result<std::result::Result<ExportInfo, String>> {
    if read_u64(s)? != NBDMAGIC {
        return Ok(Err("not an NBD server (bad magic)".into()));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Ok(Err("oldstyle NBD servers are not supported".into())),
        m => return Ok(Err(format!("not an NBD server (bad magic {m:#x})"))),
    }
    let hflags = read_u16(s)?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = (if fixed { FLAG_C_FIXED_NEWSTYLE } else { 0 })
        | (if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
    use std::io::Write;
    s.write_all(&cflags.to_be_bytes())?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        max_payload: MAX_PAYLOAD,
        structured: false,
        allocation_context: None,
    };
    if fixed {
        write_option(s, OPT_STRUCTURED_REPLY, &[])?;
        let (_, kind, _) = read_option_reply(s)?;
        info.structured = kind == REP_ACK;
        if info.structured {
            write_option(
                s,
                OPT_SET_META_CONTEXT,
                &encode_meta_request(export, &[BASE_ALLOCATION]),
            )?;
            loop {
                let (_, kind, data) = read_option_reply(s)?;
                match kind {
                    REP_META_CONTEXT => {
                        let mut p = Payload::new(&data);
                        let id = p.u32()?;
                        if p.rest() == BASE_ALLOCATION.as_bytes() {
                            info.allocation_context = Some(id);
                        }
                    }
                    REP_ACK => break,
                    k if k & REP_FLAG_ERROR != 0 => break,
                    k => return Err(protocol_error(format!("unexpected option reply {k}"))),
                }
            }
        }
        write_option(s, OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE]))?;
        let mut have_export = false;
        loop {
            let (_, kind, data) = read_option_reply(s)?;
            match kind {
                REP_INFO => {
                    let mut p = Payload::new(&data);
                    match p.u16()? {
                        INFO_EXPORT => {
                            info.size = p.u64()?;
                            info.flags = p.u16()?;
                            have_export = true;
                        }
                        INFO_BLOCK_SIZE => {
                            let min = p.u32()?;
                            let _preferred = p.u32()?;
                            let max = p.u32()?;
                            if !min.is_power_of_two() || min > 65536 || max < min {
                                return Ok(Err(format!(
                                    "server sent invalid block sizes (min {min}, max {max})"
                                )));
                            }
                            info.min_block = min;
                            // Align our split size down to the minimum block.
                            info.max_payload = max.min(MAX_PAYLOAD) / min * min;
                        }
                        _ => {}
                    }
                }
                REP_ACK => {
                    if !have_export {
                        return Err(protocol_error("server did not describe the export"));
                    }
                    return Ok(Ok(info));
                }
                REP_ERR_UNSUP => break,
                k if k & REP_FLAG_ERROR != 0 => return Ok(Err(option_error(k, &data, export))),
                k => return Err(protocol_error(format!("unexpected option reply {k}"))),
            }
        }
        // An old server without GO: structured replies and contexts still hold.
    }
    write_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    info.size = match read_u64(s) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err(format!(
                "Requested export not available\nserver reported: export '{export}' not present"
            )))
        }
        Err(e) => return Err(e),
    };
    info.flags = read_u16(s)?;
    if !no_zeroes {
        skip(s, 124)?;
    }
    Ok(Ok(info))
}

impl NbdStorage {
    /// Connects to the export `name` names (see [`NbdAddress::parse`]).
    /// Messages and [`Storage::name`] then use qemu's canonical name of the export.
    pub fn open(name: &str, read_only: bool) -> Result<NbdStorage> {
        let addr = NbdAddress::parse(name).map_err(|m| open_error(name, m))?;
        Self::connect(&addr.canonical(), &addr, read_only)
    }

    /// Connects to `addr`; `name` is what messages call it.
    pub fn connect(name: &str, addr: &NbdAddress, read_only: bool) -> Result<NbdStorage> {
        let mut s = Stream::connect(&addr.server).map_err(|e| {
            open_error(
                name,
                format!(
                    "Failed to connect to '{}': {}",
                    addr.server,
                    crate::os_message(&e)
                ),
            )
        })?;
        let info = match handshake(&mut s, &addr.export) {
            Ok(Ok(info)) => info,
            Ok(Err(msg)) => {
                // Leave politely, as qemu does, so the server logs no broken negotiation.
                let _ = write_option(&mut s, OPT_ABORT, &[]);
                return Err(open_error(name, msg));
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(open_error(
                name,
                "Failed to read initial magic: Unexpected end-of-file before all data were read"
                    .into(),
            )),
            Err(e) => return Err(open_error(name, format!("NBD handshake failed: {e}"))),
        };
        let reader_stream = s.try_clone().map_err(|e| open_error(name, e.to_string()))?;
        let control = s.try_clone().map_err(|e| open_error(name, e.to_string()))?;
        let conn = Arc::new(Conn {
            writer: Mutex::new(s),
            state: Mutex::new(ConnState::default()),
            next_cookie: AtomicU64::new(1),
            info,
        });
        let c = conn.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reply".into())
            .spawn(move || c.read_replies(reader_stream))
            .map_err(|e| open_error(name, e.to_string()))?;
        Ok(NbdStorage {
            name: name.to_string(),
            read_only: read_only || info.flags & TFLAG_READ_ONLY != 0,
            conn,
            control,
            reader: Some(reader),
        })
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.conn.info.flags
    }

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source,
        }
    }

    /// Sends one request and waits for its reply; a READ's data lands in `dest` (of `len`
    /// bytes).
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        dest: Option<&mut [u8]>,
    ) -> Result<SlotState> {
        let buf = match dest {
            Some(d) => Dest {
                len: d.len(),
                ptr: d.as_mut_ptr(),
            },
            None => Dest::default(),
        };
        // The borrow of `dest` ends here for the compiler, but this function does not return
        // before the reader thread is done with the buffer (the slot is done), which is what
        // the Dest contract needs.
        let slot = Arc::new(Slot {
            kind,
            offset,
            len,
            state: Mutex::new(SlotState {
                buf,
                ..Default::default()
            }),
            ready: Condvar::new(),
        });
        let conn = &self.conn;
        let cookie = conn.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = conn.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = &st.dead {
                return Err(self.io_error(op, offset, io::Error::other(why.clone())));
            }
            st.pending.insert(cookie, slot.clone());
        }
        let header = Request {
            flags,
            kind,
            cookie,
            offset,
            length: len,
        }
        .encode();
        let sent = {
            let mut w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
            match payload {
                Some(p) => write_all_vectored(&mut *w, &[&header, p]),
                None => write_all_vectored(&mut *w, &[&header]),
            }
        };
        if let Err(e) = sent {
            // The connection is broken: nothing more will be answered.
            self.control.shutdown();
            conn.fail_all(format!("Failed to send request: {}", crate::os_message(&e)));
        }
        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.done {
            s = slot.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let s = std::mem::take(&mut *s);
        if let Some(why) = s.failed {
            return Err(self.io_error(op, offset, io::Error::other(why)));
        }
        if let Some((code, msg)) = &s.error {
            let base = io::Error::from_raw_os_error(to_errno(*code));
            let source = if msg.is_empty() {
                base
            } else {
                io::Error::new(base.kind(), format!("{}: {msg}", crate::os_message(&base)))
            };
            return Err(self.io_error(op, offset, source));
        }
        Ok(s)
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.conn.info.size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            if op == "read" {
                return Err(Error::PastEnd {
                    name: self.name.clone(),
                    offset,
                    len,
                    size,
                });
            }
            return Err(self.io_error(op, offset, io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    fn has(&self, flag: u16) -> bool {
        self.conn.info.flags & flag != 0
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        let disc = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        if let Ok(mut w) = self.conn.writer.lock() {
            let _ = std::io::Write::write_all(&mut *w, &disc);
        }
        self.control.shutdown();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl Storage for NbdStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        Ok(self.conn.info.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let max = self.conn.info.max_payload as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let at = offset + done as u64;
            let dest = &mut buf[done..done + n];
            let s = self.request("read", CMD_READ, 0, at, n as u32, None, Some(dest))?;
            if s.covered != n as u64 {
                return Err(self.io_error(
                    "read",
                    at,
                    protocol_error("server reply did not cover the whole read"),
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range("write", offset, buf.len() as u64)?;
        let max = self.conn.info.max_payload as usize;
        for (i, chunk) in buf.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            self.request(
                "write",
                CMD_WRITE,
                0,
                at,
                chunk.len() as u32,
                Some(chunk),
                None,
            )?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || !self.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request("flush", CMD_FLUSH, 0, 0, 0, None, None)
            .map(drop)
    }

    fn truncate(&self, size: u64) -> Result<()> {
        crate::network::truncate_within(size, self.conn.info.size, "NBD nodes")
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range("write zeroes", offset, len)?;
        if !self.has(TFLAG_SEND_WRITE_ZEROES) {
            let zeros =
                vec![0u8; (self.conn.info.max_payload as u64).min(len).min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        let step = MAX_RANGE / self.conn.info.min_block as u64 * self.conn.info.min_block as u64;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.request(
                "write zeroes",
                CMD_WRITE_ZEROES,
                flags,
                offset + done,
                n as u32,
                None,
                None,
            )?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.has(TFLAG_SEND_TRIM) {
            return Ok(());
        }
        self.check_range("discard", offset, len)?;
        let step = MAX_RANGE / self.conn.info.min_block as u64 * self.conn.info.min_block as u64;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.request("discard", CMD_TRIM, 0, offset + done, n as u32, None, None)?;
            done += n;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let size = self.conn.info.size;
        let len = len.min(size.saturating_sub(offset));
        if self.conn.info.allocation_context.is_none() || len == 0 {
            return Ok((Allocation::Data, len));
        }
        let n = len.min(MAX_RANGE);
        let s = self.request(
            "block status",
            CMD_BLOCK_STATUS,
            0,
            offset,
            n as u32,
            None,
            None,
        )?;
        // A range reads as zeros (our Hole) when the server says so; HOLE alone only says
        // it is unallocated, which may still read as data from elsewhere.
        let kind = |flags: u32| {
            if flags & STATE_ZERO != 0 && flags & STATE_HOLE != 0 {
                Allocation::Hole
            } else {
                Allocation::Data
            }
        };
        let Some(&(first_len, first_flags)) = s.extents.first() else {
            return Err(self.io_error(
                "block status",
                offset,
                protocol_error("server sent no extents"),
            ));
        };
        if first_len == 0 {
            return Err(self.io_error(
                "block status",
                offset,
                protocol_error("server sent an empty extent"),
            ));
        }
        let status = kind(first_flags);
        let mut total = 0u64;
        for &(l, f) in &s.extents {
            if l == 0 || kind(f) != status {
                break;
            }
            total += l as u64;
        }
        Ok((status, total.min(n)))
    }

    fn alignment(&self) -> Alignment {
        Alignment {
            memory: 1,
            request: self.conn.info.min_block as usize,
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
