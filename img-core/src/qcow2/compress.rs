//! Compression of clusters: raw deflate (zlib) and zstd, as qemu writes and reads them.

use super::header::CompressionType;

/// Compresses one cluster. Returns `None` when the result would not be smaller than
/// `limit` bytes, in which case the cluster is stored uncompressed.
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            // qemu inflates with a 4 KiB window (window bits 12), so deflate must not refer
            // further back than that.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, 0).ok()?;
            (out.len() < limit).then_some(out)
        }
    }
}

/// Decompresses into `out`, which must be filled completely. The input may carry trailing
/// bytes (qemu rounds compressed lengths up to 512-byte sectors).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(format!(
                    "compressed cluster inflates to {} bytes, expected {}",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("invalid deflate data: {e}")),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| e.to_string())?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            // Frames may be followed by padding; stop as soon as the cluster is complete.
            while outb.pos() < outb.capacity() {
                let before = (inb.pos(), outb.pos());
                dec.run(&mut inb, &mut outb)
                    .map_err(|e| format!("invalid zstd data: {e}"))?;
                if (inb.pos(), outb.pos()) == before {
                    return Err(format!(
                        "compressed cluster decompresses to {} bytes, expected {}",
                        outb.pos(),
                        outb.capacity()
                    ));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 / 3).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data, data.len()).unwrap();
            c.extend_from_slice(&[0xff; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn incompressible_is_refused() {
        let mut x = 12345u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data, data.len()).is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
    }
}
