//! Guest buffers as byte streams: the device-readable and device-writable parts of a
//! descriptor chain, whatever way the driver split them across descriptors.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Why a chain is not a request the device can even answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The descriptor chain itself is broken (a loop, an address outside guest memory, a bad
    /// indirect table).
    #[error("malformed descriptor chain")]
    Malformed,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Too few readable bytes for the request header.
    #[error("request header missing ({0} readable bytes)")]
    ShortHeader(u64),
    /// No room for the device's answer (the status byte or response).
    #[error("no writable room for the request status")]
    NoStatus,
}

/// Splits a chain into its device-readable bytes and the device-writable bytes that follow
/// them (the spec requires that order).
pub fn split_chain<M>(chain: DescriptorChain<M>) -> Result<(SgList, SgList), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable = SgList::default();
    let mut writable = SgList::default();
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if desc.is_write_only() {
            writable.push(desc.addr(), u64::from(desc.len()));
        } else if !writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            readable.push(desc.addr(), u64::from(desc.len()));
        }
    }
    if count == 0 {
        return Err(ChainError::Malformed);
    }
    Ok((readable, writable))
}

/// A scatter-gather list: guest buffers making up one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SgList {
    segments: Vec<(GuestAddress, u64)>,
    len: u64,
}

impl SgList {
    /// Appends `len` bytes at `addr`.
    pub fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.segments.push((addr, len));
            self.len += len;
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits off the first `n` bytes (at most all of them) into a list of their own.
    pub fn split_front(&mut self, n: u64) -> SgList {
        let mut front = SgList::default();
        let mut rest = SgList::default();
        let mut left = n;
        for &(addr, len) in &self.segments {
            let take = left.min(len);
            front.push(addr, take);
            // Guest addresses may wrap; such a segment fails when it is accessed.
            rest.push(GuestAddress(addr.0.wrapping_add(take)), len - take);
            left -= take;
        }
        *self = rest;
        front
    }

    /// Splits off the last `n` bytes (at most all of them) into a list of their own.
    pub fn split_back(&mut self, n: u64) -> SgList {
        let keep = self.len.saturating_sub(n);
        let front = self.split_front(keep);
        std::mem::replace(self, front)
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the list out of guest memory.
    pub fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.walk(offset, buf.len() as u64, |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies `buf` into guest memory, starting `offset` bytes into the list.
    pub fn write_from<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.walk(offset, buf.len() as u64, |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }

    /// The guest memory that holds the `len` bytes starting `offset` bytes into the list, one
    /// slice per piece; `None` when a piece lies outside guest memory or across two of its
    /// regions, or when pieces overlap (a driver may not do that, but a hostile one could,
    /// and two `&mut` to the same bytes must not exist).
    fn host_slices<'m, M: GuestMemory + ?Sized>(
        &self,
        mem: &'m M,
        offset: u64,
        len: u64,
        access: vm_memory::Permissions,
    ) -> Option<Vec<vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, M::Bitmap>>>> {
        let mut pieces = Vec::with_capacity(self.segments.len());
        let ok = self.walk(offset, len, |addr, _, n| {
            pieces.push((addr, n));
            Ok(())
        });
        if ok.is_err() || !disjoint(&pieces) {
            return None;
        }
        let mut slices = Vec::with_capacity(pieces.len());
        for &(addr, n) in &pieces {
            // One slice for the whole piece, or the piece crosses regions.
            let slice = mem.get_slices(addr, n, access).ok()?.next()?.ok()?;
            if slice.len() != n {
                return None;
            }
            slices.push(slice);
        }
        Some(slices)
    }

    /// Runs `f` on the guest's own buffers that hold the `len` bytes starting `offset` bytes
    /// into the list, as host memory, so that data can be read into them without a copy
    /// through a buffer of ours (`preadv` straight into the guest). `None`, without calling
    /// `f`, when that cannot be done safely (see `host_slices`); the caller then copies. The
    /// pieces are marked dirty for the memory's bitmap (vhost-user's dirty log).
    pub fn with_guest_slices<M: GuestMemory + ?Sized, T>(
        &self,
        mem: &M,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [IoSliceMut<'_>]) -> T,
    ) -> Option<T> {
        let slices = self.host_slices(mem, offset, len, vm_memory::Permissions::Write)?;
        let mut bufs: Vec<IoSliceMut<'_>> = slices
            .iter()
            .map(|s| {
                // SAFETY: the slice is `s.len()` bytes of mapped guest memory that stays mapped
                // while `mem` is borrowed; the pieces were checked not to overlap, so no two of
                // these slices alias. The guest gave these buffers to the device until the
                // request completes; a guest that touches them meanwhile only races with its
                // own I/O, as with any DMA.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(s.ptr_guard_mut().as_ptr(), s.len())
                })
            })
            .collect();
        let result = f(&mut bufs);
        drop(bufs);
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        Some(result)
    }

