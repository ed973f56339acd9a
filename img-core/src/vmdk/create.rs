//! Creating VMDK images laid out as qemu-img lays them out: the same header fields, the
//! same places for the descriptor, the redundant and primary grain directories and their
//! (preallocated) grain tables, the same descriptor text and extent file names.

use super::descriptor::{Descriptor, ExtentLine};
use super::sparse::{
    Header, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD,
    FLAG_ZERO_GRAIN, SECTOR,
};
use crate::raw::{self, Preallocation, RawCreateOptions};
use crate::{Error, Result};
use blockdev::{FileOptions, FileStorage, Storage};
use std::path::{Path, PathBuf};

/// Grain size of new sparse extents, in sectors (64 KiB).
const GRANULARITY: u64 = 128;
/// Entries per grain table.
const GTES: u64 = 512;
/// Where the embedded descriptor starts and how many sectors it may take.
const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// The largest extent of the twoGbMaxExtent subformats.
const SPLIT_SIZE: u64 = 2 << 30;

/// qemu's `subformat` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with the descriptor inside (the default).
    #[default]
    MonolithicSparse,
    /// A descriptor file and one flat extent file.
    MonolithicFlat,
    /// A descriptor file and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor file and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One sparse file of compressed grains, written once in order.
    StreamOptimized,
}

impl Subformat {
    /// Parses qemu's name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }

    /// qemu's name (the descriptor's `createType`).
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// What `img create -f vmdk` takes.
#[derive(Clone, Debug, Default)]
pub struct VmdkCreateOptions {
    /// Virtual size in bytes (rounded up to whole sectors).
    pub size: u64,
    /// The layout.
    pub subformat: Subformat,
    /// `ide` (default), `lsilogic`, `buslogic` or `legacyESX`.
    pub adapter_type: Option<String>,
    /// The parent image, recorded as `parentFileNameHint`.
    pub backing_file: Option<String>,
    /// The parent's CID (`parentCID`); `None` without a parent.
    pub parent_cid: Option<u32>,
    /// `compat6`: hardware version 6.
    pub compat6: bool,
    /// `hwversion`.
    pub hwversion: Option<String>,
    /// `toolsversion`.
    pub toolsversion: Option<String>,
    /// `zeroed_grain`: grain table entry 1 means a zeroed grain.
    pub zeroed_grain: bool,
    /// Preallocation of flat extents.
    pub preallocation: Preallocation,
    /// The content ID; random when `None`.
    pub cid: Option<u32>,
}

/// The adapter types qemu accepts.
pub const ADAPTER_TYPES: &[&str] = &["ide", "lsilogic", "buslogic", "legacyESX"];

/// Checks the options as qemu does, with its messages.
pub fn validate(o: &VmdkCreateOptions) -> std::result::Result<(), String> {
    if let Some(a) = &o.adapter_type {
        if !ADAPTER_TYPES.contains(&a.as_str()) {
            return Err(format!("invalid parameter value: {a}"));
        }
    }
    if o.compat6 && o.hwversion.is_some() {
        return Err("compat6 cannot be enabled with hwversion set".into());
    }
    if o.backing_file.is_some() && o.subformat.flat() {
        return Err("Flat image can't have backing file".into());
    }
    Ok(())
}

/// The header of a new sparse extent of `capacity` sectors.
pub fn sparse_header(capacity: u64, stream: bool, zeroed_grain: bool) -> Header {
    let grains = capacity.div_ceil(GRANULARITY);
    let tables = grains.div_ceil(GTES);
    let gd_sectors = (tables * 4).div_ceil(SECTOR);
    let gt_sectors = GTES * 4 / SECTOR;
    let rgd_offset = DESC_OFFSET + DESC_SECTORS;
    let gd_offset = rgd_offset + gd_sectors + tables * gt_sectors;
    let end = gd_offset + gd_sectors + tables * gt_sectors;
    let mut flags = FLAG_NL_DETECT | FLAG_RGD;
    if zeroed_grain {
        flags |= FLAG_ZERO_GRAIN;
    }
    if stream {
        flags |= FLAG_COMPRESSED | FLAG_MARKER;
    }
    Header {
        version: if stream {
            3
        } else if zeroed_grain {
            2
        } else {
            1
        },
        flags,
        capacity,
        granularity: GRANULARITY,
        desc_offset: DESC_OFFSET,
        desc_size: DESC_SECTORS,
        num_gtes_per_gt: GTES as u32,
        rgd_offset,
        gd_offset,
        grain_offset: end.div_ceil(GRANULARITY) * GRANULARITY,
        compress_algorithm: if stream { COMPRESSION_DEFLATE } else { 0 },
    }
}

/// Writes a new sparse extent to `file`: header, both directories pointing at their
/// zeroed grain tables, and `descriptor` (if any) in its reserved sectors.
fn write_sparse(file: &dyn Storage, header: &Header, descriptor: Option<&str>) -> Result<()> {
    let tables = header.capacity.div_ceil(GRANULARITY).div_ceil(GTES);
    let gd_sectors = (tables * 4).div_ceil(SECTOR);
    let gt_sectors = GTES * 4 / SECTOR;
    let end = header.grain_offset * SECTOR;
    // Nothing of an older file at this name may survive inside the new one.
    file.truncate(0)?;
    file.truncate(end)?;
    file.write_at(&header.serialize(), 0)?;
    if let Some(d) = descriptor {
        let bytes = d.as_bytes();
        if bytes.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(Error::InvalidArgument(
                "the descriptor does not fit its reserved sectors".into(),
            ));
        }
        file.write_at(bytes, DESC_OFFSET * SECTOR)?;
    }
    for dir in [header.rgd_offset, header.gd_offset] {
        let first_table = dir + gd_sectors;
        let gd: Vec<u8> = (0..tables)
            .flat_map(|i| ((first_table + i * gt_sectors) as u32).to_le_bytes())
            .collect();
        file.write_at(&gd, dir * SECTOR)?;
    }
    file.flush()?;
    Ok(())
}

