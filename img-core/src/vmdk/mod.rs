//! VMDK: a text descriptor naming extents (sparse, flat or zero), each in its own file or,
//! for monolithicSparse and streamOptimized, one sparse extent that embeds the descriptor.
//!
//! The driver is a mapping provider like every format: [`Vmdk::map`] turns guest offsets
//! into places in its extent files. Because `Mapping::Data` offsets refer to a single data
//! storage, the extent files are gathered in [`ExtentFiles`], a composite storage whose
//! offsets carry the file's index in their top bits ([`encode`]); the generic I/O path
//! reads and writes through it unchanged.

pub mod create;
pub mod descriptor;
pub mod foreign;
pub mod sparse;
pub mod stream;

pub use create::{create, Subformat, VmdkCreateOptions};

use crate::format::{Allocation, Extent, Format, FormatInfo, Mapping, ZeroMode};
use crate::open::OpenOptions;
use crate::{Error, Result};
use blockdev::{FileStorage, Storage};
use descriptor::Descriptor;
use sparse::{Grain, Header, SparseExtent, SECTOR};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bits of a data offset that address a byte inside one extent file.
const FILE_BITS: u32 = 56;
const IN_FILE: u64 = (1 << FILE_BITS) - 1;
/// The most extent files one image may name (the index must fit the top bits).
pub const MAX_EXTENTS: usize = 255;
/// The most grain directory memory the extents of one image may hold together: what one
/// extent at qemu's limits holds (32 Mi entries, as a directory and its redundant copy of
/// 4-byte entries, or one seSparse directory of 8-byte entries). qemu has no such limit, and
/// 255 extents at its per-extent limit would hold 64 GiB; images VMware writes need a few
/// KiB per extent.
pub const MAX_DIRECTORY_BYTES: u64 = 256 << 20;

/// A data offset: byte `offset` of extent file `file`.
pub fn encode(file: usize, offset: u64) -> u64 {
    ((file as u64) << FILE_BITS) | offset
}

/// The extent file index and the byte offset in it of a data offset.
pub fn decode(offset: u64) -> (usize, u64) {
    ((offset >> FILE_BITS) as usize, offset & IN_FILE)
}

/// The extent files of an image as one storage: offsets are [`encode`]d.
#[derive(Debug)]
pub struct ExtentFiles {
    name: String,
    files: Vec<Arc<dyn Storage>>,
}

impl ExtentFiles {
    fn route(&self, offset: u64) -> blockdev::Result<(&Arc<dyn Storage>, u64)> {
        let (i, off) = decode(offset);
        match self.files.get(i) {
            Some(f) => Ok((f, off)),
            None => Err(blockdev::Error::Io {
                op: "route",
                name: self.name.clone(),
                offset,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no such extent file",
                ),
            }),
        }
    }
}

impl Storage for ExtentFiles {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> blockdev::Result<u64> {
        // The end of the last file: every offset below it in an earlier file counts as
        // inside (which only makes writers copy more carefully).
        let last = self.files.len() - 1;
        Ok(encode(last, self.files[last].size()?))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        let (f, off) = self.route(offset)?;
        f.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        let (f, off) = self.route(offset)?;
        f.write_at(buf, off)
    }

    fn flush(&self) -> blockdev::Result<()> {
        for f in &self.files {
            f.flush()?;
        }
        Ok(())
    }

