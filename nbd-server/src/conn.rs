//! One client connection: negotiation, then transmission.

use crate::{error_code, Export};
use blockdev::nbd::proto::*;
use blockdev::nbd::Stream;
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex};

/// Worker threads per connection: requests run in parallel up to this many.
const WORKERS: usize = 8;
/// Requests read ahead of the workers.
const QUEUE: usize = 8;
/// Write payload bytes a connection may hold at once (read but not yet written). One
/// request of up to [`MAX_PAYLOAD`] is always let through, so this bounds a connection's
/// payload memory to `PAYLOAD_BUDGET + MAX_PAYLOAD` whatever the client sends.
const PAYLOAD_BUDGET: u64 = 64 << 20;
/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Context id of base:allocation.
const ALLOCATION_ID: u32 = 1;
/// Most extents in one block status reply.
const MAX_EXTENTS: usize = 65536;

/// What negotiation settled.
struct Session {
    structured: bool,
    allocation: bool,
    no_zeroes: bool,
}

/// Why negotiation ended.
enum Negotiated {
    /// Enter transmission.
    Go,
    /// The client went away or aborted.
    Close,
}

/// Serves one client on `stream` until it disconnects. Errors are the connection's (a client
/// that misbehaves is disconnected); requests that fail get NBD errors instead. A client that
/// leaves the server waiting longer than `handshake_limit` for a negotiation message is
/// disconnected (qemu-nbd's `--handshake-limit`).
pub fn serve_connection(
    stream: Stream,
    export: &Export,
    handshake_limit: Option<std::time::Duration>,
) -> io::Result<()> {
    stream.set_read_timeout(handshake_limit)?;
    let mut r = stream;
    let mut w = r.try_clone()?;
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    let cflags = read_u32(&mut r)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol_error(format!("unknown client flags {cflags:#x}")));
    }
    let mut session = Session {
        structured: false,
        allocation: false,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
    };
    match negotiate(&mut r, &mut w, export, &mut session)? {
        Negotiated::Close => Ok(()),
        Negotiated::Go => {
            // Transmission may idle as long as the client likes.
            r.set_read_timeout(None)?;
            transmission(r, w, export, &session)
        }
    }
}

