//! Creating qcow2 images laid out as qemu-img lays them out.
//!
//! qemu writes the header into cluster 0, a one-cluster refcount table into cluster 1 and the
//! first refcount block into cluster 2, then grows the L1 table through the ordinary
//! allocator, which puts it at cluster 3. We do the same, so header fields and table offsets
//! match what tools that inspect headers expect.

use super::header::{self, CompressionType, Header};
use super::{Qcow2, Qcow2OpenOptions};
use crate::{Error, Result};
use blockdev::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// Options of `img create -f qcow2`, named as qemu names them.
#[derive(Clone, Debug)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// `cluster_size` (512 B to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// `compat`: 2 for 0.10, 3 for 1.1.
    pub version: u32,
    /// `refcount_bits` (1 to 64, a power of two).
    pub refcount_bits: u32,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `compression_type`.
    pub compression_type: CompressionType,
    /// `extended_l2` (refused: not supported yet).
    pub extended_l2: bool,
    /// `backing_file`: the name recorded for the backing file, as given.
    pub backing_file: Option<String>,
    /// `backing_fmt`: the backing file's format.
    pub backing_format: Option<String>,
}

impl Default for Qcow2CreateOptions {
    fn default() -> Self {
        Qcow2CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl Qcow2CreateOptions {
    /// Checks the combination as qemu does, with qemu's messages.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version < 3 {
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
            }
            if self.lazy_refcounts {
                return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.compression_type != CompressionType::Zlib {
                return bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
        }
        if self.extended_l2 {
            return Err(Error::unsupported(
                "",
                "extended L2 entries (extended_l2=on) are not supported yet",
            ));
        }
        let l1 = size_to_l1(self.size, cs.trailing_zeros());
        if l1 * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "Image size {} is too large for the cluster size {cs}",
                self.size
            )));
        }
        Ok(())
    }
}

/// Entries of an L1 table that maps `size` bytes.
pub fn size_to_l1(size: u64, cluster_bits: u32) -> u64 {
    size.div_ceil(1u64 << (cluster_bits + cluster_bits - 3))
}

/// Creates a qcow2 image at `path`.
pub fn create(path: &Path, opts: &Qcow2CreateOptions) -> Result<()> {
    opts.validate()?;
    // On network storage: an empty RBD image that grows as the metadata is written, or an
    // existing LUN or export written over.
    if let Some(storage) = path.to_str().and_then(|n| blockdev::network::create(n, 0)) {
        return create_on(storage?, opts);
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(path)?);
    create_on(storage, opts)
}

/// Writes a new qcow2 image onto `storage`, whose previous content is ignored.
pub fn create_on(storage: Arc<dyn Storage>, opts: &Qcow2CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let v3 = opts.version >= 3;
    let mut incompatible = 0;
    if opts.compression_type != CompressionType::Zlib {
        incompatible |= header::incompat::COMPRESSION;
    }
    let h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        // As qemu: the image starts empty and is then grown to its size.
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            header::compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if v3 { 112 } else { 72 },
        compression_type: opts.compression_type,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_file.as_ref().and(opts.backing_format.clone()),
        feature_names: if v3 {
            header::standard_feature_names()
        } else {
            Vec::new()
        },
        unknown_extensions: Vec::new(),
    };
    let mut first = h.serialize(cs as usize)?;
    first.resize(cs as usize, 0);
    storage.truncate(0)?;
    // Refcount table (cluster 1) pointing at the refcount block in cluster 2, which counts
    // clusters 0, 1 and 2. They are durable before the header that names them: a create
    // killed in between leaves a file that is not a qcow2 image yet (no magic), never a
    // header whose refcount table is missing.
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 {
        super::refcount::set_entry(&mut block, h.refcount_order, i, 1);
    }
    storage.write_at(&[table, block].concat(), cs)?;
    storage.flush()?;
    storage.write_at(&first, 0)?;
    storage.flush()?;

    let l1_entries = size_to_l1(opts.size, cluster_bits);
    let q = Qcow2::open(storage.clone(), &Qcow2OpenOptions::default())?;
    q.grow_l1(l1_entries)?;
    crate::Format::close(&q)?;
    drop(q);
    storage.write_at(&opts.size.to_be_bytes(), header::offsets::SIZE)?;
    storage.flush()?;
    Ok(())
}
