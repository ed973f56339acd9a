//! A least-recently-used cache of metadata entries: slices of L2 tables, refcount blocks.
//!
//! Entries are `entry_size` bytes (a whole cluster, or for L2 tables a power-of-two slice of
//! one, qemu's `l2-cache-entry-size`) keyed by their host offset. The memory for `capacity`
//! entries is one anonymous mapping reserved at creation, as qemu allocates its caches, and
//! touched only as entries are loaded; entries freed by [`MetaCache::clean_unused`] give their
//! pages back to the system.
//!
//! Every operation is O(1) apart from the writeback and the periodic clean: a hash map finds
//! entries, clean entries sit in an intrusive doubly linked list in LRU order (so eviction
//! takes the list's tail), and dirty entries are tracked in a vector.
//!
//! The cache never writes on its own: dirty entries leave it only through
//! [`MetaCache::write_dirty`], which the driver calls in the order the qcow2 spec requires.
//! Eviction takes only clean entries; when every entry is dirty the cache grows past its
//! capacity (with separately allocated buffers) until the driver's next writeback, which
//! [`MetaCache::over_capacity`] asks for, and then shrinks back.

use crate::Result;
use blockdev::Storage;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;

/// A hasher for host offsets. Keys are aligned offsets, so their low bits are zero: a
/// multiplication spreads the significant bits over the whole word, and folding the high half
/// back in gives the table's index bits (the low ones) every input bit.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ b as u64);
        }
    }

    fn write_u64(&mut self, v: u64) {
        let h = (v ^ (v >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// Anonymous memory for the entries of a cache, reserved at once and populated lazily.
struct Pool {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the pool exclusively owns its mapping, like a `Vec<u8>`; shared access only reads.
unsafe impl Send for Pool {}
// SAFETY: as above; mutation needs `&mut Pool`.
unsafe impl Sync for Pool {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl Pool {
    /// Maps `len` bytes of zeroed memory; `None` when the system refuses (too large).
    fn new(len: usize) -> Option<Pool> {
        if len == 0 {
            return Some(Pool {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choice; the result
        // is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Pool {
            ptr: NonNull::new(p.cast())?,
            len,
        })
    }

    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: in bounds of the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: in bounds, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }

    /// Gives the whole pages inside `[off, off + len)` back to the system; they read as zeros
    /// when next touched.
    fn release(&mut self, off: usize, len: usize, page: usize) {
        let start = off.div_ceil(page) * page;
        let end = ((off + len).min(self.len)) / page * page;
        if end > start {
            // SAFETY: the range lies inside our private anonymous mapping and no reference into
            // it is alive (`&mut self`); MADV_DONTNEED only drops the pages' contents.
            unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(start).cast(),
                    end - start,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

#[cfg(test)]
impl Pool {
    /// Pages of the mapping that are resident in memory.
    fn resident_pages(&self, page: usize) -> usize {
        let pages = self.len.div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: the range is our mapping and `v` has one byte per page of it.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore failed");
        v.iter().filter(|&&b| b & 1 != 0).count()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `new`, which nothing references now.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            }
        }
    }
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    Clean,
    Dirty,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    offset: u64,
    state: State,
    /// Value of the cache's use counter at the last access.
    last_use: u64,
    /// LRU list links (clean slots only).
    prev: u32,
    next: u32,
}

/// Counters describing a cache, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries the cache is sized for.
    pub capacity: usize,
    /// Bytes per entry.
    pub entry_size: usize,
    /// Entries held now (clean and dirty).
    pub entries: usize,
    /// Entries holding changes not yet written.
    pub dirty: usize,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that read the entry from the file.
    pub misses: u64,
    /// Clean entries dropped to make room.
    pub evictions: u64,
    /// Entries freed because they were not used for a cleaning interval.
    pub cleaned: u64,
}

/// Cached metadata entries keyed by their host offset.
pub struct MetaCache {
    entry_size: usize,
    capacity: usize,
    page: usize,
    pool: Pool,
    /// Buffers of the slots past `capacity`, which exist only while every entry is dirty.
    overflow: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    map: OffsetMap<u32>,
    free: Vec<u32>,
    /// Most recently used clean slot.
    head: u32,
    /// Least recently used clean slot: the next victim.
    tail: u32,
    /// Slots that became dirty since the last writeback (may hold stale indices, which the
    /// writeback skips).
    dirty: Vec<u32>,
    dirty_count: usize,
    clock: u64,
    /// Use counter at the previous clean: entries not used since are freed by the next one.
    clean_mark: u64,
    stats: CacheStats,
}

impl MetaCache {
    /// A cache of `capacity` entries of `entry_size` bytes; `None` when the memory cannot be
    /// reserved.
    pub fn new(capacity: usize, entry_size: usize) -> Option<Self> {
        let capacity = capacity.max(1);
        let pool = Pool::new(capacity.checked_mul(entry_size)?)?;
        Some(MetaCache {
            entry_size,
            capacity,
            page: page_size(),
            pool,
            overflow: Vec::new(),
            slots: Vec::new(),
            map: OffsetMap::default(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            dirty: Vec::new(),
            dirty_count: 0,
            clock: 0,
            clean_mark: 0,
            stats: CacheStats {
                capacity,
                entry_size,
                ..Default::default()
            },
        })
    }

    /// Bytes per entry.
    pub fn entry_size(&self) -> usize {
        self.entry_size
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.map.len(),
            dirty: self.dirty_count,
            ..self.stats
        }
    }

    /// Whether dirty entries keep the cache above its capacity, so a writeback is due.
    pub fn over_capacity(&self) -> bool {
        self.map.len() > self.capacity
    }

    /// Whether any entry is dirty.
    pub fn has_dirty(&self) -> bool {
        self.dirty_count > 0
    }

    fn buf(&self, slot: u32) -> &[u8] {
        let s = slot as usize;
        if s < self.capacity {
            self.pool.slice(s * self.entry_size, self.entry_size)
        } else {
            &self.overflow[s - self.capacity]
        }
    }

    fn buf_mut(&mut self, slot: u32) -> &mut [u8] {
        let s = slot as usize;
        if s < self.capacity {
            self.pool.slice_mut(s * self.entry_size, self.entry_size)
        } else {
            &mut self.overflow[s - self.capacity]
        }
    }

    fn unlink(&mut self, s: u32) {
        let Slot { prev, next, .. } = self.slots[s as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let slot = &mut self.slots[s as usize];
        slot.prev = NIL;
        slot.next = NIL;
    }

    fn push_front(&mut self, s: u32) {
        let old = self.head;
        {
            let slot = &mut self.slots[s as usize];
            slot.prev = NIL;
            slot.next = old;
        }
        if old == NIL {
            self.tail = s;
        } else {
            self.slots[old as usize].prev = s;
        }
        self.head = s;
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks slot `s` used now.
    fn touch(&mut self, s: u32) {
        let now = self.tick();
        self.slots[s as usize].last_use = now;
        if self.slots[s as usize].state == State::Clean && self.head != s {
            self.unlink(s);
            self.push_front(s);
        }
    }

    fn mark_dirty(&mut self, s: u32) {
        match self.slots[s as usize].state {
            State::Dirty => {}
            State::Clean => {
                self.unlink(s);
                self.slots[s as usize].state = State::Dirty;
                self.dirty.push(s);
                self.dirty_count += 1;
            }
            State::Free => unreachable!("a free slot is never handed out"),
        }
    }

    /// A slot for a new entry: a free one, the least recently used clean one, or, when every
    /// entry is dirty, one past the capacity. The slot is out of the map and the LRU list.
    fn take_slot(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            if s as usize >= self.capacity {
                self.overflow[s as usize - self.capacity].resize(self.entry_size, 0);
            }
            return s;
        }
        if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                offset: 0,
                state: State::Free,
                last_use: 0,
                prev: NIL,
                next: NIL,
            });
            return (self.slots.len() - 1) as u32;
        }
        if self.tail != NIL {
            let s = self.tail;
            self.unlink(s);
            let off = self.slots[s as usize].offset;
            self.map.remove(&off);
            self.slots[s as usize].state = State::Free;
            self.stats.evictions += 1;
            return s;
        }
        self.overflow.push(vec![0u8; self.entry_size]);
        self.slots.push(Slot {
            offset: 0,
            state: State::Free,
            last_use: 0,
            prev: NIL,
            next: NIL,
        });
        (self.slots.len() - 1) as u32
    }

    /// Installs `offset` in the taken slot `s`.
    fn install(&mut self, s: u32, offset: u64, state: State) {
        let now = self.tick();
        let slot = &mut self.slots[s as usize];
        slot.offset = offset;
        slot.state = state;
        slot.last_use = now;
        self.map.insert(offset, s);
        match state {
            State::Clean => self.push_front(s),
            State::Dirty => {
                self.dirty.push(s);
                self.dirty_count += 1;
            }
            State::Free => unreachable!(),
        }
    }

    /// The slot holding `offset`, read from `file` if it is not cached.
    fn load(&mut self, file: &dyn Storage, offset: u64) -> Result<u32> {
        if let Some(&s) = self.map.get(&offset) {
            self.stats.hits += 1;
            self.touch(s);
            return Ok(s);
        }
        self.stats.misses += 1;
        let s = self.take_slot();
        if let Err(e) = file.read_at(self.buf_mut(s), offset) {
            self.free.push(s);
            return Err(e.into());
        }
        self.install(s, offset, State::Clean);
        Ok(s)
    }

    /// The entry at `offset`, read from `file` if it is not cached.
    pub fn get(&mut self, file: &dyn Storage, offset: u64) -> Result<&[u8]> {
        let s = self.load(file, offset)?;
        Ok(self.buf(s))
    }

    /// The entry at `offset` for modification; it becomes dirty.
    pub fn get_mut(&mut self, file: &dyn Storage, offset: u64) -> Result<&mut [u8]> {
        let s = self.load(file, offset)?;
        self.mark_dirty(s);
        Ok(self.buf_mut(s))
    }

    /// The cached entry at `offset`, if any, without counting it as a use.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.map.get(&offset).map(|&s| self.buf(s))
    }

    /// Installs a new entry at `offset` whose on-disk content is not to be read (a freshly
    /// allocated cluster); it starts dirty, and the caller fills the returned buffer.
    pub fn insert_new(&mut self, offset: u64) -> &mut [u8] {
        let s = match self.map.get(&offset) {
            Some(&s) => {
                self.touch(s);
                self.mark_dirty(s);
                s
            }
            None => {
                let s = self.take_slot();
                self.install(s, offset, State::Dirty);
                s
            }
        };
        self.buf_mut(s)
    }

    /// Writes every dirty entry to `file` (without flushing it), in ascending offset order;
    /// returns how many were written.
    pub fn write_dirty(&mut self, file: &dyn Storage) -> Result<usize> {
        if self.dirty_count == 0 {
            self.dirty.clear();
            return Ok(0);
        }
        let mut todo: Vec<(u64, u32)> = self
            .dirty
            .iter()
            .filter(|&&s| self.slots[s as usize].state == State::Dirty)
            .map(|&s| (self.slots[s as usize].offset, s))
            .collect();
        // Ascending offsets turn a writeback of many entries into a forward sweep.
        todo.sort_unstable();
        todo.dedup();
        for &(off, s) in &todo {
            file.write_at(self.buf(s), off)?;
            // Clean now: back into the LRU list (as recently used: it was just modified).
            self.slots[s as usize].state = State::Clean;
            self.dirty_count -= 1;
            self.push_front(s);
        }
        self.dirty.clear();
        self.shrink_overflow();
        Ok(todo.len())
    }

    /// Once nothing is dirty, drops the slots past the capacity.
    fn shrink_overflow(&mut self) {
        if self.slots.len() <= self.capacity || self.dirty_count > 0 {
            return;
        }
        for s in self.capacity..self.slots.len() {
            let slot = self.slots[s];
            if slot.state != State::Free {
                self.unlink(s as u32);
                self.map.remove(&slot.offset);
            }
        }
        self.slots.truncate(self.capacity);
        self.overflow.clear();
        let cap = self.capacity as u32;
        self.free.retain(|&s| s < cap);
    }

    fn release_slot(&mut self, s: u32) {
        let slot = self.slots[s as usize];
        match slot.state {
            State::Free => return,
            State::Clean => self.unlink(s),
            State::Dirty => self.dirty_count -= 1,
        }
        self.map.remove(&slot.offset);
        self.slots[s as usize].state = State::Free;
        self.free.push(s);
    }

    /// Forgets the entry at `offset` (its cluster was freed); a dirty copy is dropped.
    pub fn forget(&mut self, offset: u64) {
        if let Some(&s) = self.map.get(&offset) {
            self.release_slot(s);
        }
    }

    /// Forgets every entry inside the clusters `clusters` (sorted cluster indices).
    pub fn forget_clusters(&mut self, clusters: &[u64], cluster_bits: u32) {
        if self.map.is_empty() || clusters.is_empty() {
            return;
        }
        let per_cluster = ((1usize << cluster_bits) / self.entry_size).max(1);
        if clusters.len().saturating_mul(per_cluster) <= self.map.len() {
            for &c in clusters {
                for i in 0..per_cluster {
                    self.forget((c << cluster_bits) + (i * self.entry_size) as u64);
                }
            }
        } else {
            let doomed: Vec<u32> = self
                .map
                .iter()
                .filter(|(&off, _)| clusters.binary_search(&(off >> cluster_bits)).is_ok())
                .map(|(_, &s)| s)
                .collect();
            for s in doomed {
                self.release_slot(s);
            }
        }
    }

    /// Frees the clean entries not used since the previous call and gives their memory back;
    /// returns how many were freed. Called every `cache-clean-interval` seconds, this frees
    /// what was idle for at least one whole interval, as qemu's cache cleaner does.
    pub fn clean_unused(&mut self) -> usize {
        let mut freed = Vec::new();
        while self.tail != NIL && self.slots[self.tail as usize].last_use <= self.clean_mark {
            let s = self.tail;
            self.release_slot(s);
            freed.push(s);
        }
        self.clean_mark = self.clock;
        self.stats.cleaned += freed.len() as u64;
        self.give_back(&mut freed);
        freed.len()
    }

    /// Releases the memory of freed slots: whole pages of the pool, and overflow buffers.
    fn give_back(&mut self, slots: &mut [u32]) {
        slots.sort_unstable();
        let es = self.entry_size;
        let mut i = 0;
        while i < slots.len() {
            let s = slots[i] as usize;
            if s >= self.capacity {
                self.overflow[s - self.capacity] = Vec::new();
                i += 1;
                continue;
            }
            // Extend over a run of consecutive slots, so that small entries sharing pages
            // release them together.
            let mut j = i + 1;
            while j < slots.len() && slots[j] as usize == slots[j - 1] as usize + 1 {
                j += 1;
            }
            let run_end = (slots[j - 1] as usize + 1).min(self.capacity);
            self.pool.release(s * es, (run_end - s) * es, self.page);
            i = j;
        }
    }

    /// Drops every entry, dirty or not (after a repair rewrote the metadata underneath).
    pub fn clear(&mut self) {
        let mut all: Vec<u32> = self.map.values().copied().collect();
        for &s in &all {
            self.release_slot(s);
        }
        self.dirty.clear();
        self.give_back(&mut all);
        self.shrink_overflow();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::Storage;
    use std::sync::Mutex;

    /// A file in memory that counts reads.
    #[derive(Debug, Default)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        reads: Mutex<u64>,
    }

    impl Storage for Mem {
        fn name(&self) -> &str {
            "mem"
        }
        fn size(&self) -> blockdev::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
            *self.reads.lock().unwrap() += 1;
            let d = self.data.lock().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
            let mut d = self.data.lock().unwrap();
            let o = offset as usize;
            if d.len() < o + buf.len() {
                d.resize(o + buf.len(), 0);
            }
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> blockdev::Result<()> {
            Ok(())
        }
        fn truncate(&self, size: u64) -> blockdev::Result<()> {
            self.data.lock().unwrap().resize(size as usize, 0);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> blockdev::Result<()> {
            self.write_at(&vec![0; len as usize], offset)
        }
        fn discard(&self, _: u64, _: u64) -> blockdev::Result<()> {
            Ok(())
        }
        fn allocation(&self, _: u64, len: u64) -> blockdev::Result<(blockdev::Allocation, u64)> {
            Ok((blockdev::Allocation::Data, len))
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    fn mem(entries: usize, es: usize) -> Mem {
        let m = Mem::default();
        let data: Vec<u8> = (0..entries * es).map(|i| (i / es) as u8).collect();
        *m.data.lock().unwrap() = data;
        m
    }

    #[test]
    fn lru_evicts_least_recently_used_clean_entry() {
        let f = mem(8, 512);
        let mut c = MetaCache::new(3, 512).unwrap();
        for i in 0..3u64 {
            assert_eq!(c.get(&f, i * 512).unwrap()[0], i as u8);
        }
        c.get(&f, 0).unwrap(); // 1 is now the oldest
        c.get(&f, 3 * 512).unwrap();
        assert!(c.peek(512).is_none());
        assert!(c.peek(0).is_some() && c.peek(1024).is_some() && c.peek(1536).is_some());
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().misses, 4);
        assert_eq!(c.stats().hits, 1);
    }

    #[test]
    fn dirty_entries_are_never_evicted_and_overflow_shrinks_after_writeback() {
        let f = mem(8, 512);
        let mut c = MetaCache::new(2, 512).unwrap();
        for i in 0..5u64 {
            c.get_mut(&f, i * 512).unwrap()[1] = 0xee;
        }
        assert_eq!(c.len(), 5);
        assert!(c.over_capacity());
        assert_eq!(c.write_dirty(&f).unwrap(), 5);
        assert!(!c.over_capacity() && !c.has_dirty());
        assert_eq!(c.len(), 2);
        for i in 0..5usize {
            assert_eq!(f.data.lock().unwrap()[i * 512 + 1], 0xee);
        }
        // What stayed is served correctly, what left is read again.
        for i in 0..5u64 {
            let e = c.get(&f, i * 512).unwrap();
            assert_eq!((e[0], e[1]), (i as u8, 0xee));
        }
    }

    #[test]
    fn clean_frees_entries_idle_for_a_whole_interval() {
        let f = mem(8, 4096);
        let mut c = MetaCache::new(8, 4096).unwrap();
        for i in 0..4u64 {
            c.get(&f, i * 4096).unwrap();
        }
        c.get_mut(&f, 4 * 4096).unwrap()[0] = 9;
        // Everything was used during the first interval.
        assert_eq!(c.clean_unused(), 0);
        c.get(&f, 0).unwrap();
        // Entries 1..4 were idle for an interval; 0 was used; the dirty one stays.
        assert_eq!(c.clean_unused(), 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.stats().cleaned, 3);
        // Freed entries come back from the file with their content.
        assert_eq!(c.get(&f, 2 * 4096).unwrap()[0], 2);
        // Entry 0 was idle during the last interval, the reloaded 2 was not.
        assert_eq!(c.clean_unused(), 1);
        assert!(c.peek(0).is_none() && c.peek(2 * 4096).is_some());
        assert_eq!(c.clean_unused(), 1);
        assert_eq!(c.len(), 1);
        assert!(c.has_dirty());
    }

    #[test]
    fn cleaning_gives_the_memory_back() {
        let es = 64 << 10;
        let f = mem(64, es);
        let mut c = MetaCache::new(64, es).unwrap();
        let page = c.page;
        assert_eq!(
            c.pool.resident_pages(page),
            0,
            "memory is only touched when used"
        );
        for i in 0..64u64 {
            c.get(&f, i * es as u64).unwrap();
        }
        assert_eq!(c.pool.resident_pages(page), 64 * es / page);
        c.clean_unused();
        c.clean_unused();
        assert!(c.is_empty());
        assert_eq!(c.pool.resident_pages(page), 0);
        // Small entries release the pages they fill together.
        let f = mem(64, 512);
        let mut c = MetaCache::new(64, 512).unwrap();
        for i in 0..64u64 {
            c.get(&f, i * 512).unwrap();
        }
        c.clean_unused();
        c.get(&f, 0).unwrap();
        assert_eq!(c.clean_unused(), 63);
        // Entry 0 keeps its page; the other 3.5 pages' worth went back.
        assert_eq!(c.pool.resident_pages(page), 1.max(512 / page));
    }

    #[test]
    fn forget_drops_entries_of_freed_clusters() {
        let f = mem(16, 512);
        let mut c = MetaCache::new(16, 512).unwrap();
        for i in 0..16u64 {
            c.get(&f, i * 512).unwrap();
        }
        c.get_mut(&f, 5 * 512).unwrap();
        // Clusters of 2 KiB: cluster 1 holds entries 4..8.
        c.forget_clusters(&[1], 11);
        assert_eq!(c.len(), 12);
        assert!(!c.has_dirty());
        c.forget_clusters(&[0, 2, 3], 11);
        assert!(c.is_empty());
    }

    #[test]
    fn offset_hasher_spreads_aligned_keys() {
        let mut low = std::collections::HashSet::new();
        for i in 0..1024u64 {
            let mut h = OffsetHasher::default();
            h.write_u64(i << 16);
            low.insert(h.finish() & 1023);
        }
        assert!(low.len() > 500, "{} distinct buckets", low.len());
    }
}