fn negotiate(
    r: &mut Stream,
    w: &mut Stream,
    export: &Export,
    session: &mut Session,
) -> io::Result<Negotiated> {
    loop {
        let magic = match read_u64(r) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Close),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            if option == OPT_EXPORT_NAME {
                // No error can be sent for EXPORT_NAME: hang up, as the protocol says.
                return Ok(Negotiated::Close);
            }
            skip(r, len as u64)?;
            write_option_reply(w, option, REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        let reply = |w: &mut Stream, kind: u32, d: &[u8]| write_option_reply(w, option, kind, d);
        match option {
            OPT_EXPORT_NAME => {
                if data != export.name.as_bytes() {
                    return Ok(Negotiated::Close);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.image.size().to_be_bytes());
                b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !session.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b)?;
                return Ok(Negotiated::Go);
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is no matter.
                let _ = reply(w, REP_ACK, &[]);
                return Ok(Negotiated::Close);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut b = Vec::new();
                put_string(&mut b, &export.name);
                if let Some(d) = &export.description {
                    b.extend_from_slice(d.as_bytes());
                }
                reply(w, REP_SERVER, &b)?;
                reply(w, REP_ACK, &[])?;
            }
            OPT_STARTTLS => reply(w, REP_ERR_POLICY, b"TLS not configured")?,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(w, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                } else {
                    session.structured = true;
                    reply(w, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload::new(&data);
                let parsed = (|| -> io::Result<(String, Vec<u16>)> {
                    let name = p.string()?;
                    let n = p.u16()?;
                    let mut infos = Vec::new();
                    for _ in 0..n {
                        infos.push(p.u16()?);
                    }
                    if p.remaining() != 0 {
                        return Err(protocol_error("trailing data"));
                    }
                    Ok((name, infos))
                })();
                let Ok((name, infos)) = parsed else {
                    reply(w, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if name != export.name {
                    let msg = format!("export '{name}' not present");
                    reply(w, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                let mut b = INFO_EXPORT.to_be_bytes().to_vec();
                b.extend_from_slice(&export.image.size().to_be_bytes());
                b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                reply(w, REP_INFO, &b)?;
                if infos.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(export.name.as_bytes());
                    reply(w, REP_INFO, &b)?;
                }
                if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &export.description) {
                    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    b.extend_from_slice(d.as_bytes());
                    reply(w, REP_INFO, &b)?;
                }
                // Always sent: clients that did not ask may still honour it, and the maximum
                // tells them where we refuse.
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(w, REP_INFO, &b)?;
                reply(w, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Negotiated::Go);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set && !session.structured {
                    reply(w, REP_ERR_INVALID, b"structured replies not negotiated")?;
                    continue;
                }
                let mut p = Payload::new(&data);
                let parsed = (|| -> io::Result<(String, Vec<String>)> {
                    let name = p.string()?;
                    let n = p.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        // Each query holds at least its length: a count larger than the data
                        // runs out of data here, before anything large is allocated.
                        queries.push(p.string()?);
                    }
                    if p.remaining() != 0 {
                        return Err(protocol_error("trailing data"));
                    }
                    Ok((name, queries))
                })();
                let Ok((name, queries)) = parsed else {
                    reply(w, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if name != export.name {
                    let msg = format!("export '{name}' not present");
                    reply(w, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                let matches = if set {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                if set {
                    session.allocation = matches;
                }
                if matches {
                    let mut b = (if set { ALLOCATION_ID } else { 0 }).to_be_bytes().to_vec();
                    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(w, REP_META_CONTEXT, &b)?;
                }
                reply(w, REP_ACK, &[])?;
            }
            _ => reply(w, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// A request read and ready to run.
struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// The state shared by a connection's workers.
struct Shared<'a> {
    export: &'a Export,
    writer: Mutex<Stream>,
    structured: bool,
    allocation: bool,
    /// Write payload bytes held (see [`PAYLOAD_BUDGET`]).
    held: Mutex<u64>,
    released: Condvar,
}

fn transmission(mut r: Stream, w: Stream, export: &Export, session: &Session) -> io::Result<()> {
    let shared = Shared {
        export,
        writer: Mutex::new(w),
        structured: session.structured,
        allocation: session.allocation,
        held: Mutex::new(0),
        released: Condvar::new(),
    };
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| worker(&rx, &shared));
        }
        let result = read_requests(&mut r, &tx, &shared);
        // Dropping the sender lets the workers finish what is queued and stop.
        drop(tx);
        result
    })
}

fn worker(rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    // Read buffers are reused: fresh zeroed allocations per request cost page faults and a
    // memset each.
    let mut scratch = Vec::new();
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let bytes = job.payload.len() as u64;
        let sent = run(shared, job, &mut scratch);
        if bytes > 0 {
            *shared.held.lock().unwrap_or_else(|e| e.into_inner()) -= bytes;
            shared.released.notify_all();
        }
        if sent.is_err() {
            // The reply could not be sent: the connection is gone. Shut it so the reader
            // stops too.
            if let Ok(w) = shared.writer.lock() {
                w.shutdown();
            }
        }
    }
}

fn read_requests(
    r: &mut Stream,
    tx: &std::sync::mpsc::SyncSender<Job>,
    shared: &Shared,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&header)?;
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                // Drain the payload in small pieces to stay in step, and refuse.
                skip(r, req.length as u64)?;
                send_error(shared, &req, EINVAL, "request too large")?;
                continue;
            }
            {
                let mut held = shared.held.lock().unwrap_or_else(|e| e.into_inner());
                while *held > 0 && *held + req.length as u64 > PAYLOAD_BUDGET {
                    held = shared
                        .released
                        .wait(held)
                        .unwrap_or_else(|e| e.into_inner());
                }
                *held += req.length as u64;
            }
            // Read into spare capacity: no zeroing of what the socket overwrites anyway.
            payload = Vec::with_capacity(req.length as usize);
            let got = Read::by_ref(r)
                .take(req.length as u64)
                .read_to_end(&mut payload)?;
            if got != req.length as usize {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if req.kind == CMD_DISC {
            return Ok(());
        }
        if tx.send(Job { req, payload }).is_err() {
            return Ok(());
        }
    }
}

fn send_error(shared: &Shared, req: &Request, code: u32, msg: &str) -> io::Result<()> {
    let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    if shared.structured {
        let m = &msg.as_bytes()[..msg.len().min(MAX_STRING as usize)];
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(&(m.len() as u16).to_be_bytes());
        body.extend_from_slice(m);
        let h = chunk_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            body.len() as u32,
        );
        write_all_vectored(&mut *w, &[&h, &body])
    } else {
        w.write_all(&simple_reply(req.cookie, code))
    }
}

fn send_ok(shared: &Shared, req: &Request) -> io::Result<()> {
    let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    if shared.structured {
        let h = chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        w.write_all(&h)
    } else {
        w.write_all(&simple_reply(req.cookie, 0))
    }
}

/// Runs one request and sends its reply.
fn run(shared: &Shared, job: Job, scratch: &mut Vec<u8>) -> io::Result<()> {
    let Job { req, payload } = job;
    let export = shared.export;
    let image = &export.image;
    let size = image.size();
    let in_range = req
        .offset
        .checked_add(req.length as u64)
        .is_some_and(|e| e <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.is_read_only() {
        return send_error(shared, &req, EPERM, "export is read-only");
    }
    if matches!(
        req.kind,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_CACHE
    ) && !in_range
    {
        let code = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return send_error(shared, &req, code, "request past the end of the export");
    }
    let fua = |res: img_core::Result<()>| -> img_core::Result<()> {
        res?;
        if req.flags & CMD_FLAG_FUA != 0 {
            image.flush()?;
        }
        Ok(())
    };
    let outcome = match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return send_error(shared, &req, EINVAL, "request too large");
            }
            return read(shared, &req, scratch);
        }
        CMD_WRITE => fua(image.write_at(&payload, req.offset)),
        CMD_FLUSH => image.flush(),
        CMD_TRIM => fua(image.discard(req.offset, req.length as u64)),
        CMD_WRITE_ZEROES => {
            let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            fua(image.write_zeroes(req.offset, req.length as u64, unmap))
        }
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => {
            if !shared.allocation || req.length == 0 {
                return send_error(shared, &req, EINVAL, "no metadata context selected");
            }
            return block_status(shared, &req);
        }
        _ => return send_error(shared, &req, EINVAL, "unknown command"),
    };
    match outcome {
        Ok(()) => send_ok(shared, &req),
        Err(e) => send_error(shared, &req, error_code(&e), &e.to_string()),
    }
}

