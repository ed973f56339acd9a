//! The guest-physical memory layout of an x86-64 machine, and the guest RAM itself.
//!
//! Below 1 MiB the layout follows what a PC firmware would leave behind, because Linux's real-mode
//! trampoline (used to start secondary CPUs) and its legacy scans expect it; everything the VMM
//! writes for the boot (GDT, page tables, boot parameters, command line, ACPI tables) lives there.
//! RAM above 1 MiB is split around a 32-bit hole reserved for device MMIO (PCI comes later).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{Error, Result};

/// The boot GDT (4 entries: null, code, data, TSS).
pub const BOOT_GDT: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP: u64 = 0x6080;
/// The Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Top of the initial stack used by the 64-bit boot path.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
/// See [`PML4`].
pub const PDPT: u64 = 0xa000;
/// See [`PML4`]; one page directory of 2 MiB pages maps the first GiB.
pub const PD: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Room for the command line (Linux's x86 limit is 2048; we allow more, like newer kernels).
pub const CMDLINE_MAX: usize = 0x10000;
/// End of conventional memory below the (absent) EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux would also find the RSDP by scanning.
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area: RAM resumes here.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (to be used by PCI and virtio-mmio).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB: RAM that does not fit below the hole continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The in-kernel IOAPIC and the TSS/identity-map pages KVM needs sit at the top of the hole.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// See [`KVM_TSS`].
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// The local APIC's MMIO page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The IOAPIC's MMIO page.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;

/// The smallest guest we accept: Linux needs more, but tiny test programs do not.
pub const MIN_RAM: u64 = 2 << 20;

/// The RAM ranges `(start, length)` of a guest with `ram` bytes of memory.
pub fn ram_ranges(ram: u64) -> Vec<(GuestAddress, u64)> {
    let low = ram.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if ram > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), ram - low));
    }
    ranges
}

/// The alignment of guest RAM in the VMM's address space: a huge page.
///
/// KVM maps a guest page with a 2 MiB nested-page-table entry only where the guest-physical and
/// the host-virtual addresses agree modulo 2 MiB and the host backs the range with a huge page;
/// `mmap` alone gives an address aligned to 4 KiB, which leaves every guest access on 4 KiB
/// nested mappings (measured in the nested lab: the guest booted 1.5 times slower). QEMU aligns
/// its RAM blocks for the same reason.
pub const RAM_ALIGN: usize = 2 << 20;

/// The host mappings behind guest RAM, unmapped when the last holder lets go: the machine,
/// and every device transport (whose requests may still be running on worker threads after
/// the machine stopped).
#[derive(Debug)]
pub struct HostRam {
    /// `(address, length)` of each mapping.
    mappings: Vec<(usize, usize)>,
}