    /// Runs `f` on the guest's own buffers that hold the `len` bytes starting `offset` bytes
    /// into the list, for reading (`pwritev` straight from the guest); `None` as for
    /// [`SgList::with_guest_slices`].
    pub fn with_guest_buffers<M: GuestMemory + ?Sized, T>(
        &self,
        mem: &M,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[IoSlice<'_>]) -> T,
    ) -> Option<T> {
        let slices = self.host_slices(mem, offset, len, vm_memory::Permissions::Read)?;
        let bufs: Vec<IoSlice<'_>> = slices
            .iter()
            .map(|s| {
                // SAFETY: as in `with_guest_slices`; these are only read.
                IoSlice::new(unsafe { std::slice::from_raw_parts(s.ptr_guard().as_ptr(), s.len()) })
            })
            .collect();
        Some(f(&bufs))
    }

    /// Calls `f(guest address, offset in the caller's buffer, length)` for each piece of the
    /// `len` bytes starting `offset` bytes into the list.
    fn walk<F>(&self, offset: u64, len: u64, mut f: F) -> Result<(), vm_memory::GuestMemoryError>
    where
        F: FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    {
        let mut skip = offset;
        let mut done = 0u64;
        for &(addr, seg_len) in &self.segments {
            if done == len {
                break;
            }
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(len - done);
            let start = addr
                .0
                .checked_add(skip)
                .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(addr))?;
            f(GuestAddress(start), done as usize, n as usize)?;
            done += n;
            skip = 0;
        }
        if done < len {
            return Err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: len as usize,
                completed: done as usize,
            });
        }
        Ok(())
    }
}

/// Whether no two of the `(address, length)` ranges share a byte.
fn disjoint(pieces: &[(GuestAddress, usize)]) -> bool {
    let mut sorted: Vec<(u64, u64)> = pieces.iter().map(|&(a, n)| (a.0, n as u64)).collect();
    sorted.sort_unstable();
    sorted
        .windows(2)
        .all(|w| w[0].0.checked_add(w[0].1).is_some_and(|end| end <= w[1].0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(parts: &[(u64, u64)]) -> SgList {
        let mut l = SgList::default();
        for &(a, n) in parts {
            l.push(GuestAddress(a), n);
        }
        l
    }

    #[test]
    fn splits_keep_every_byte_once() {
        let mut l = list(&[(0x1000, 10), (0x2000, 6), (0x3000, 1)]);
        let front = l.split_front(12);
        assert_eq!(front, list(&[(0x1000, 10), (0x2000, 2)]));
        assert_eq!(l, list(&[(0x2002, 4), (0x3000, 1)]));
        let back = l.split_back(1);
        assert_eq!(back, list(&[(0x3000, 1)]));
        assert_eq!(l, list(&[(0x2002, 4)]));
        let mut short = list(&[(0, 3)]);
        assert_eq!(short.split_back(5), list(&[(0, 3)]));
        assert!(short.is_empty());
    }

    #[test]
    fn guest_slices_are_the_guest_bytes_and_refused_when_unsafe() {
        use vm_memory::GuestMemoryMmap;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let l = list(&[(0x1000, 8), (0x3000, 8)]);
        let n = l
            .with_guest_slices(&mem, 4, 8, |bufs| {
                assert_eq!(bufs.len(), 2);
                bufs[0].copy_from_slice(b"abcd");
                bufs[1].copy_from_slice(b"efgh");
                bufs.len()
            })
            .unwrap();
        assert_eq!(n, 2);
        let mut back = [0u8; 8];
        mem.read_slice(&mut back[..4], GuestAddress(0x1004))
            .unwrap();
        mem.read_slice(&mut back[4..], GuestAddress(0x3000))
            .unwrap();
        assert_eq!(&back, b"abcdefgh");
        // Overlapping pieces, a piece across two regions, a piece outside memory: no slices.
        for bad in [
            list(&[(0x1000, 8), (0x1004, 8)]),
            list(&[(0xfff8, 16)]),
            list(&[(0x40000, 8)]),
        ] {
            let len = bad.len();
            assert!(
                bad.with_guest_slices(&mem, 0, len, |_| ()).is_none(),
                "{bad:?}"
            );
        }
    }
}
