//! streamOptimized extents: the footer that holds the real header, and compressed grains
//! (deflate in zlib framing, each behind a grain marker).

use super::sparse::{Header, MAGIC, SECTOR};
use crate::{Error, Result};
use blockdev::Storage;

/// Marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;
/// A grain marker: the grain's first sector (u64) and the compressed size (u32).
pub const GRAIN_MARKER: usize = 12;

/// Reads the header from the footer of a stream whose header says "directory at the end":
/// the footer marker, the footer (a copy of the header) and the end-of-stream marker are the
/// last three sectors of the file.
pub fn read_footer(file: &dyn Storage) -> Result<Header> {
    let name = file.name().to_string();
    let len = file.size()?.div_ceil(SECTOR) * SECTOR;
    let invalid = || Error::invalid(&name, "Invalid footer");
    if len < 3 * SECTOR {
        return Err(invalid());
    }
    let mut b = vec![0u8; 3 * SECTOR as usize];
    let start = len - 3 * SECTOR;
    let avail = (file.size()? - start) as usize;
    file.read_at(&mut b[..avail], start)
        .map_err(|e| Error::invalid(&name, format!("Failed to read footer: {e}")))?;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let footer = &b[512..1024];
    let eos = 1024;
    if u32::from_le_bytes(footer[0..4].try_into().unwrap()) != MAGIC
        || u32_at(8) != 0
        || u32_at(12) != MARKER_FOOTER
        || u64_at(eos) != 0
        || u32_at(eos + 8) != 0
        || u32_at(eos + 12) != MARKER_EOS
    {
        return Err(invalid());
    }
    Ok(Header::parse(footer))
}

/// Decompresses one grain: `data` starts where the grain table entry points (at the grain
/// marker when `has_marker`). `out` is one grain long; a shorter result (the disk's last,
/// partial grain) leaves the rest zero.
pub fn decompress_grain(data: &[u8], has_marker: bool, out: &mut [u8], name: &str) -> Result<()> {
    let payload = if has_marker {
        if data.len() < GRAIN_MARKER {
            return Err(Error::corrupt(name, 0, "truncated grain marker"));
        }
        let size = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
        if size > data.len() - GRAIN_MARKER {
            return Err(Error::corrupt(
                name,
                0,
                format!("compressed grain size {size} is larger than a grain can need"),
            ));
        }
        &data[GRAIN_MARKER..GRAIN_MARKER + size]
    } else {
        data
    };
    let mut d = flate2::Decompress::new(true);
    match d.decompress(payload, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) | Ok(flate2::Status::Ok) | Ok(flate2::Status::BufError) => {
            let n = d.total_out() as usize;
            out[n..].fill(0);
            Ok(())
        }
        Err(e) => Err(Error::corrupt(
            name,
            0,
            format!("compressed grain cannot be decompressed: {e}"),
        )),
    }
}

/// Compresses one grain in zlib framing, as qemu's streamOptimized writer does.
pub fn compress_grain(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    e.write_all(data).expect("in-memory write");
    e.finish().expect("in-memory write")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grain_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let z = compress_grain(&data);
        let mut marked = vec![0u8; GRAIN_MARKER];
        marked[8..12].copy_from_slice(&(z.len() as u32).to_le_bytes());
        marked.extend_from_slice(&z);
        let mut out = vec![1u8; 65536];
        decompress_grain(&marked, true, &mut out, "t").unwrap();
        assert_eq!(out, data);
        // A size beyond the buffer is refused, not trusted.
        marked[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress_grain(&marked, true, &mut out, "t").is_err());
    }
}
