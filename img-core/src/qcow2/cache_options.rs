//! qemu's qcow2 cache options (`l2-cache-size`, `l2-cache-entry-size`, `refcount-cache-size`,
//! `cache-size`, `cache-clean-interval`) and how qemu turns them into cache sizes.
//!
//! The rules, as qemu 10 applies them on Linux:
//! - The L2 cache defaults to what maps the whole disk, at most 32 MiB; an `l2-cache-size`
//!   larger than that is cut to it too.
//! - The refcount cache defaults to 4 clusters.
//! - `cache-size` alone goes to the L2 cache up to what maps the whole disk, provided 4
//!   clusters remain for refcounts; the rest is the refcount cache. With one of the other two
//!   sizes, it is the total and the other cache gets the difference. All three together are
//!   refused.
//! - When the L2 cache does not map the whole disk and no entry size is given, entries are
//!   4 KiB slices of L2 tables (smaller loads and evictions).
//! - At least 2 L2 entries and 4 refcount blocks are cached whatever the sizes say.
//! - Unused entries are freed every `cache-clean-interval` seconds (600 by default, 0 never).

/// qemu's default upper bound of the L2 cache (Linux).
pub const DEFAULT_L2_CACHE_MAX_SIZE: u64 = 32 << 20;
/// The fewest L2 cache entries (copy-on-write needs two tables at once).
pub const MIN_L2_CACHE_ENTRIES: u64 = 2;
/// The fewest cached refcount blocks.
pub const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// qemu's default `cache-clean-interval` in seconds (Linux).
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;
/// The smallest L2 cache entry: qemu's smallest cluster.
pub const MIN_L2_CACHE_ENTRY_SIZE: u64 = 512;
/// The default entry size when the L2 cache does not cover the disk.
const PARTIAL_L2_ENTRY_SIZE: u64 = 4096;
/// qemu stores cache sizes in entries as a C `int`.
const MAX_CACHE_ENTRIES: u64 = i32::MAX as u64;

/// qemu's qcow2 cache options; `None` means qemu's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// `l2-cache-size`: bytes of L2 tables to cache.
    pub l2_cache_size: Option<u64>,
    /// `l2-cache-entry-size`: bytes per L2 cache entry (512 up to the cluster size).
    pub l2_cache_entry_size: Option<u64>,
    /// `refcount-cache-size`: bytes of refcount blocks to cache.
    pub refcount_cache_size: Option<u64>,
    /// `cache-size`: the two caches together.
    pub cache_size: Option<u64>,
    /// `cache-clean-interval`: seconds after which unused entries are freed (0: never).
    pub cache_clean_interval: Option<u64>,
}

/// Cache sizes resolved for one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes per L2 cache entry (a whole table, or a slice of one).
    pub l2_entry_size: u64,
    /// Number of L2 cache entries.
    pub l2_entries: u64,
    /// Number of cached refcount blocks (each one cluster).
    pub refcount_entries: u64,
}

