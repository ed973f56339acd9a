//! The persistent dirty bitmaps of a qcow2 image, as `img info` lists them.
//!
//! Bitmaps are kept by the image but never touched by this tool; `info` still shows them the
//! way qemu-img does (name, granularity and flags), read straight from the bitmap directory.

use crate::qjson::QValue;
use blockdev::Storage;
use img_core::qcow2::header::{autoclear, ext, Header};

/// Largest bitmap directory qemu accepts.
const MAX_DIRECTORY: u64 = 64 << 20;
/// Size of a directory entry before its extra data and name.
const ENTRY_HEADER: usize = 24;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The bitmaps of the qcow2 image in `file`, or `None` when it has none (or its bitmap
/// metadata is stale or unreadable: qemu then shows none either).
pub fn bitmaps(file: &dyn Storage) -> Option<Vec<QValue>> {
    let file_size = file.size().ok()?;
    let mut head = vec![0u8; file_size.min(24) as usize];
    file.read_at(&mut head, 0).ok()?;
    if head.len() < 24 {
        return None;
    }
    let cluster_bits = be32(&head, 20).clamp(9, 21);
    let mut first = vec![0u8; file_size.min(1 << cluster_bits) as usize];
    file.read_at(&mut first, 0).ok()?;
    let header = Header::parse(file.name(), &first, file_size).ok()?;
    if header.version < 3 || header.autoclear_features & autoclear::BITMAPS == 0 {
        return None;
    }
    let extension = header
        .unknown_extensions
        .iter()
        .find(|e| e.kind == ext::BITMAPS)?;
    if extension.data.len() < 24 {
        return None;
    }
    let count = be32(&extension.data, 0) as usize;
    let dir_size = be64(&extension.data, 8);
    let dir_offset = be64(&extension.data, 16);
    if count == 0 || dir_size > MAX_DIRECTORY || dir_offset.checked_add(dir_size)? > file_size {
        return None;
    }
    let mut dir = vec![0u8; dir_size as usize];
    file.read_at(&mut dir, dir_offset).ok()?;
    let mut list = Vec::with_capacity(count);
    let mut pos = 0usize;
    for _ in 0..count {
        let entry = dir.get(pos..pos + ENTRY_HEADER)?;
        let flags = be32(entry, 12);
        let granularity_bits = entry[17] as u32;
        let name_size = u16::from_be_bytes([entry[18], entry[19]]) as usize;
        let extra = be32(entry, 20) as usize;
        let name_at = pos + ENTRY_HEADER + extra;
        let name = dir.get(name_at..name_at.checked_add(name_size)?)?;
        if granularity_bits > 63 {
            return None;
        }
        let mut flag_names = Vec::new();
        if flags & 1 != 0 {
            flag_names.push(QValue::from("in-use"));
        }
        if flags & 2 != 0 {
            flag_names.push(QValue::from("auto"));
        }
        list.push(QValue::Dict(vec![
            (
                "name".into(),
                String::from_utf8_lossy(name).into_owned().into(),
            ),
            ("granularity".into(), (1u64 << granularity_bits).into()),
            ("flags".into(), QValue::List(flag_names)),
        ]));
        pos = (name_at + name_size).div_ceil(8) * 8;
    }
    Some(list)
}
