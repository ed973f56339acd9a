//! The qcow2 header and its extensions: parsing with validation, and serialisation.
//!
//! All fields are big-endian. Version 2 headers are 72 bytes; version 3 headers are at least
//! 104 bytes and may carry the compression type at byte 104. Header extensions follow the
//! header inside the first cluster.

use crate::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Byte offsets of header fields that are updated in place.
pub mod offsets {
    /// `size` (u64): the virtual disk size.
    pub const SIZE: u64 = 24;
    /// `l1_size` (u32) followed by `l1_table_offset` (u64).
    pub const L1_SIZE: u64 = 36;
    /// `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE: u64 = 48;
    /// `incompatible_features` (u64).
    pub const INCOMPATIBLE: u64 = 72;
    /// `autoclear_features` (u64).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bits.
pub mod incompat {
    /// The refcounts may be inconsistent (lazy refcounts, or a crash).
    pub const DIRTY: u64 = 1 << 0;
    /// The image was found corrupt and must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTL2: u64 = 1 << 4;
    /// The bits this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Refcounts may be updated lazily; the dirty bit says when they are stale.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is consistent as a raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// The backing file's format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Names of feature bits.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The largest active L1 table qemu accepts (32 MiB); it bounds our memory too.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table qemu accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest number of internal snapshots qemu accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets must stay below 2^56 (bits 9..55 of table entries).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate, as qemu writes with a 4 KiB window.
    #[default]
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// qemu's name for it.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// Parses qemu's name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// An entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// A header extension we do not interpret, kept byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Extension type.
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in the first cluster, or 0.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the header proper.
    pub header_length: u32,
    /// Compression type (v3 with a long enough header).
    pub compression_type: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file format extension, if any.
    pub backing_format: Option<String>,
    /// The feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// Extensions we keep without interpreting.
    pub unknown_extensions: Vec<UnknownExtension>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Parses the first cluster of an image (`buf` holds at least the header; more is used for
    /// extensions and the backing file name). Every field is checked against what the rest of
    /// the code relies on, so that hostile values become errors here and never panics later.
    pub fn parse(file: &str, buf: &[u8], file_size: u64) -> Result<Header> {
        let bad = |reason: String| Error::invalid(file, reason);
        if buf.len() < 72 {
            return Err(bad(format!(
                "Image is not in qcow2 format (file is only {} bytes, the header needs 72)",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(bad("Image is not in qcow2 format".into()));
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                file,
                format!("qcow2 version {version} is not supported"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!(
                "Unsupported cluster size: 2^{cluster_bits} (cluster_bits must be 9 to 21)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        };
        if version >= 3 {
            if buf.len() < 104 {
                return Err(bad("qcow2 header too short".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(bad(format!(
                    "qcow2 header too short (header_length {})",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > buf.len() {
                return Err(bad("qcow2 header exceeds cluster size".into()));
            }
            if h.header_length > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(bad(format!("Unknown compression type {t}"))),
                };
            }
            let needs_bit = h.compression_type != CompressionType::Zlib;
            if needs_bit != (h.incompatible_features & incompat::COMPRESSION != 0) {
                return Err(bad(
                    "Invalid compression type: the compression type bit and field disagree".into(),
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(
                "Reference count entry width too large; may not exceed 64 bits".into(),
            ));
        }
        if h.size > (1u64 << 62) {
            return Err(bad(format!("Image size {} is too large", h.size)));
        }

        // Extensions run from the end of the header to the first END, within the first cluster
        // (and before the backing file name, when there is one).
        let ext_end = {
            let mut end = cluster_size.min(buf.len() as u64);
            if h.backing_file_offset != 0 && h.backing_file_offset < end {
                end = h.backing_file_offset;
            }
            end as usize
        };
        h.parse_extensions(file, &buf[..ext_end])?;

        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    h.feature_names
                        .iter()
                        .find(|f| f.kind == 0 && f.bit == b)
                        .map(|f| f.name.clone())
                        .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << b))
                })
                .collect();
            return Err(Error::unsupported(
                file,
                format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }

        if h.backing_file_offset != 0 {
            if h.backing_file_size > 1023 {
                return Err(bad("Backing file name too long".into()));
            }
            let start = h.backing_file_offset;
            // Saturating: a hostile offset near 2^64 must fail the bounds check, not wrap.
            let end = start.saturating_add(h.backing_file_size as u64);
            if end > cluster_size.min(buf.len() as u64) {
                return Err(bad(format!(
                    "Backing file name at offset {start:#x} lies outside the first cluster"
                )));
            }
            let name = &buf[start as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }

        h.validate_tables(file, file_size)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, file: &str, area: &[u8]) -> Result<()> {
        let mut pos = self.header_length as usize;
        while pos + 8 <= area.len() {
            let kind = be32(area, pos);
            let len = be32(area, pos + 4) as usize;
            pos += 8;
            if kind == ext::END {
                return Ok(());
            }
            if len > area.len() - pos {
                return Err(Error::invalid(
                    file,
                    format!(
                        "Header extension {kind:#x} at offset {:#x}: length {len} is too large",
                        pos - 8
                    ),
                ));
            }
            let data = &area[pos..pos + len];
            match kind {
                ext::BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|e| FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&e[2..])
                                .trim_end_matches('\0')
                                .to_string(),
                        })
                        .collect();
                }
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            pos += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn validate_tables(&self, file: &str, file_size: u64) -> Result<()> {
        let bad = |reason: String| Error::invalid(file, reason);
        let cs = self.cluster_size();
        let aligned = |off: u64| off.is_multiple_of(cs);

        let reftable_bytes = self.refcount_table_clusters as u64 * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(bad(format!(
                "Reference count table too large ({} clusters)",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("Image does not contain a reference count table".into()));
        }
        if !aligned(self.refcount_table_offset)
            || self.refcount_table_offset == 0
            || self
                .refcount_table_offset
                .checked_add(reftable_bytes)
                .is_none()
            || self.refcount_table_offset + reftable_bytes > MAX_HOST_OFFSET
        {
            return Err(bad(format!(
                "Invalid reference count table offset {:#x}",
                self.refcount_table_offset
            )));
        }
        if self.refcount_table_offset >= file_size {
            return Err(bad(format!(
                "Reference count table at offset {:#x} lies past the end of the file (size {file_size})",
                self.refcount_table_offset
            )));
        }

        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "Active L1 table too large ({} entries; at most {} are supported)",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        let l2_bits = self.cluster_bits - 3;
        let needed = self.size.div_ceil(1u64 << (self.cluster_bits + l2_bits));
        if (self.l1_size as u64) < needed {
            return Err(bad(format!(
                "L1 table is too small ({} entries) for the disk size {} (needs {needed})",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0
            && (!aligned(self.l1_table_offset)
                || self.l1_table_offset == 0
                || self.l1_table_offset + l1_bytes > MAX_HOST_OFFSET)
        {
            return Err(bad(format!(
                "Invalid L1 table offset {:#x}",
                self.l1_table_offset
            )));
        }
        if self.l1_size > 0 && self.l1_table_offset + l1_bytes > file_size {
            return Err(bad(format!(
                "L1 table at offset {:#x} ({l1_bytes} bytes) lies past the end of the file (size {file_size})",
                self.l1_table_offset
            )));
        }

        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!("Too many snapshots ({})", self.nb_snapshots)));
        }
        if self.nb_snapshots > 0 && (!aligned(self.snapshots_offset) || self.snapshots_offset == 0)
        {
            return Err(bad(format!(
                "Invalid snapshot table offset {:#x}",
                self.snapshots_offset
            )));
        }
        if self.crypt_method != 0 {
            return Err(Error::unsupported(
                file,
                format!(
                    "encrypted images (crypt_method {}) are not supported yet",
                    self.crypt_method
                ),
            ));
        }
        if self.incompatible_features & incompat::EXTL2 != 0 {
            return Err(Error::unsupported(
                file,
                "extended L2 entries (extended_l2=on) are not supported yet",
            ));
        }
        if self.incompatible_features & incompat::DATA_FILE != 0 {
            return Err(Error::unsupported(
                file,
                "external data files are not supported yet",
            ));
        }
        Ok(())
    }

    /// Serialises the header and its extensions (without the backing file name) into the
    /// first `len` bytes of a buffer, as qemu lays them out: header, backing format, feature name
    /// table (v3), unknown extensions, end marker; then the backing file name.
    pub fn serialize(&self, cluster_size: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, ext::BACKING_FORMAT, fmt.as_bytes());
        }
        // qemu leaves the table out of images with clusters smaller than 8 KiB, keeping the
        // little room of the first cluster for the backing file name.
        if self.version >= 3 && !self.feature_names.is_empty() && cluster_size >= 8192 {
            let mut table = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                table.extend_from_slice(&e);
            }
            push_ext(&mut b, ext::FEATURE_TABLE, &table);
        }
        for e in &self.unknown_extensions {
            push_ext(&mut b, e.kind, &e.data);
        }
        push_ext(&mut b, ext::END, &[]);
        if let Some(name) = &self.backing_file {
            let off = b.len();
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if b.len() > cluster_size {
            return Err(Error::InvalidArgument(format!(
                "The qcow2 header and its extensions ({} bytes) do not fit in one cluster ({cluster_size} bytes)",
                b.len()
            )));
        }
        Ok(b)
    }
}

/// The feature name table qemu writes into every new v3 image.
pub fn standard_feature_names() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: standard_feature_names(),
            unknown_extensions: vec![UnknownExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let mut b = h.serialize(65536).unwrap();
        b.resize(65536, 0);
        let p = Header::parse("t", &b, 0x40000).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn hostile_fields_are_errors() {
        let h = sample();
        let mut b = h.serialize(65536).unwrap();
        b.resize(65536, 0);
        let mut t = b.clone();
        t[20..24].copy_from_slice(&63u32.to_be_bytes());
        assert!(Header::parse("t", &t, 0x40000).is_err());
        let mut t = b.clone();
        t[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes());
        assert!(Header::parse("t", &t, 0x40000).is_err());
        let mut t = b.clone();
        t[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(Header::parse("t", &t, 0x40000).is_err());
        assert!(Header::parse("t", &b[..50], 0x40000).is_err());
    }
}
