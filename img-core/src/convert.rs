//! Copying the content of one or more images into another (`img convert`).
//!
//! Block status decides what to read: ranges that read as zeros in the source are never read
//! and stay unallocated in a fresh target. Data that is read is scanned for zero runs of at
//! least `min_sparse` bytes, which are skipped too, as qemu-img does with `-S`.

use crate::{Image, Result};

/// How to convert.
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// `-S`: zero runs of at least this many bytes are not written; 0 writes everything
    /// (a fully allocated target).
    pub min_sparse: u64,
    /// `-c`: write whole target clusters compressed.
    pub compress: bool,
    /// The target reads as zeros already (freshly created), so zero ranges need no write.
    pub target_is_zero: bool,
    /// Bytes read per request.
    pub chunk: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            min_sparse: 4096,
            compress: false,
            target_is_zero: true,
            chunk: 2 << 20,
        }
    }
}

/// Copies the concatenation of `sources` into `target`, calling `progress(done, total)` as
/// bytes are processed.
pub fn convert(
    sources: &[&Image],
    target: &Image,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    let mut copier = Copier {
        target,
        opts,
        buf: vec![0u8; opts.chunk.max(target.format().cluster_size() as usize)],
    };
    let mut base = 0u64;
    progress(0, total);
    for src in sources {
        copier.copy_image(src, base, &mut |done| progress(base + done, total))?;
        base += src.size();
    }
    progress(total, total);
    target.flush()
}

struct Copier<'a> {
    target: &'a Image,
    opts: &'a ConvertOptions,
    buf: Vec<u8>,
}

impl Copier<'_> {
    fn copy_image(&mut self, src: &Image, base: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        if self.opts.compress {
            return self.copy_compressed(src, base, progress);
        }
        let size = src.size();
        let mut pos = 0u64;
        while pos < size {
            let want = (self.buf.len() as u64).min(size - pos);
            let status = src.block_status(pos, want)?;
            let len = status.len.min(want);
            if status.zero && !status.data && self.opts.min_sparse != 0 {
                self.zero(base + pos, len)?;
            } else {
                let buf = &mut self.buf[..len as usize];
                src.read_at(buf, pos)?;
                self.write_sparse(base + pos, len as usize)?;
            }
            pos += len;
            progress(pos);
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if !self.opts.target_is_zero {
            self.target.write_zeroes(offset, len, true)?;
        }
        Ok(())
    }

    /// Writes `self.buf[..len]` to `offset`, skipping aligned zero runs of at least
    /// `min_sparse` bytes.
    fn write_sparse(&self, offset: u64, len: usize) -> Result<()> {
        let data = &self.buf[..len];
        let unit = self.opts.min_sparse as usize;
        if unit == 0 {
            return self.target.write_at(data, offset);
        }
        // Units are aligned to absolute offsets so the result does not depend on chunking.
        let mut i = 0usize;
        while i < len {
            let unit_end = |at: usize| {
                let abs = offset + at as u64;
                (((abs / unit as u64) + 1) * unit as u64 - offset).min(len as u64) as usize
            };
            // A run of units of one kind (zero or not).
            let first_end = unit_end(i);
            let zero = is_zero(&data[i..first_end]);
            let mut j = first_end;
            while j < len {
                let e = unit_end(j);
                if is_zero(&data[j..e]) != zero {
                    break;
                }
                j = e;
            }
            // A zero piece shorter than a unit (at the edges of the buffer) is written as data
            // unless it is a full unit run.
            if zero && (j - i) >= unit.min(len) {
                self.zero(offset + i as u64, (j - i) as u64)?;
            } else {
                self.target.write_at(&data[i..j], offset + i as u64)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Copies cluster by cluster, writing each non-zero target cluster compressed.
    fn copy_compressed(
        &mut self,
        src: &Image,
        base: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let cs = self.target.format().cluster_size();
        let size = src.size();
        let mut pos = 0u64;
        while pos < size {
            // Clusters of the target, which need not line up with the source when several
            // sources are concatenated.
            let abs = base + pos;
            let n = (cs - abs % cs).min(size - pos);
            let status = src.block_status(pos, n)?;
            if !(status.zero && !status.data && status.len >= n) {
                let buf = &mut self.buf[..n as usize];
                src.read_at(buf, pos)?;
                if !is_zero(buf) {
                    if abs.is_multiple_of(cs) && (n == cs || abs + n == self.target.size()) {
                        self.target.write_compressed(abs, buf)?;
                    } else {
                        self.target.write_at(buf, abs)?;
                    }
                } else {
                    self.zero(abs, n)?;
                }
            } else {
                self.zero(abs, n)?;
            }
            pos += n;
            progress(pos);
        }
        Ok(())
    }
}

/// Whether every byte is zero, compared a word at a time.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as words is sound.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&b[1..4098]));
    }
}