/// The segments of a read: (length, reads as zeros).
fn segments(shared: &Shared, offset: u64, len: u64) -> img_core::Result<Vec<(u64, bool)>> {
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let st = shared.export.image.block_status(pos, end - pos)?;
        let n = st.len.clamp(1, end - pos);
        match out.last_mut() {
            Some(last) if last.1 == st.zero => last.0 += n,
            _ => out.push((n, st.zero)),
        }
        pos += n;
    }
    Ok(out)
}

/// Reuse at most this much read buffer per worker; larger reads get their own.
const SCRATCH_KEEP: usize = 4 << 20;

fn read(shared: &Shared, req: &Request, scratch: &mut Vec<u8>) -> io::Result<()> {
    let image = &shared.export.image;
    let len = req.length as u64;
    let sparse = shared.structured && req.flags & CMD_FLAG_DF == 0 && len > 0;
    let segs = if sparse {
        match segments(shared, req.offset, len) {
            Ok(s) => s,
            Err(e) => return send_error(shared, req, error_code(&e), &e.to_string()),
        }
    } else {
        vec![(len, false)]
    };
    let mut own;
    let buf: &mut [u8] = if len as usize <= SCRATCH_KEEP {
        if scratch.len() < len as usize {
            scratch.resize(len as usize, 0);
        }
        &mut scratch[..len as usize]
    } else {
        own = vec![0u8; len as usize];
        &mut own
    };
    let mut at = 0u64;
    for &(n, zero) in &segs {
        if !zero {
            let slice = &mut buf[at as usize..(at + n) as usize];
            if let Err(e) = image.read_at(slice, req.offset + at) {
                return send_error(shared, req, error_code(&e), &e.to_string());
            }
        }
        at += n;
    }
    let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    if !shared.structured {
        return write_all_vectored(&mut *w, &[&simple_reply(req.cookie, 0), buf]);
    }
    if len == 0 {
        return w.write_all(&chunk_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            0,
        ));
    }
    // One vectored write for the whole reply: headers interleaved with the data.
    let mut heads: Vec<Vec<u8>> = Vec::with_capacity(segs.len());
    let mut at = 0u64;
    for (i, &(n, zero)) in segs.iter().enumerate() {
        let flags = if i + 1 == segs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let off = req.offset + at;
        let mut h = Vec::with_capacity(32);
        if zero {
            h.extend_from_slice(&chunk_header(req.cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12));
            h.extend_from_slice(&off.to_be_bytes());
            h.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            let clen = 8 + n as u32;
            h.extend_from_slice(&chunk_header(
                req.cookie,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                clen,
            ));
            h.extend_from_slice(&off.to_be_bytes());
        }
        heads.push(h);
        at += n;
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(segs.len() * 2);
    let mut at = 0usize;
    for (h, &(n, zero)) in heads.iter().zip(&segs) {
        parts.push(h);
        if !zero {
            parts.push(&buf[at..at + n as usize]);
        }
        at += n as usize;
    }
    // Long replies go in batches of iovecs (the kernel takes at most 1024 at once).
    for batch in parts.chunks(512) {
        write_all_vectored(&mut *w, batch)?;
    }
    Ok(())
}

fn block_status(shared: &Shared, req: &Request) -> io::Result<()> {
    let image = &shared.export.image;
    let end = req.offset + req.length as u64;
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut pos = req.offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let st = match image.block_status(pos, end - pos) {
            Ok(s) => s,
            Err(e) => return send_error(shared, req, error_code(&e), &e.to_string()),
        };
        let n = st.len.clamp(1, end - pos);
        let flags = (if st.data { 0 } else { STATE_HOLE }) | (if st.zero { STATE_ZERO } else { 0 });
        match extents.last_mut() {
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => {
                if one && !extents.is_empty() {
                    break;
                }
                extents.push((n as u32, flags));
            }
        }
        pos += n;
    }
    let mut body = Vec::with_capacity(4 + extents.len() * 8);
    body.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
    for (l, f) in &extents {
        body.extend_from_slice(&l.to_be_bytes());
        body.extend_from_slice(&f.to_be_bytes());
    }
    let h = chunk_header(
        req.cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        body.len() as u32,
    );
    let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    write_all_vectored(&mut *w, &[&h, &body])
}
