//! A least-recently-used cache of cluster-sized metadata tables (L2 tables, refcount blocks).
//!
//! The cache never writes on its own: dirty tables leave it only through [`MetaCache::write_dirty`],
//! which the driver calls in the order the qcow2 spec requires. Eviction takes only clean
//! tables; when every table is dirty the cache grows past its capacity until the driver's next
//! ordered flush, which [`MetaCache::over_capacity`] asks for.

use crate::Result;
use blockdev::Storage;
use std::collections::HashMap;

struct Entry {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

/// Cached tables keyed by their host offset.
pub struct MetaCache {
    entries: HashMap<u64, Entry>,
    capacity: usize,
    table_size: usize,
    clock: u64,
}

impl MetaCache {
    /// A cache of at most `capacity` tables of `table_size` bytes each.
    pub fn new(capacity: usize, table_size: usize) -> Self {
        MetaCache {
            entries: HashMap::new(),
            capacity: capacity.max(2),
            table_size,
            clock: 0,
        }
    }

    /// Number of tables held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds no tables.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether dirty tables keep the cache above its capacity, so an ordered flush is due.
    pub fn over_capacity(&self) -> bool {
        self.entries.len() > self.capacity
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn make_room(&mut self) {
        while self.entries.len() >= self.capacity {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.dirty)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
    }

    /// The table at `offset`, read from `file` if it is not cached.
    pub fn get(&mut self, file: &dyn Storage, offset: u64) -> Result<&[u8]> {
        self.load(file, offset)?;
        Ok(&self.entries[&offset].data)
    }

    /// The table at `offset` for modification; it becomes dirty.
    pub fn get_mut(&mut self, file: &dyn Storage, offset: u64) -> Result<&mut [u8]> {
        self.load(file, offset)?;
        let e = self.entries.get_mut(&offset).expect("just loaded");
        e.dirty = true;
        Ok(&mut e.data)
    }

    /// Installs a new table at `offset` whose on-disk content is not to be read (a freshly
    /// allocated cluster); it starts dirty with `data`.
    pub fn insert_new(&mut self, offset: u64, data: Vec<u8>) {
        debug_assert_eq!(data.len(), self.table_size);
        self.make_room();
        let last_use = self.tick();
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty: true,
                last_use,
            },
        );
    }

    fn load(&mut self, file: &dyn Storage, offset: u64) -> Result<()> {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(&offset) {
            e.last_use = now;
            return Ok(());
        }
        let mut data = vec![0u8; self.table_size];
        file.read_at(&mut data, offset)?;
        self.make_room();
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty: false,
                last_use: now,
            },
        );
        Ok(())
    }

    /// Writes every dirty table to `file` (without flushing it); returns how many were written.
    pub fn write_dirty(&mut self, file: &dyn Storage) -> Result<usize> {
        let mut dirty: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&k, _)| k)
            .collect();
        // Ascending offsets turn a flush of many tables into a forward sweep over the file.
        dirty.sort_unstable();
        for off in &dirty {
            let e = self.entries.get_mut(off).expect("present");
            file.write_at(&e.data, *off)?;
            e.dirty = false;
        }
        self.make_room_after_flush();
        Ok(dirty.len())
    }

    fn make_room_after_flush(&mut self) {
        // Everything is clean now, so plain LRU order decides.
        while self.entries.len() > self.capacity {
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(&k, _)| k)
                .expect("non-empty");
            self.entries.remove(&victim);
        }
    }

    /// Forgets the table at `offset` (its cluster was freed); a dirty copy is dropped.
    pub fn forget(&mut self, offset: u64) {
        self.entries.remove(&offset);
    }

    /// Drops every table, dirty or not (after a repair rewrote the metadata underneath).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
