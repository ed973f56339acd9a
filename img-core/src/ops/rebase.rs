//! Safe rebase: give an image a new backing file without changing what it reads.
//!
//! Every cluster the image does not allocate itself reads from its current (old) backing
//! chain. Where the old chain and the new backing file differ, the old content is copied into
//! the image, cluster by cluster; clusters that read the same under both are left alone. Only
//! then is the new name recorded (see [`crate::Image::set_backing_file`]), so a crash leaves
//! the image valid with its old backing file, holding some clusters it did not need.

use crate::format::Mapping;
use crate::{Image, Result};

/// Bytes compared per step (a whole number of clusters).
const CHUNK: u64 = 2 << 20;

/// How a rebase writes what it copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct RebaseOptions {
    /// Write copied clusters compressed (`-c`).
    pub compress: bool,
}

/// Copies into `image` the clusters whose content under its current backing chain differs
/// from `new_backing` (`None`: no backing file, which reads as zeros). `progress` gets the
/// bytes done and the total.
pub fn copy_differences(
    image: &Image,
    new_backing: Option<&Image>,
    opts: RebaseOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = image.size();
    let cs = image.format().cluster_size();
    let chunk = CHUNK.max(cs) / cs * cs;
    let mut old = vec![0u8; chunk as usize];
    let mut new = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < size {
        let end = (pos + chunk).min(size);
        let mut at = pos;
        while at < end {
            let extent = image.format().map(at, end - at)?;
            let run_end = at + extent.len;
            if extent.mapping == Mapping::Unallocated {
                copy_run(
                    image,
                    new_backing,
                    at,
                    run_end,
                    cs,
                    opts,
                    &mut old,
                    &mut new,
                )?;
            }
            at = run_end;
        }
        pos = end;
        progress(pos, size);
    }
    Ok(())
}

/// Compares and copies the unallocated run `[start, end)` of `image`.
#[allow(clippy::too_many_arguments)]
fn copy_run(
    image: &Image,
    new_backing: Option<&Image>,
    start: u64,
    end: u64,
    cs: u64,
    opts: RebaseOptions,
    old: &mut [u8],
    new: &mut [u8],
) -> Result<()> {
    let len = (end - start) as usize;
    let (old, new) = (&mut old[..len], &mut new[..len]);
    // The image reads its old backing chain where it allocates nothing.
    image.read_at(old, start)?;
    read_or_zeros(new_backing, new, start)?;
    let mut off = 0usize;
    while off < len {
        // Clusters are compared whole (the image's mapping runs are cluster aligned).
        let n = (cs as usize - ((start as usize + off) % cs as usize)).min(len - off);
        let (o, w) = (&old[off..off + n], &new[off..off + n]);
        if o != w {
            let at = start + off as u64;
            if crate::convert::is_zero(o) {
                image.write_zeroes(at, n as u64, false)?;
            } else if opts.compress {
                image.write_compressed(at, o)?;
            } else {
                image.write_at(o, at)?;
            }
        }
        off += n;
    }
    Ok(())
}

/// Reads from `image`, or zeros without one; past its end it reads zeros too.
fn read_or_zeros(image: Option<&Image>, buf: &mut [u8], offset: u64) -> Result<()> {
    let avail = image
        .map(|i| i.size().saturating_sub(offset).min(buf.len() as u64) as usize)
        .unwrap_or(0);
    if let Some(i) = image.filter(|_| avail > 0) {
        i.read_at(&mut buf[..avail], offset)?;
    }
    buf[avail..].fill(0);
    Ok(())
}
