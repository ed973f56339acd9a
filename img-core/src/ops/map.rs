//! The allocation map of an image and its backing chain, as `qemu-img map` reports it.
//!
//! Each run says which image of the chain holds the bytes (`depth`), whether any image does
//! (`present`), whether they read as zeros or hold data, and where in which file they are.
//! Neighbouring runs that continue one another (same facts, and host offsets that run on) are
//! merged, as qemu merges them.

use super::status::qemu_length;
use crate::{Image, Result};

/// One run of guest bytes that are stored alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the run.
    pub start: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// Index in the chain of the image that holds it (see [`crate::BlockStatus::depth`]).
    pub depth: usize,
    /// Some image of the chain allocates it.
    pub present: bool,
    /// It reads as zeros.
    pub zero: bool,
    /// It holds data.
    pub data: bool,
    /// It is stored compressed.
    pub compressed: bool,
    /// Where it is in its file, when it has a place of its own there.
    pub offset: Option<u64>,
    /// The file that holds it, when it has an offset.
    pub filename: Option<String>,
}

impl MapEntry {
    /// The empty run at `start`, where a walk begins (and what it reports when it starts at or
    /// past the end).
    fn empty(start: u64) -> Self {
        MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        }
    }

    /// Whether `next` continues this run, so that both are reported as one.
    fn continues_with(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.start + self.length == next.start
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// The status of the run at `offset` (at most `bytes` long), walking down the chain.
fn entry_at(image: &Image, offset: u64, bytes: u64) -> Result<MapEntry> {
    let size = image.size();
    if offset >= size {
        // The sector padding after the end of a raw image: a hole in its file.
        return Ok(MapEntry {
            start: offset,
            length: bytes,
            present: true,
            zero: true,
            offset: Some(offset),
            filename: Some(image.format().data_file().name().to_string()),
            ..MapEntry::empty(offset)
        });
    }
    let st = image.block_status(offset, bytes.min(size - offset))?;
    let holder = image.chain().nth(st.depth).unwrap_or(image);
    // A raw image is its file: every byte it holds has the same offset there, holes too.
    let host = if holder.format().driver() == "raw" && st.present {
        Some(offset)
    } else {
        st.offset
    };
    let (filename, host) = match host {
        Some(h) => {
            let (file, at) = holder.format().data_location(h);
            (Some(file), Some(at))
        }
        None => (None, None),
    };
    Ok(MapEntry {
        start: offset,
        length: st.len,
        depth: st.depth,
        present: st.present,
        zero: st.zero,
        data: st.data,
        compressed: st.compressed,
        offset: host,
        filename,
    })
}

/// Walks `[start, start + max_length)` (to the end of the image without a length) and returns
/// the merged runs one by one, so a caller can print each as soon as it is complete.
pub struct MapWalk<'a> {
    image: &'a Image,
    end: u64,
    current: Option<MapEntry>,
}

impl<'a> MapWalk<'a> {
    /// A walk over `image` from `start`, at most `max_length` bytes.
    pub fn new(image: &'a Image, start: u64, max_length: Option<u64>) -> Self {
        let length = qemu_length(image);
        let end = match max_length {
            Some(m) => start.saturating_add(m).min(length),
            None => length,
        };
        MapWalk {
            image,
            end,
            current: Some(MapEntry::empty(start)),
        }
    }
}

impl Iterator for MapWalk<'_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let curr = self.current.as_mut()?;
            let pos = curr.start + curr.length;
            if pos >= self.end {
                // The last run, even an empty one: qemu reports the empty run of a walk that
                // starts at the end.
                return self.current.take().map(Ok);
            }
            let next = match entry_at(self.image, pos, self.end - pos) {
                Ok(n) => n,
                Err(e) => {
                    self.current = None;
                    return Some(Err(e));
                }
            };
            if curr.continues_with(&next) {
                curr.length += next.length;
                continue;
            }
            let done = std::mem::replace(curr, next);
            if done.length > 0 {
                return Some(Ok(done));
            }
        }
    }
}
