//! The NBD wire protocol: constants and the encoding of the messages both ends exchange
//! (fixed newstyle negotiation, simple and structured replies, base:allocation block status).
//!
//! Everything on the wire is big-endian. The layouts follow the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`).

use std::io::{self, Read, Write};

/// First eight bytes the server sends: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation marker, and the prefix of every option request: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation marker (not served; recognised to refuse it clearly).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): the 124 zero bytes after EXPORT_NAME may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Start TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export.
pub const OPT_INFO: u32 = 6;
/// Ask about an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers (not supported: refused as unknown).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: an information item of INFO/GO.
pub const REP_INFO: u32 = 3;
/// Option reply: a selected or listed metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: option unknown.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply error: not on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option reply error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option reply error: block size negotiation required.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option reply error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// The FUA flag is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The DF flag is supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// The FAST_ZERO flag is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment the read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status with one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk: nothing (a final empty chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: a range reading as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: block status extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// base:allocation flag: unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation flag: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context of allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values on the wire (Linux numbering, as the protocol defines).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Default TCP port.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest payload either end accepts in one request (qemu's limit).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest string (export name, description, context name) either end accepts.
pub const MAX_STRING: u32 = 4096;
/// Largest option payload a server reads.
pub const MAX_OPTION: u32 = 64 << 10;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// The text of an NBD error value, for messages.
pub fn error_text(code: u32) -> &'static str {
    match code {
        EPERM => "Operation not permitted",
        EIO => "Input/output error",
        ENOMEM => "Cannot allocate memory",
        EINVAL => "Invalid argument",
        ENOSPC => "No space left on device",
        EOVERFLOW => "Value too large for defined data type",
        ENOTSUP => "Operation not supported",
        ESHUTDOWN => "Cannot send after transport endpoint shutdown",
        _ => "Input/output error",
    }
}

/// The host errno for an NBD error value.
pub fn to_errno(code: u32) -> i32 {
    match code {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// The NBD error value for a host I/O error.
pub fn from_io_error(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ENOTSUP) => ENOTSUP,
        _ => EIO,
    }
}

/// Reads a big-endian u16.
pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian u32.
pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64.
pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and drops `len` bytes, without holding more than a small buffer.
pub fn skip(r: &mut impl Read, mut len: u64) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// An error for malformed protocol data.
pub fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A cursor over a received payload that fails cleanly when it runs short.
pub struct Payload<'a> {
    data: &'a [u8],
}

impl<'a> Payload<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Payload { data }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(protocol_error("payload too short"));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    /// The next big-endian u16.
    pub fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// The next big-endian u64.
    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A string prefixed by its u32 length, at most [`MAX_STRING`] bytes.
    pub fn string(&mut self) -> io::Result<String> {
        let len = self.u32()?;
        if len > MAX_STRING {
            return Err(protocol_error("string too long"));
        }
        let b = self.bytes(len as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| protocol_error("string is not UTF-8"))
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's identifier of the request, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (of the payload for WRITE, of the range otherwise).
    pub length: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Parses a header, checking its magic.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> io::Result<Request> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(protocol_error(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
            kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes).
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Writes an option request: IHAVEOPT, the option, its length and data.
pub fn write_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Writes an option reply.
pub fn write_option_reply(
    w: &mut impl Write,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Appends a u32-length-prefixed string.
pub fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// The payload of INFO/GO and of the meta context options: an export name followed by
/// requests (info types or context queries).
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    put_string(&mut b, name);
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// The payload of LIST_META_CONTEXT/SET_META_CONTEXT.
pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    put_string(&mut b, name);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string(&mut b, q);
    }
    b
}

/// Writes all of `bufs` with vectored writes (one syscall for a header and its data).
pub fn write_all_vectored(w: &mut impl Write, bufs: &[&[u8]]) -> io::Result<()> {
    let mut index = 0;
    let mut skip_bytes = 0usize;
    while index < bufs.len() {
        let slices: Vec<io::IoSlice> = bufs[index..]
            .iter()
            .enumerate()
            .map(|(i, b)| io::IoSlice::new(if i == 0 { &b[skip_bytes..] } else { b }))
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while index < bufs.len() && n >= bufs[index].len() - skip_bytes {
            n -= bufs[index].len() - skip_bytes;
            index += 1;
            skip_bytes = 0;
        }
        skip_bytes += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 65536,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn payload_runs_short_cleanly() {
        let mut p = Payload::new(&[0, 0, 0, 9, b'a']);
        assert!(p.string().is_err());
        let mut p = Payload::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(p.string().is_err());
        let mut p = Payload::new(&[0, 1]);
        assert_eq!(p.u16().unwrap(), 1);
        assert!(p.u32().is_err());
    }

    #[test]
    fn vectored_writes_complete() {
        let mut out = Vec::new();
        write_all_vectored(&mut out, &[b"ab", b"", b"cde"]).unwrap();
        assert_eq!(out, b"abcde");
    }
}