impl Drop for HostRam {
    fn drop(&mut self) {
        for &(addr, len) in &self.mappings {
            // SAFETY: each range was mapped by `map_aligned` and is unmapped only here, once;
            // every `GuestMemoryMmap` built over it is held only by holders of this `HostRam`.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Maps `len` bytes of private anonymous memory at a [`RAM_ALIGN`]-aligned address, asking for
/// transparent huge pages.
fn map_aligned(len: usize) -> std::io::Result<usize> {
    let reserve = len
        .checked_add(RAM_ALIGN)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; it touches no
    // existing memory.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_NONE, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(RAM_ALIGN);
    // Give back the slack before and after the aligned range.
    // SAFETY: both ranges lie inside the reservation just made, which nothing else uses.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let end = aligned + len;
        if start + reserve > end {
            libc::munmap(end as *mut libc::c_void, start + reserve - end);
        }
    }
    let addr = aligned as *mut libc::c_void;
    // SAFETY: [aligned, aligned + len) is the rest of our reservation.
    if unsafe { libc::mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: as above; the range is ours and unused.
        unsafe { libc::munmap(addr, len) };
        return Err(e);
    }
    // Hosts whose THP setting is `madvise` back the range with huge pages only when asked. A
    // failure (THP compiled out) only costs speed.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
    Ok(aligned)
}

/// Allocates guest RAM (anonymous, private, 2 MiB-aligned mappings) for `ram` bytes. The
/// returned [`HostRam`] owns the mappings: keep it for as long as the memory is used.
pub fn create_guest_memory(ram: u64) -> Result<(GuestMemoryMmap, std::sync::Arc<HostRam>)> {
    if ram < MIN_RAM {
        return Err(Error::Config(format!(
            "guest RAM must be at least {} MiB",
            MIN_RAM >> 20
        )));
    }
    if ram % 4096 != 0 {
        // KVM memory slots are made of whole pages.
        return Err(Error::Config(format!(
            "guest RAM size {ram} is not a multiple of 4 KiB"
        )));
    }
    let fail = |e: String| Error::Memory(format!("cannot allocate {ram} bytes of guest RAM: {e}"));
    let mut host = HostRam {
        mappings: Vec::new(),
    };
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(ram) {
        let len = usize::try_from(len).map_err(|e| fail(e.to_string()))?;
        let addr = map_aligned(len).map_err(|e| fail(e.to_string()))?;
        host.mappings.push((addr, len));
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: `addr` is a fresh mapping of `len` bytes, readable and writable, that
        // `host` unmaps only once every holder of the returned memory is gone.
        let region = unsafe { vm_memory::MmapRegion::build_raw(addr as *mut u8, len, prot, flags) }
            .map_err(|e| fail(e.to_string()))?;
        regions.push(
            vm_memory::GuestRegionMmap::new(region, start)
                .ok_or_else(|| fail(format!("bad region at {:#x}", start.0)))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))?;
    Ok((mem, std::sync::Arc::new(host)))
}

/// Registers every region of `mem` with KVM as a memory slot. Crate-private: the caller must
/// keep `mem` mapped for as long as `vm` exists, which `Machine` guarantees by owning both.
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points to a mapping of `memory_size` bytes owned by `mem`; the caller
        // keeps `mem` alive for as long as the VM exists (the `Machine` owns both), so the guest
        // never sees a dangling mapping.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// The kind of an entry in the guest's memory map (e820 types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (e820 type 1).
    Ram = 1,
    /// Reserved (e820 type 2).
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// The memory map handed to the guest (through e820 in the zero page, or the PVH memmap).
///
/// The BIOS area holding the ACPI tables is reserved so the kernel does not reuse it; the MMIO
/// hole is absent from the map (it is neither RAM nor anything the kernel should touch).
pub fn memory_map(ram: u64) -> Vec<MapEntry> {
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemoryKind::Ram,
        },
        MapEntry {
            addr: ACPI_START,
            size: HIGH_MEMORY - ACPI_START,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(ram) {
        let (start, end) = (start.0.max(HIGH_MEMORY), start.0 + len);
        if end > start {
            map.push(MapEntry {
                addr: start,
                size: end - start,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

/// The end of RAM below the 32-bit hole (where an initramfs goes, at the top).
pub fn low_ram_end(ram: u64) -> u64 {
    ram.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_no_high_ram() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            MapEntry {
                addr: HIGH_MEMORY,
                size: (512 << 20) - HIGH_MEMORY,
                kind: MemoryKind::Ram
            }
        );
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let ram = 4u64 << 30;
        let ranges = ram_ranges(ram);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(MMIO_HOLE_END), ram - MMIO_HOLE_START)
            ]
        );
        let map = memory_map(ram);
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the BIOS hole between the EBDA and 1 MiB is usable.
        assert_eq!(total, ram - (HIGH_MEMORY - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
        // Sorted and non-overlapping.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT, 32),
            (BOOT_IDT, 8),
            (PVH_START_INFO, 0x40),
            (PVH_MODLIST, 0x40),
            (PVH_MEMMAP, 24 * 8),
            (ZERO_PAGE, 0x1000),
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD, 0x1000),
            (CMDLINE, CMDLINE_MAX as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x} overlaps {:#x}",
                w[0].0,
                w[1].0
            );
        }
        assert!(CMDLINE + CMDLINE_MAX as u64 <= EBDA_START);
    }

    #[test]
    fn too_little_ram_is_refused() {
        assert!(create_guest_memory(4096).is_err());
        assert!(create_guest_memory(MIN_RAM + 512).is_err());
        assert!(create_guest_memory(MIN_RAM).is_ok());
    }

    #[test]
    fn guest_ram_is_aligned_for_huge_pages_and_usable() {
        use vm_memory::Bytes;
        let (mem, host) = create_guest_memory(64 << 20).unwrap();
        for region in mem.iter() {
            let addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap() as usize;
            assert_eq!(
                addr % RAM_ALIGN,
                0,
                "region at {:#x}",
                region.start_addr().0
            );
        }
        mem.write_obj(0x1234_5678u32, GuestAddress(63 << 20))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(63 << 20)).unwrap(),
            0x1234_5678
        );
        assert_eq!(host.mappings.len(), 1);
    }
}