    fn truncate(&self, size: u64) -> blockdev::Result<()> {
        let (f, off) = self.route(size)?;
        f.truncate(off)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> blockdev::Result<()> {
        let (f, off) = self.route(offset)?;
        f.write_zeroes(off, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        let (f, off) = self.route(offset)?;
        f.discard(off, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> blockdev::Result<(blockdev::Allocation, u64)> {
        let (f, off) = self.route(offset)?;
        f.allocation(off, len)
    }

    fn is_read_only(&self) -> bool {
        self.files[0].is_read_only()
    }
}

/// What an extent is.
#[derive(Debug)]
enum Kind {
    /// Raw bytes of file `file` starting at byte `start`.
    Flat { file: usize, start: u64 },
    /// Reads as zeros.
    Zero,
    /// A hosted sparse extent in file `file`.
    Sparse {
        file: usize,
        sparse: Box<SparseExtent>,
    },
    /// A read-only COWD (VMFSSPARSE) or seSparse extent in file `file`.
    Foreign {
        file: usize,
        ext: Box<foreign::ForeignSparse>,
    },
}

/// One extent: its place in the guest disk and how it is stored.
#[derive(Debug)]
struct VmdkExtent {
    /// Guest byte where it starts.
    start: u64,
    /// Length in bytes.
    len: u64,
    /// The type as the descriptor names it (empty for a monolithic sparse file).
    type_name: String,
    /// The file name, as shown by `info`.
    file_name: Option<String>,
    kind: Kind,
}

/// An open VMDK image.
pub struct Vmdk {
    file: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    /// Bytes of grain directories held in memory, all extents together.
    directory_bytes: u64,
    /// Names of the extent files by index (for `info`'s child nodes).
    file_names: Vec<String>,
    /// The extent files by index.
    storages: Vec<Arc<dyn Storage>>,
    /// Whether extent file `i` is the descriptor file itself.
    file_is_descriptor: Vec<bool>,
    extents: Vec<VmdkExtent>,
    size: u64,
    cid: u32,
    parent_cid: u32,
    /// Whether the parent (backing image) still has the content ID this image recorded for it
    /// (a VMDK parent's CID changes with every write session): set when the chain is opened.
    parent_matches: std::sync::atomic::AtomicBool,
    create_type: String,
    parent_hint: Option<String>,
    read_only: bool,
    cluster_size: u64,
    /// A stream got grains in this session: it needs an end-of-stream marker on close.
    stream_written: std::sync::atomic::AtomicBool,
    /// Where the descriptor text lives: file, byte offset and the most bytes it may take.
    descriptor_at: (Arc<dyn Storage>, u64, u64),
    /// The content ID was renewed in this session (qemu does it on the first write).
    cid_updated: std::sync::Mutex<bool>,
    /// The content ID as renewed, for `info`.
    new_cid: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Vmdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmdk")
            .field("file", &self.file.name())
            .field("size", &self.size)
            .finish()
    }
}

/// Reads up to [`descriptor::MAX_DESCRIPTOR`] bytes at `offset` (at most `limit`) as text.
fn read_text(file: &dyn Storage, offset: u64, limit: u64) -> Result<String> {
    let len = file.size()?;
    let n = len
        .saturating_sub(offset)
        .min(limit)
        .min(descriptor::MAX_DESCRIPTOR);
    let mut buf = vec![0u8; n as usize];
    file.read_at(&mut buf, offset)?;
    if let Some(nul) = buf.iter().position(|&b| b == 0) {
        buf.truncate(nul);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Resolves an extent file name against the descriptor's directory, as qemu does.
fn resolve(descriptor: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match descriptor.rfind('/') {
        Some(slash) => format!("{}{name}", &descriptor[..=slash]),
        None => name.to_string(),
    }
}

/// Reads and validates the sparse header at the start of `file`.
fn sparse_header(file: &dyn Storage, writable: bool) -> Result<(Header, u64)> {
    let name = file.name().to_string();
    let len = file.size()?;
    if len < SECTOR {
        return Err(Error::invalid(
            &name,
            format!("Could not read header from file '{name}': file is too short"),
        ));
    }
    let mut b = [0u8; 512];
    file.read_at(&mut b, 0)?;
    let mut header = Header::parse(&b);
    if header.gd_offset == sparse::GD_AT_END {
        header = stream::read_footer(file)?;
    }
    let gd_entries = header
        .validate(len, writable)
        .map_err(|reason| Error::invalid(&name, reason))?;
    Ok((header, gd_entries))
}

/// The extent files being gathered while an image is opened.
struct Files {
    storages: Vec<Arc<dyn Storage>>,
    names: Vec<String>,
    is_descriptor: Vec<bool>,
    /// Grain directory bytes the extents opened so far hold.
    directory_bytes: u64,
}

impl Files {
    fn add(
        &mut self,
        storage: Arc<dyn Storage>,
        name: String,
        is_descriptor: bool,
    ) -> Result<usize> {
        if self.storages.len() >= MAX_EXTENTS {
            return Err(Error::unsupported(
                &name,
                format!("more than {MAX_EXTENTS} extent files are not supported"),
            ));
        }
        self.storages.push(storage);
        self.names.push(name);
        self.is_descriptor.push(is_descriptor);
        Ok(self.storages.len() - 1)
    }

    /// Counts an opened extent's grain directories against [`MAX_DIRECTORY_BYTES`].
    fn charge_directory(&mut self, desc_name: &str, bytes: u64) -> Result<()> {
        self.directory_bytes = self.directory_bytes.saturating_add(bytes);
        if self.directory_bytes > MAX_DIRECTORY_BYTES {
            return Err(Error::unsupported(
                desc_name,
                format!(
                    "the grain directories of the extents need more than {} MiB of memory together",
                    MAX_DIRECTORY_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }
}

/// The create types whose descriptor is a file of its own and that this driver reads.
/// (qemu's list: a descriptor file naming a monolithic type is refused, as there.)
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfsSparse",
    "seSparse",
];

impl Vmdk {
    /// Opens the VMDK image whose descriptor (or monolithic sparse file) is `file`; extent
    /// files are opened as `opts` says the image is (read-only when it is).
    pub fn open(file: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let name = file.name().to_string();
        let len = file.size()?;
        // qemu sees files in whole sectors: only an empty one is too small.
        if len == 0 {
            return Err(Error::invalid(
                &name,
                "File is too small, not a valid image",
            ));
        }
        let writable = !opts.read_only;
        let mut magic = [0u8; 4];
        file.read_at(&mut magic[..len.min(4) as usize], 0)?;
        let mut files = Files {
            storages: Vec::new(),
            names: Vec::new(),
            is_descriptor: Vec::new(),
            directory_bytes: 0,
        };
        let mut extents = Vec::new();
        let create_type;
        let desc;
        let mut monolithic = None;
        let mut descriptor_at = (file.clone(), 0, descriptor::MAX_DESCRIPTOR);
        if u32::from_be_bytes(magic) == foreign::COWD_MAGIC {
            // qemu reads a lone COWD file's extent, then looks for the content ID in text
            // at byte 512 of it, which such a file does not hold: the open fails there.
            foreign::ForeignSparse::open_cowd(file.clone())?;
            return Err(Error::invalid(
                &name,
                format!("Could not open '{name}': Invalid argument"),
            ));
        }
        if u32::from_le_bytes(magic) == sparse::MAGIC {
            if len < SECTOR {
                return Err(Error::invalid(
                    &name,
                    format!("Could not read header from file '{name}': file is too short"),
                ));
            }
            let mut b = [0u8; 512];
            file.read_at(&mut b, 0)?;
            let raw = Header::parse(&b);
            descriptor_at = (
                file.clone(),
                raw.desc_offset.saturating_mul(SECTOR),
                // No embedded descriptor: nothing may be written at offset 0 (the header).
                if raw.desc_offset == 0 {
                    0
                } else {
                    raw.desc_size
                        .saturating_mul(SECTOR)
                        .min(descriptor::MAX_DESCRIPTOR)
                },
            );
            if raw.capacity == 0 && raw.desc_offset != 0 {
                // A sparse file that carries only a descriptor.
                let text = read_text(
                    file.as_ref(),
                    raw.desc_offset.saturating_mul(SECTOR),
                    u64::MAX,
                )?;
                desc = descriptor::parse(&text).map_err(|r| Error::invalid(&name, r))?;
                create_type = descriptor_type(&desc, &name)?;
            } else {
                let (header, gd_entries) = sparse_header(file.as_ref(), writable)?;
                let text = if raw.desc_offset != 0 {
                    read_text(
                        file.as_ref(),
                        raw.desc_offset.saturating_mul(SECTOR),
                        raw.desc_size.saturating_mul(SECTOR),
                    )?
                } else {
                    String::new()
                };
                desc = descriptor::parse(&text).unwrap_or_default();
                let sparse = SparseExtent::open(file.clone(), header, gd_entries)?;
                create_type = if sparse.compressed() {
                    "streamOptimized".to_string()
                } else {
                    "monolithicSparse".to_string()
                };
                let index = files.add(file.clone(), name.clone(), true)?;
                monolithic = Some((index, sparse));
            }
        } else {
            let text = read_text(file.as_ref(), 0, u64::MAX)?;
            desc = descriptor::parse(&text).map_err(|r| Error::invalid(&name, r))?;
            create_type = descriptor_type(&desc, &name)?;
        }
        let mut start = 0u64;
        if let Some((index, sparse)) = monolithic {
            let len = sparse.byte_len();
            extents.push(VmdkExtent {
                start,
                len,
                type_name: String::new(),
                file_name: Some(name.clone()),
                kind: Kind::Sparse {
                    file: index,
                    sparse: Box::new(sparse),
                },
            });
            start += len;
        } else {
            for line in &desc.extents {
                if let Some(e) = open_extent(line, start, &file, &name, &mut files, opts)? {
                    start = e
                        .start
                        .checked_add(e.len)
                        .filter(|&end| end <= crate::image::MAX_LENGTH)
                        .ok_or_else(|| {
                            Error::invalid(&name, "the extents add up to more than a disk can be")
                        })?;
                    extents.push(e);
                }
            }
        }
        if files.storages.is_empty() {
            // Only zero extents (or none): reads never reach the data storage.
            files.add(file.clone(), name.clone(), true)?;
        }
        let cluster_size = extents
            .iter()
            .find_map(|e| match &e.kind {
                Kind::Sparse { sparse, .. } => Some(sparse.grain),
                Kind::Foreign { ext, .. } => Some(ext.grain),
                _ => None,
            })
            .unwrap_or(1 << 16);
        let storages = files.storages.clone();
        let data: Arc<dyn Storage> = Arc::new(ExtentFiles {
            name: name.clone(),
            files: files.storages,
        });
        Ok(Vmdk {
            file,
            data,
            directory_bytes: files.directory_bytes,
            file_names: files.names,
            storages,
            file_is_descriptor: files.is_descriptor,
            extents,
            size: start,
            cid: desc.cid.unwrap_or(0),
            parent_cid: desc.parent_cid.unwrap_or(u32::MAX),
            parent_matches: std::sync::atomic::AtomicBool::new(true),
            create_type,
            parent_hint: desc.parent_hint.clone(),
            read_only: opts.read_only,
            cluster_size,
            stream_written: Default::default(),
            descriptor_at,
            cid_updated: std::sync::Mutex::new(false),
            new_cid: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// The extent covering guest byte `offset` (which is inside the disk).
    fn extent_at(&self, offset: u64) -> Option<&VmdkExtent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get(i)
    }

    /// The extent of a stream (a compressed sparse extent), when the image is one.
    fn stream(&self) -> Option<(&VmdkExtent, &SparseExtent)> {
        match self.extents.as_slice() {
            [e] => match &e.kind {
                Kind::Sparse { sparse, .. } if sparse.compressed() => Some((e, sparse)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The create type (`monolithicSparse`, `streamOptimized`, ...).
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    /// The extent files other than the descriptor file, as `(child name, file name)` (what
    /// `info` shows as `extents.N` child nodes).
    pub fn extent_children(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, e) in self.extents.iter().enumerate() {
            let file = match &e.kind {
                Kind::Flat { file, .. }
                | Kind::Sparse { file, .. }
                | Kind::Foreign { file, .. } => *file,
                Kind::Zero => continue,
            };
            if !self.file_is_descriptor[file] {
                out.push((format!("extents.{i}"), self.file_names[file].clone()));
            }
        }
        out
    }
}

/// Gives the descriptor at byte `at` of `file` (at most `max` bytes) the content ID `cid`,
/// as qemu does on the first write: the `CID=` line changes, the rest stays; what the text
/// no longer covers is zeroed, and a descriptor file keeps whole sectors.
fn write_cid(file: &dyn Storage, at: u64, max: u64, cid: u32) -> Result<()> {
    let text = read_text(file, at, max)?;
    let Some(pos) = text
        .find("\nCID=")
        .map(|p| p + 1)
        .or(text.starts_with("CID=").then_some(0))
    else {
        // No CID line: nothing to renew.
        return Ok(());
    };
    let end = text[pos..].find('\n').map_or(text.len(), |e| pos + e);
    let new = format!("{}CID={cid:x}{}", &text[..pos], &text[end..]);
    let mut bytes = new.into_bytes();
    let old_len = text.len().div_ceil(SECTOR as usize) * SECTOR as usize;
    let len = old_len.max(bytes.len()).min(max as usize);
    bytes.resize(len.max(bytes.len()), 0);
    if bytes.len() as u64 > max {
        return Ok(());
    }
    file.write_at(&bytes, at)?;
    Ok(())
}

/// What `check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Every allocated grain lies inside its extent file.
    Clean,
    /// The grain (or flat extent) holding this guest sector starts past the end of its file.
    PastEof {
        /// The first guest sector of the grain.
        sector: u64,
    },
    /// The grain table of this guest sector could not be read.
    Unreadable {
        /// The first guest sector of the grain.
        sector: u64,
    },
}

impl Vmdk {
    /// qemu's consistency check of a VMDK image: walking the disk grain by grain (extent by
    /// extent for flat ones), every grain that has a place in a file must start inside it.
    /// Stops at the first that does not, as qemu does.
    pub fn check(&self) -> Result<CheckResult> {
        for e in &self.extents {
            let first_sector = e.start / SECTOR;
            match &e.kind {
                Kind::Zero => {}
                Kind::Flat { file, start } => {
                    if *start >= self.data_file_size(*file)? {
                        return Ok(CheckResult::PastEof {
                            sector: first_sector,
                        });
                    }
                }
                Kind::Foreign { ext, .. } => {
                    let len = ext.file.size()?;
                    let mut rel = 0;
                    while rel < e.len {
                        let sector = first_sector + rel / SECTOR;
                        let (grain, n) = match ext.map_unchecked(rel, e.len - rel) {
                            Ok(m) => m,
                            Err(_) => return Ok(CheckResult::Unreadable { sector }),
                        };
                        if let Grain::At(host) = grain {
                            if host >= len {
                                return Ok(CheckResult::PastEof { sector });
                            }
                        }
                        rel += n.max(1);
                    }
                }
                Kind::Sparse { sparse, .. } => {
                    let len = sparse.file.size()?;
                    let grains = e.len.div_ceil(sparse.grain);
                    let mut g = 0;
                    while g < grains {
                        let sector = first_sector + g * sparse.header.granularity;
                        let (grain, n) =
                            match sparse.map(g * sparse.grain, e.len - g * sparse.grain) {
                                Ok(m) => m,
                                Err(_) => return Ok(CheckResult::Unreadable { sector }),
                            };
                        if let Grain::At(host) = grain {
                            if host >= len {
                                return Ok(CheckResult::PastEof { sector });
                            }
                            // Only the first grain of a run was looked at.
                            g += 1;
                        } else {
                            g += n.div_ceil(sparse.grain).max(1);
                        }
                    }
                }
            }
        }
        Ok(CheckResult::Clean)
    }

    fn data_file_size(&self, file: usize) -> Result<u64> {
        Ok(self.storages[file].size()?)
    }
}

/// The create type of a descriptor file, refused unless this driver reads it.
fn descriptor_type(desc: &Descriptor, name: &str) -> Result<String> {
    let Some(t) = desc.create_type.clone() else {
        return Err(Error::invalid(name, "invalid VMDK image descriptor"));
    };
    if !DESCRIPTOR_TYPES.contains(&t.as_str()) {
        return Err(Error::unsupported(
            name,
            format!("Unsupported image type '{t}'"),
        ));
    }
    Ok(t)
}

/// Opens the extent an extent line describes, starting at guest byte `start`; `None` for
/// lines qemu skips (not read-write, or no sectors).
fn open_extent(
    line: &descriptor::ExtentLine,
    start: u64,
    desc_file: &Arc<dyn Storage>,
    desc_name: &str,
    files: &mut Files,
    opts: &OpenOptions,
) -> Result<Option<VmdkExtent>> {
    if line.access != "RW" || line.sectors == 0 {
        return Ok(None);
    }
    let mut len = line
        .sectors
        .checked_mul(SECTOR)
        .filter(|&l| l <= crate::image::MAX_LENGTH)
        .ok_or_else(|| {
            Error::invalid(
                desc_name,
                format!(
                    "extent of {} sectors is larger than a disk can be",
                    line.sectors
                ),
            )
        })?;
    if line.kind == "ZERO" {
        return Ok(Some(VmdkExtent {
            start,
            len,
            type_name: line.kind.clone(),
            file_name: None,
            kind: Kind::Zero,
        }));
    }
    if !matches!(
        line.kind.as_str(),
        "FLAT" | "VMFS" | "SPARSE" | "VMFSSPARSE" | "SESPARSE"
    ) {
        return Err(Error::unsupported(
            desc_name,
            format!("Unsupported extent type '{}'", line.kind),
        ));
    }
    let Some(fname) = line.file.as_deref() else {
        return Err(Error::invalid(
            desc_name,
            format!(
                "Invalid extent line: extent of type {} names no file",
                line.kind
            ),
        ));
    };
    let path = resolve(desc_name, fname);
    // Sparse extents hold metadata and are locked as the image file is; flat ones only
    // data, locked as raw files.
    let sparse_kind = matches!(line.kind.as_str(), "SPARSE" | "VMFSSPARSE" | "SESPARSE");
    let lock_as = if sparse_kind { "vmdk" } else { "raw" };
    if line.kind == "SESPARSE" && !opts.read_only {
        // qemu has no write support for seSparse and refuses a read-write open.
        return Err(Error::unsupported(
            &path,
            "No write support for seSparse images available",
        ));
    }
    let storage = open_extent_file(&path, desc_file, desc_name, files, opts, lock_as)?;
    let index = files.add(storage.clone(), path.clone(), false)?;
    let kind = if line.kind == "SESPARSE" {
        let ext = foreign::ForeignSparse::open_sesparse(storage)?;
        files.charge_directory(desc_name, ext.directory_bytes())?;
        len = ext.byte_len();
        Kind::Foreign {
            file: index,
            ext: Box::new(ext),
        }
    } else if sparse_kind {
        let mut magic = [0u8; 4];
        let size = storage.size()?;
        if size == 0 {
            return Err(Error::invalid(
                &path,
                "File is too small, not a valid image",
            ));
        }
        storage.read_at(&mut magic[..size.min(4) as usize], 0)?;
        if u32::from_be_bytes(magic) == foreign::COWD_MAGIC {
            // SPARSE and VMFSSPARSE extents may both be in the VMDK3 "COWD" layout.
            let ext = foreign::ForeignSparse::open_cowd(storage)?;
            files.charge_directory(desc_name, ext.directory_bytes())?;
            let len = ext.byte_len();
            return Ok(Some(VmdkExtent {
                start,
                len,
                type_name: line.kind.clone(),
                file_name: Some(path),
                kind: Kind::Foreign {
                    file: index,
                    ext: Box::new(ext),
                },
            }));
        }
        if u32::from_le_bytes(magic) != sparse::MAGIC {
            return Err(Error::invalid(&path, "Image not in VMDK format"));
        }
        let (header, gd_entries) = sparse_header(storage.as_ref(), !opts.read_only)?;
        if header.capacity == 0 {
            // A descriptor inside an extent: following it could loop.
            return Err(Error::invalid(
                &path,
                "a sparse extent that holds only a descriptor is not supported",
            ));
        }
        let sparse = SparseExtent::open(storage, header, gd_entries)?;
        files.charge_directory(desc_name, sparse.directory_bytes())?;
        // As qemu, the extent is as long as its header says, whatever the line claims.
        len = sparse.byte_len();
        Kind::Sparse {
            file: index,
            sparse: Box::new(sparse),
        }
    } else {
        let start_in_file = line
            .offset
            .unwrap_or(0)
            .checked_mul(SECTOR)
            .ok_or_else(|| {
                Error::invalid(
                    desc_name,
                    format!("Invalid extent line: offset {:?}", line.offset),
                )
            })?;
        if start_in_file.checked_add(len).is_none_or(|e| e > IN_FILE) {
            return Err(Error::invalid(
                desc_name,
                format!("flat extent '{path}' reaches past what a file can hold"),
            ));
        }
        Kind::Flat {
            file: index,
            start: start_in_file,
        }
    };
    Ok(Some(VmdkExtent {
        start,
        len,
        type_name: line.kind.clone(),
        file_name: Some(path),
        kind,
    }))
}

/// Opens an extent file with the care given to backing files: read-only when the image is,
/// never the descriptor itself, and each file once.
fn open_extent_file(
    path: &str,
    desc_file: &Arc<dyn Storage>,
    desc_name: &str,
    files: &Files,
    opts: &OpenOptions,
    lock_as: &str,
) -> Result<Arc<dyn Storage>> {
    let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
    let target = canon(path);
    if target == canon(desc_name) {
        return Err(Error::invalid(
            desc_name,
            format!("the descriptor names itself as extent file '{path}'"),
        ));
    }
    let _ = desc_file;
    // Several extents may share a file (qemu opens it once per extent; sharing the open
    // storage keeps the locks consistent).
    for (i, n) in files.names.iter().enumerate() {
        if canon(n) == target {
            return Ok(files.storages[i].clone());
        }
    }
    let mut fo = crate::locking::file_options(
        Path::new(path),
        &OpenOptions {
            format: Some(lock_as.into()),
            ..opts.clone()
        },
    )?;
    fo.read_only = opts.read_only;
    fo.cache = opts.cache;
    fo.aio = opts.aio;
    fo.create = false;
    let storage = FileStorage::open(path, fo).map_err(|e| match e {
        blockdev::Error::Open { source, .. } => Error::invalid(
            desc_name,
            format!("Could not open '{path}': {}", blockdev::os_message(&source)),
        ),
        other => Error::from(other),
    })?;
    Ok(Arc::new(storage))
}

impl Format for Vmdk {
    fn table_bytes(&self) -> u64 {
        self.directory_bytes
    }

    fn bind_backing(&self, backing: &dyn Format) {
        // Only a VMDK parent has a content ID to compare, as in qemu.
        if backing.driver() != "vmdk" {
            return;
        }
        let parent_cid = backing
            .info()
            .specific
            .as_ref()
            .and_then(|s| s.get("cid"))
            .and_then(|c| c.as_u64());
        let matches = parent_cid.is_none_or(|c| c == self.parent_cid as u64);
        self.parent_matches
            .store(matches, std::sync::atomic::Ordering::Release);
    }

    fn may_read_backing(&self) -> Result<()> {
        if self
            .parent_matches
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        Err(Error::invalid(
            self.file_name(),
            format!(
                "Invalid argument: the parent image changed after this image was made (its \
                 CID no longer matches parentCID {:x})",
                self.parent_cid
            ),
        ))
    }

    fn driver(&self) -> &'static str {
        "vmdk"
    }

    fn file_name(&self) -> &str {
        self.file.name()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    fn data_file(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let Some(e) = self.extent_at(offset) else {
            return Ok(Extent {
                mapping: Mapping::Zero,
                len,
            });
        };
        let rel = offset - e.start;
        let max = len.min(e.len - rel);
        let writable = !self.read_only;
        Ok(match &e.kind {
            Kind::Zero => Extent {
                mapping: Mapping::Zero,
                len: max,
            },
            Kind::Flat { file, start } => Extent {
                mapping: Mapping::Data {
                    offset: encode(*file, start + rel),
                    writable,
                },
                len: max,
            },
            Kind::Foreign { file, ext } => {
                let (grain, n) = ext.map(rel, max)?;
                let mapping = match grain {
                    Grain::Unallocated => Mapping::Unallocated,
                    Grain::Zero => Mapping::Zero,
                    Grain::At(host) => Mapping::Data {
                        offset: encode(*file, host),
                        writable: writable && ext.layout == foreign::Layout::Cowd,
                    },
                };
                Extent { mapping, len: n }
            }
            Kind::Sparse { file, sparse } => {
                let (grain, n) = sparse.map(rel, max)?;
                let mapping = match grain {
                    Grain::Unallocated => Mapping::Unallocated,
                    Grain::Zero => Mapping::Zero,
                    Grain::At(host) if sparse.compressed() => {
                        let grain_start = host - rel % sparse.grain;
                        let flen = sparse.file.size()?;
                        if grain_start >= flen {
                            return Err(Error::corrupt(
                                sparse.file.name(),
                                grain_start,
                                format!("grain at {grain_start:#x} lies outside the extent file (size {flen})"),
                            ));
                        }
                        // The marker says how long the compressed grain is; read enough for
                        // the worst case, clamped to the file.
                        let most = 2 * sparse.grain + SECTOR;
                        Mapping::Compressed {
                            offset: encode(*file, grain_start),
                            len: most.min(flen - grain_start),
                        }
                    }
                    Grain::At(host) => {
                        let flen = sparse.file.size()?;
                        if host + n > flen.div_ceil(SECTOR) * SECTOR + sparse.grain {
                            return Err(Error::corrupt(
                                sparse.file.name(),
                                host,
                                format!(
                                    "grain at {host:#x} lies outside the extent file (size {flen})"
                                ),
                            ));
                        }
                        Mapping::Data {
                            offset: encode(*file, host),
                            writable,
                        }
                    }
                };
                Extent { mapping, len: n }
            }
        })
    }

    fn decompress(&self, compressed: &[u8], out: &mut [u8]) -> Result<()> {
        let has_marker = self.extents.iter().any(|e| match &e.kind {
            Kind::Sparse { sparse, .. } => sparse.has_marker(),
            _ => false,
        });
        stream::decompress_grain(compressed, has_marker, out, self.file.name())
    }

    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        // Only streams hold compressed grains; qemu stores them compressed even when that
        // does not shrink them, and so does this.
        self.stream().map(|_| stream::compress_grain(data))
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.file_name().to_string(),
            });
        }
        let Some((e, sparse)) = self.stream() else {
            return Err(Error::unsupported(
                self.file_name(),
                "compressed writes are only supported in streamOptimized images",
            ));
        };
        let rel = offset - e.start;
        let grain_index = rel / sparse.grain;
        let size = u32::try_from(compressed.len()).map_err(|_| {
            Error::InvalidArgument("a compressed grain is larger than 4 GiB".into())
        })?;
        let total = stream::GRAIN_MARKER as u64 + u64::from(size);
        let mut buf = vec![0u8; (total.div_ceil(SECTOR) * SECTOR) as usize];
        buf[0..8].copy_from_slice(&(grain_index * sparse.header.granularity).to_le_bytes());
        buf[8..12].copy_from_slice(&size.to_le_bytes());
        buf[stream::GRAIN_MARKER..total as usize].copy_from_slice(compressed);
        let at = sparse.reserve_bytes(total);
        sparse.file.write_at(&buf, at)?;
        let sector = u32::try_from(at / SECTOR).map_err(|_| {
            Error::unsupported(self.file_name(), "the extent file is too large for VMDK")
        })?;
        sparse.set_entry(grain_index, sector)?;
        self.stream_written
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn close(&self) -> Result<()> {
        self.flush()?;
        if let Some((_, sparse)) = self.stream() {
            if self
                .stream_written
                .swap(false, std::sync::atomic::Ordering::AcqRel)
            {
                // The end-of-stream marker: a zero sector after the last grain.
                let at = sparse.reserve_bytes(SECTOR);
                sparse.file.write_at(&[0u8; SECTOR as usize], at)?;
            }
        }
        self.flush()
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.file_name().to_string(),
            });
        }
        let Some(e) = self.extent_at(offset) else {
            return Err(Error::invalid(
                self.file_name(),
                "write past the last extent",
            ));
        };
        let rel = offset - e.start;
        match &e.kind {
            Kind::Flat { file, start } => Ok(Allocation {
                guest_offset: offset,
                host_offset: encode(*file, start + rel),
                len: len.min(e.len - rel),
            }),
            Kind::Zero => Err(Error::unsupported(
                self.file_name(),
                "writes to a ZERO extent are not supported",
            )),
            Kind::Foreign { file, ext } => {
                let grain_start = rel / ext.grain * ext.grain;
                ext.check_writable(rel / ext.grain, rel)?;
                let host = ext.reserve_grain()?;
                Ok(Allocation {
                    guest_offset: e.start + grain_start,
                    host_offset: encode(*file, host),
                    len: ext.grain.min(e.len - grain_start),
                })
            }
            Kind::Sparse { file, sparse } => {
                if sparse.compressed() {
                    return Err(Error::unsupported(
                        self.file_name(),
                        "streamOptimized images can only be written sequentially with compressed grains",
                    ));
                }
                let grain_start = rel / sparse.grain * sparse.grain;
                let host = sparse.reserve_grain();
                Ok(Allocation {
                    guest_offset: e.start + grain_start,
                    host_offset: encode(*file, host),
                    len: sparse.grain.min(e.len - grain_start),
                })
            }
        }
    }

    fn commit(&self, allocation: Allocation) -> Result<()> {
        let Some(e) = self.extent_at(allocation.guest_offset) else {
            return Ok(());
        };
        if let Kind::Foreign { ext, .. } = &e.kind {
            let rel = allocation.guest_offset - e.start;
            let (_, host) = decode(allocation.host_offset);
            // The grain is whole in the file, as qemu writes it.
            if allocation.len < ext.grain {
                ext.file
                    .write_zeroes(host + allocation.len, ext.grain - allocation.len, false)?;
            }
            ext.set_entry(rel / ext.grain, host)?;
        }
        if let Kind::Sparse { sparse, .. } = &e.kind {
            let rel = allocation.guest_offset - e.start;
            let (_, host) = decode(allocation.host_offset);
            // A partial last grain still occupies a whole grain in the file: qemu's
            // check wants grains whole.
            let written = allocation.len;
            if written < sparse.grain {
                sparse
                    .file
                    .write_zeroes(host + written, sparse.grain - written, false)?;
            }
            let sector = u32::try_from(host / SECTOR).map_err(|_| {
                Error::unsupported(self.file_name(), "the extent file is too large for VMDK")
            })?;
            sparse.set_entry(rel / sparse.grain, sector)?;
        }
        Ok(())
    }

    fn zero_clusters(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<u64> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.file_name().to_string(),
            });
        }
        let Some(e) = self.extent_at(offset) else {
            return Ok(0);
        };
        let rel = offset - e.start;
        let here = len.min(e.len - rel);
        match &e.kind {
            Kind::Zero => Ok(here),
            // With zeroed-grain entries, whole grains become zeroed through their entry (as
            // qemu does); the grain they held, if any, is left behind unused, as in qemu.
            Kind::Sparse { sparse, .. }
                if !sparse.compressed()
                    && sparse.header.flags & sparse::FLAG_ZERO_GRAIN != 0
                    && rel.is_multiple_of(sparse.grain) =>
            {
                // The extent's last grain may be partial: reaching the end covers it.
                let whole = if rel + here == e.len {
                    here
                } else {
                    here / sparse.grain * sparse.grain
                };
                let mut g = rel / sparse.grain;
                let end = (rel + whole).div_ceil(sparse.grain);
                while g < end {
                    sparse.set_entry(g, sparse::GTE_ZEROED)?;
                    g += 1;
                }
                Ok(whole)
            }
            // Zeros are written as data otherwise, as qemu writes them.
            _ => Ok(0),
        }
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        // qemu's vmdk driver ignores discards.
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        for e in &self.extents {
            if let Kind::Sparse { sparse, .. } = &e.kind {
                sparse.flush_tables()?;
            }
        }
        Ok(self.data.flush()?)
    }

    fn info(&self) -> FormatInfo {
        let extents: Vec<serde_json::Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                m.insert("virtual-size".into(), e.len.into());
                m.insert(
                    "filename".into(),
                    e.file_name.clone().unwrap_or_default().into(),
                );
                if let Kind::Foreign { ext, .. } = &e.kind {
                    m.insert("cluster-size".into(), ext.grain.into());
                }
                if let Kind::Sparse { sparse, .. } = &e.kind {
                    m.insert("cluster-size".into(), sparse.grain.into());
                    if sparse.compressed() {
                        m.insert("compressed".into(), true.into());
                    }
                }
                m.insert("format".into(), e.type_name.clone().into());
                serde_json::Value::Object(m)
            })
            .collect();
        let mut data = serde_json::Map::new();
        let renewed = self.new_cid.load(std::sync::atomic::Ordering::Acquire);
        let cid = if renewed == u64::MAX {
            self.cid
        } else {
            renewed as u32
        };
        data.insert("cid".into(), cid.into());
        data.insert("parent-cid".into(), self.parent_cid.into());
        data.insert("create-type".into(), self.create_type.clone().into());
        data.insert("extents".into(), extents.into());
        let cluster_size = self.extents.first().and_then(|e| match &e.kind {
            Kind::Sparse { sparse, .. } => Some(sparse.grain),
            Kind::Foreign { ext, .. } => Some(ext.grain),
            _ => None,
        });
        FormatInfo {
            cluster_size,
            specific: Some(serde_json::Value::Object(data)),
            dirty: false,
            corrupt: false,
            backing_file: self.parent_hint.clone(),
            // qemu takes a VMDK's parent for a VMDK image.
            backing_format: self.parent_hint.as_ref().map(|_| "vmdk".to_string()),
        }
    }

    fn before_write(&self) -> Result<()> {
        let mut updated = self.cid_updated.lock().unwrap_or_else(|e| e.into_inner());
        if *updated {
            return Ok(());
        }
        let (file, at, max) = &self.descriptor_at;
        if *max > 0 {
            let cid = create::random_cid();
            write_cid(file.as_ref(), *at, *max, cid)?;
            self.new_cid
                .store(u64::from(cid), std::sync::atomic::Ordering::Release);
        }
        *updated = true;
        Ok(())
    }

    fn make_empty(&self) -> Result<()> {
        // qemu's vmdk driver cannot empty an image and qemu-img commit goes on without it,
        // leaving the committed image as it was (its data now equal to its backing file's):
        // the same here, so that commit ends as qemu's does.
        Ok(())
    }

    fn child_files(&self) -> Vec<(String, String)> {
        self.extent_children()
    }

    fn data_location(&self, offset: u64) -> (String, u64) {
        let (file, at) = decode(offset);
        let name = self
            .file_names
            .get(file)
            .cloned()
            .unwrap_or_else(|| self.file_name().to_string());
        (name, at)
    }

    fn file_holes_are_zeros(&self) -> bool {
        // As qemu, which asks the file of a flat extent whether a range is a hole; grains
        // of sparse extents are taken for data whatever the file underneath says.
        self.extents
            .iter()
            .all(|e| !matches!(e.kind, Kind::Sparse { .. } | Kind::Foreign { .. }))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