/// The descriptor of a new image.
fn descriptor(o: &VmdkCreateOptions, cid: u32, extents: Vec<ExtentLine>) -> String {
    let sectors = o.size.div_ceil(SECTOR);
    let adapter = o.adapter_type.as_deref().unwrap_or("ide");
    let heads = if adapter == "ide" { 16 } else { 255 };
    let hw = match (&o.hwversion, o.compat6) {
        (Some(h), _) => h.clone(),
        (None, true) => "6".into(),
        (None, false) => "4".into(),
    };
    let d = Descriptor {
        cid: Some(cid),
        parent_cid: Some(o.parent_cid.unwrap_or(u32::MAX)),
        create_type: Some(o.subformat.name().into()),
        parent_hint: o.backing_file.clone(),
        extents,
        ddb: vec![
            ("ddb.virtualHWVersion".into(), hw),
            (
                "ddb.geometry.cylinders".into(),
                (sectors / (heads * 63)).to_string(),
            ),
            ("ddb.geometry.heads".into(), heads.to_string()),
            ("ddb.geometry.sectors".into(), "63".into()),
            ("ddb.adapterType".into(), adapter.into()),
            (
                "ddb.toolsVersion".into(),
                o.toolsversion
                    .clone()
                    .unwrap_or_else(|| "2147483647".into()),
            ),
        ],
    };
    d.render()
}

/// A random content ID.
pub(crate) fn random_cid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

fn create_file(path: &Path) -> Result<FileStorage> {
    Ok(FileStorage::open(
        path,
        FileOptions {
            create: true,
            ..Default::default()
        },
    )?)
}

/// Creates the image at `path` (and its extent files beside it).
pub fn create(path: &Path, o: &VmdkCreateOptions) -> Result<()> {
    validate(o).map_err(Error::InvalidArgument)?;
    let cid = o.cid.unwrap_or_else(random_cid);
    let sectors = o.size.div_ceil(SECTOR);
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = base.strip_suffix(".vmdk").unwrap_or(&base).to_string();
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let in_dir = |name: &str| -> PathBuf { dir.join(name) };
    match o.subformat {
        Subformat::MonolithicSparse | Subformat::StreamOptimized => {
            let stream = o.subformat == Subformat::StreamOptimized;
            let header = sparse_header(sectors, stream, o.zeroed_grain);
            let text = descriptor(
                o,
                cid,
                vec![ExtentLine {
                    access: "RW".into(),
                    sectors,
                    kind: "SPARSE".into(),
                    file: Some(base.clone()),
                    offset: None,
                }],
            );
            let file = create_file(path)?;
            write_sparse(&file, &header, Some(&text))?;
        }
        sub => {
            let (split, suffix) = match sub {
                Subformat::MonolithicFlat => (u64::MAX, "flat"),
                Subformat::TwoGbMaxExtentFlat => (SPLIT_SIZE / SECTOR, "f"),
                _ => (SPLIT_SIZE / SECTOR, "s"),
            };
            let mut lines = Vec::new();
            let mut done = 0u64;
            let mut index = 1;
            // A zero-sized disk still gets its one (empty) extent file.
            while done < sectors || lines.is_empty() {
                let n = (sectors - done).min(split);
                let name = if sub == Subformat::MonolithicFlat {
                    format!("{stem}-{suffix}.vmdk")
                } else {
                    format!("{stem}-{suffix}{index:03}.vmdk")
                };
                let extent_path = in_dir(&name);
                if sub.flat() {
                    raw::create(
                        &extent_path,
                        &RawCreateOptions {
                            size: n * SECTOR,
                            preallocation: o.preallocation,
                        },
                    )?;
                } else {
                    let file = create_file(&extent_path)?;
                    write_sparse(&file, &sparse_header(n, false, o.zeroed_grain), None)?;
                }
                lines.push(ExtentLine {
                    access: "RW".into(),
                    sectors: n,
                    kind: if sub.flat() { "FLAT" } else { "SPARSE" }.into(),
                    file: Some(name),
                    offset: sub.flat().then_some(0),
                });
                done += n;
                index += 1;
                if n == 0 {
                    break;
                }
            }
            let text = descriptor(o, cid, lines);
            let file = create_file(path)?;
            file.truncate(0)?;
            file.write_at(text.as_bytes(), 0)?;
            file.flush()?;
        }
    }
    Ok(())
}