impl CacheOptions {
    /// Resolves the sizes for an image with `cluster_size` and `virtual_size`, with qemu's
    /// error messages for combinations it refuses.
    pub fn resolve(&self, cluster_size: u64, virtual_size: u64) -> Result<CacheConfig, String> {
        let cs = cluster_size;
        let min_refcount = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
        // qemu counts the disk in whole 512-byte sectors.
        let disk = virtual_size / 512 * 512;
        let max_l2 = (disk.div_ceil(cs) * 8).div_ceil(cs) * cs;
        let l2_setting = self.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX_SIZE);
        let mut l2 = max_l2.min(l2_setting);
        let mut refcount = self.refcount_cache_size.unwrap_or(0);
        if let Some(combined) = self.cache_size {
            if self.l2_cache_size.is_some() && self.refcount_cache_size.is_some() {
                return Err(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set \
                            at the same time"
                        .into(),
                );
            }
            if self.l2_cache_size.is_some() && l2_setting > combined {
                return Err("l2-cache-size may not exceed cache-size".into());
            }
            if refcount > combined {
                return Err("refcount-cache-size may not exceed cache-size".into());
            }
            if self.l2_cache_size.is_some() {
                refcount = combined - l2;
            } else if self.refcount_cache_size.is_some() {
                l2 = combined - refcount;
            } else if combined >= max_l2.saturating_add(min_refcount) {
                l2 = max_l2;
                refcount = combined - l2;
            } else {
                refcount = combined.min(min_refcount);
                l2 = combined - refcount;
            }
        }
        let entry_size = match self.l2_cache_entry_size {
            Some(e) => e,
            None if l2 < max_l2 => cs.min(PARTIAL_L2_ENTRY_SIZE),
            None => cs,
        };
        if entry_size < MIN_L2_CACHE_ENTRY_SIZE || entry_size > cs || !entry_size.is_power_of_two()
        {
            return Err(format!(
                "L2 cache entry size must be a power of two between {MIN_L2_CACHE_ENTRY_SIZE} \
                 and the cluster size ({cs})"
            ));
        }
        let l2_entries = (l2 / entry_size).max(MIN_L2_CACHE_ENTRIES);
        if l2_entries > MAX_CACHE_ENTRIES {
            return Err("L2 cache size too big".into());
        }
        let refcount_entries = (refcount / cs).max(MIN_REFCOUNT_CACHE_CLUSTERS);
        if refcount_entries > MAX_CACHE_ENTRIES {
            return Err("Refcount cache size too big".into());
        }
        Ok(CacheConfig {
            l2_entry_size: entry_size,
            l2_entries,
            refcount_entries,
        })
    }

    /// The cleaning interval in seconds (0: never), or qemu's error when it is too large.
    pub fn clean_interval(&self) -> Result<u64, String> {
        let i = self
            .cache_clean_interval
            .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL);
        if i > u32::MAX as u64 {
            return Err("Cache clean interval too big".into());
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = 1024 * 1024;
    const G: u64 = 1024 * M;

    fn opts(l2: Option<u64>, rc: Option<u64>, all: Option<u64>) -> CacheOptions {
        CacheOptions {
            l2_cache_size: l2,
            refcount_cache_size: rc,
            cache_size: all,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_cover_the_disk_up_to_32_mib() {
        // 1 GiB at 64 KiB clusters: 16384 entries = 128 KiB of L2 tables = 2 tables.
        let c = CacheOptions::default().resolve(64 * K, G).unwrap();
        assert_eq!(
            c,
            CacheConfig {
                l2_entry_size: 64 * K,
                l2_entries: 2,
                refcount_entries: 4
            }
        );
        // 100 GiB: 12.5 MiB of tables, all cached.
        let c = CacheOptions::default().resolve(64 * K, 100 * G).unwrap();
        assert_eq!((c.l2_entry_size, c.l2_entries), (64 * K, 200));
        // 1 TiB needs 128 MiB: capped at 32 MiB, in 4 KiB slices.
        let c = CacheOptions::default().resolve(64 * K, 1024 * G).unwrap();
        assert_eq!((c.l2_entry_size, c.l2_entries), (4 * K, 8192));
        // A tiny disk still gets two entries.
        let c = CacheOptions::default().resolve(512, 512).unwrap();
        assert_eq!(
            (c.l2_entry_size, c.l2_entries, c.refcount_entries),
            (512, 2, 4)
        );
    }

    #[test]
    fn explicit_sizes() {
        let c = opts(Some(M), Some(M), None)
            .resolve(64 * K, 1024 * G)
            .unwrap();
        assert_eq!(
            (c.l2_entry_size, c.l2_entries, c.refcount_entries),
            (4 * K, 256, 16)
        );
        // More than the disk needs is cut to the disk.
        let c = opts(Some(G), None, None).resolve(64 * K, G).unwrap();
        assert_eq!((c.l2_entry_size, c.l2_entries), (64 * K, 2));
        let c = CacheOptions {
            l2_cache_size: Some(K),
            l2_cache_entry_size: Some(512),
            ..Default::default()
        }
        .resolve(64 * K, G)
        .unwrap();
        assert_eq!((c.l2_entry_size, c.l2_entries), (512, 2));
    }

    #[test]
    fn combined_size_is_split_as_qemu_splits_it() {
        // Enough for the whole disk plus 4 clusters: L2 gets the disk, refcounts the rest.
        let c = opts(None, None, Some(M)).resolve(64 * K, G).unwrap();
        assert_eq!((c.l2_entries, c.refcount_entries), (2, 14));
        // Not enough: refcounts get their minimum first.
        let c = opts(None, None, Some(M)).resolve(64 * K, 1024 * G).unwrap();
        assert_eq!(
            (c.l2_entry_size, c.l2_entries, c.refcount_entries),
            (4 * K, 192, 4)
        );
        let c = opts(Some(512 * K), None, Some(M))
            .resolve(64 * K, 1024 * G)
            .unwrap();
        assert_eq!((c.l2_entries, c.refcount_entries), (128, 8));
        let c = opts(None, Some(256 * K), Some(M))
            .resolve(64 * K, 1024 * G)
            .unwrap();
        assert_eq!((c.l2_entries, c.refcount_entries), (192, 4));
    }

    #[test]
    fn refusals_use_qemus_messages() {
        let e = |o: CacheOptions| o.resolve(64 * K, G).unwrap_err();
        assert_eq!(
            e(opts(Some(M), Some(M), Some(2 * M))),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
        );
        assert_eq!(
            e(opts(Some(4 * M), None, Some(2 * M))),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            e(opts(None, Some(4 * M), Some(2 * M))),
            "refcount-cache-size may not exceed cache-size"
        );
        for bad in [0, 256, 1000, 128 * K] {
            assert_eq!(
                e(CacheOptions {
                    l2_cache_entry_size: Some(bad),
                    ..Default::default()
                }),
                "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"
            );
        }
        assert_eq!(
            e(opts(None, Some(100_000_000_000_000_000), None)),
            "Refcount cache size too big"
        );
        assert_eq!(
            e(opts(None, None, Some(1 << 50))),
            "Refcount cache size too big"
        );
        assert_eq!(
            e(opts(None, Some(M), Some(1 << 50))),
            "L2 cache size too big"
        );
        let i = |v| CacheOptions {
            cache_clean_interval: Some(v),
            ..Default::default()
        };
        assert_eq!(i(u32::MAX as u64).clean_interval(), Ok(u32::MAX as u64));
        assert_eq!(
            i(u32::MAX as u64 + 1).clean_interval().unwrap_err(),
            "Cache clean interval too big"
        );
        assert_eq!(CacheOptions::default().clean_interval(), Ok(600));
    }
}
