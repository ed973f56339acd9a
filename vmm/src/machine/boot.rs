//! Loading the guest kernel, initramfs and command line, and building the boot parameters
//! (the Linux zero page with its e820 map, or the PVH start info with its memory map).
//!
//! Two entry paths, chosen by the kernel file:
//! - an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note (Debian's kernel has `CONFIG_PVH=y`)
//!   is entered through PVH: 32-bit protected mode, `ebx` = `hvm_start_info`. It is the fastest
//!   path (no decompression); an ELF without the note is entered at its 64-bit entry with a zero
//!   page, like a bzImage;
//! - a bzImage is entered at its 64-bit entry (`code32_start + 0x200`, boot protocol >= 2.06 with
//!   `XLF_KERNEL_64`) with `rsi` = the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::EntryMode;
use super::memory::{
    self, MapEntry, CMDLINE, CMDLINE_MAX, HIGH_MEMORY, PVH_MEMMAP, PVH_MODLIST, PVH_START_INFO,
    ZERO_PAGE,
};
use super::{Error, Result};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PAGE: u64 = 4096;

/// Where and how to enter a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point (guest-physical).
    pub entry: u64,
    /// The CPU mode at entry.
    pub mode: EntryMode,
    /// End of the loaded image: the initramfs must not overlap it.
    pub end: u64,
    /// The bzImage's setup header (for the zero page), if any.
    pub header: Option<setup_header>,
}

/// What a kernel file looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF (`vmlinux`).
    Elf,
    /// Linux bzImage ("HdrS" at 0x202).
    BzImage,
}

/// Identifies a kernel image by its magic numbers.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat> {
    let mut head = Vec::with_capacity(0x206);
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.by_ref().take(0x206).read_to_end(&mut head))
        .map_err(|e| Error::Io(path.display().to_string(), e))?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(Error::Boot(format!(
            "{}: not an ELF vmlinux or a bzImage",
            path.display()
        )))
    }
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|e| Error::Io(path.display().to_string(), e))?;
    let bad = |e: linux_loader::loader::Error| Error::Boot(format!("{}: {e}", path.display()));
    match detect_format(&mut file, path)? {
        KernelFormat::Elf => {
            let r =
                Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY))).map_err(bad)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                    entry: entry.0,
                    mode: EntryMode::Pvh,
                    end: r.kernel_end,
                    header: None,
                }),
                _ => Ok(LoadedKernel {
                    entry: r.kernel_load.0,
                    mode: EntryMode::Long,
                    end: r.kernel_end,
                    header: None,
                }),
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(bad)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| Error::Boot(format!("{}: no setup header", path.display())))?;
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x0206 || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::Boot(format!(
                    "{}: bzImage boot protocol {}.{:02} without a 64-bit entry point is not supported",
                    path.display(),
                    version >> 8,
                    version & 0xff
                )));
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + 0x200,
                mode: EntryMode::Long,
                end: r.kernel_end,
                header: Some(hdr),
            })
        }
    }
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low RAM, below
/// `max_end` (the kernel's `initrd_addr_max + 1`), above the kernel.
pub fn initrd_address(low_ram_end: u64, max_end: u64, size: u64, kernel_end: u64) -> Result<u64> {
    let top = low_ram_end.min(max_end);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    match addr {
        Some(a) if a >= kernel_end.max(HIGH_MEMORY) => Ok(a),
        _ => Err(Error::Boot(format!(
            "initrd of {size} bytes does not fit in guest RAM below {top:#x} after the kernel"
        ))),
    }
}

/// Loads the initramfs at `path` for `kernel`; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    ram: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64)> {
    let mut file = File::open(path).map_err(|e| Error::Io(path.display().to_string(), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::Io(path.display().to_string(), e))?
        .len();
    // The boot protocol's limit; PVH has none of its own but the module list takes 64-bit
    // addresses; below the hole either way.
    let max_end = kernel
        .header
        .map_or(u64::MAX, |h| u64::from(h.initrd_addr_max) + 1);
    let addr = initrd_address(memory::low_ram_end(ram), max_end, size, kernel.end)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Boot(format!("{}: loading the initrd: {e}", path.display())))?;
    Ok((addr, size))
}

/// Builds the command line and writes it at [`CMDLINE`]; returns its length without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, append: &str) -> Result<usize> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Boot(format!("command line: {e}")))?;
    if !append.is_empty() {
        cmdline
            .insert_str(append)
            .map_err(|e| Error::Boot(format!("command line: {e}")))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)
        .map_err(|e| Error::Boot(format!("command line: {e}")))?;
    Ok(append.len())
}

/// The zero page for the 64-bit boot protocol.
pub fn build_boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    map: &[MapEntry],
    rsdp: u64,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        // `cmdline_size` is the kernel's limit (protocol 2.06+), not ours to change.
        let max = h.cmdline_size;
        if cmdline_len as u64 >= u64::from(max) {
            return Err(Error::Boot(format!(
                "kernel command line of {cmdline_len} bytes is too long: the kernel accepts at most {}",
                max.saturating_sub(1)
            )));
        }
        params.hdr = h;
    } else {
        // An ELF kernel entered at startup_64 only reads these from the header.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        params.hdr.cmdline_size = cmdline_len as u32 + 1;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    if map.len() > params.e820_table.len() {
        return Err(Error::Boot(format!(
            "{} memory map entries do not fit in the zero page",
            map.len()
        )));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| Error::Boot(format!("zero page: {e}")))
}

/// The PVH start info, its memory map and module list.
pub fn build_pvh(
    initrd: Option<(u64, u64)>,
    map: &[MapEntry],
    rsdp: u64,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<_> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .iter()
        .map(|&(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST },
        cmdline_paddr: CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    (info, memmap, modules)
}

/// Writes the PVH structures at [`PVH_START_INFO`], [`PVH_MEMMAP`] and [`PVH_MODLIST`].
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    info: &hvm_start_info,
    memmap: &[hvm_memmap_table_entry],
    modules: &[hvm_modlist_entry],
) -> Result<()> {
    let mut bp = BootParams::new::<hvm_start_info>(info, GuestAddress(PVH_START_INFO));
    bp.set_sections::<hvm_memmap_table_entry>(memmap, GuestAddress(PVH_MEMMAP));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(modules, GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| Error::Boot(format!("PVH start info: {e}")))
}

/// Everything needed to boot: loads kernel, initrd, command line and writes the boot parameters
/// for the kernel's entry path. Returns the entry and the boot argument register value.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    append: &str,
    rsdp: u64,
) -> Result<(LoadedKernel, u64)> {
    let k = load_kernel(mem, kernel)?;
    let rd = initrd.map(|p| load_initrd(mem, ram, &k, p)).transpose()?;
    let len = write_cmdline(mem, append)?;
    let map = memory::memory_map(ram);
    match k.mode {
        EntryMode::Pvh => {
            let (info, memmap, mods) = build_pvh(rd, &map, rsdp);
            write_pvh(mem, &info, &memmap, &mods)?;
            Ok((k, PVH_START_INFO))
        }
        _ => {
            let params = build_boot_params(k.header, len, rd, &map, rsdp)?;
            write_boot_params(mem, &params)?;
            Ok((k, ZERO_PAGE))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::MemoryKind;

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let ram = 512 << 20;
        assert_eq!(
            initrd_address(ram, u64::MAX, 4096, 0x200_0000).unwrap(),
            ram - 4096
        );
        assert_eq!(
            initrd_address(ram, u64::MAX, 5000, 0x200_0000).unwrap(),
            ram - 8192
        );
        // The boot protocol's initrd_addr_max wins when lower.
        assert_eq!(
            initrd_address(ram, 0x1000_0000, 4096, 0).unwrap(),
            0x1000_0000 - 4096
        );
        // Never over the kernel, never below 1 MiB.
        assert!(initrd_address(ram, u64::MAX, ram - 0x100_0000, 0x200_0000).is_err());
        assert!(initrd_address(ram, u64::MAX, ram, 0).is_err());
        assert!(initrd_address(ram, u64::MAX, ram * 2, 0).is_err());
    }

    #[test]
    fn zero_page_carries_the_e820_map_cmdline_and_initrd() {
        let map = memory::memory_map(1 << 30);
        let p = build_boot_params(None, 10, Some((0x3000_0000, 1234)), &map, 0xe0000).unwrap();
        let (
            e820_entries,
            cmd_line_ptr,
            cmdline_size,
            ramdisk_image,
            ramdisk_size,
            rsdp,
            magic,
            loader,
        ) = (
            p.e820_entries,
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.acpi_rsdp_addr,
            p.hdr.header,
            p.hdr.type_of_loader,
        );
        assert_eq!(e820_entries as usize, map.len());
        assert_eq!((cmd_line_ptr, cmdline_size), (CMDLINE as u32, 11));
        assert_eq!((ramdisk_image, ramdisk_size), (0x3000_0000, 1234));
        assert_eq!((rsdp, magic, loader), (0xe0000, KERNEL_HDR_MAGIC, 0xff));
        for (i, e) in map.iter().enumerate() {
            let t = p.e820_table[i];
            let (addr, size, ty) = (t.addr, t.size, t.r#type);
            assert_eq!((addr, size, ty), (e.addr, e.size, e.kind as u32));
        }
        let ram: u64 = (0..e820_entries as usize)
            .map(|i| p.e820_table[i])
            .filter(|e| e.r#type == MemoryKind::Ram as u32)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (1 << 30) - (HIGH_MEMORY - memory::EBDA_START));
    }

    #[test]
    fn bzimage_header_is_kept() {
        let h = setup_header {
            cmdline_size: 2048,
            version: 0x020f,
            xloadflags: 1,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let map = memory::memory_map(64 << 20);
        let p = build_boot_params(Some(h), 2047, None, &map, 0).unwrap();
        let (v, a, rd, max) = (
            p.hdr.version,
            p.hdr.kernel_alignment,
            p.hdr.ramdisk_image,
            p.hdr.cmdline_size,
        );
        assert_eq!((v, a, rd, max), (0x020f, 0x20_0000, 0, 2048));
        // The kernel's limit on the command line is enforced, NUL included.
        let e = build_boot_params(Some(h), 2048, None, &map, 0).unwrap_err();
        assert!(e.to_string().contains("at most 2047"), "{e}");
    }

    #[test]
    fn pvh_start_info_points_at_its_tables() {
        let map = memory::memory_map(256 << 20);
        let (info, memmap, mods) = build_pvh(Some((0x800_0000, 77)), &map, 0xe0000);
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST));
        assert_eq!(
            (info.memmap_entries as usize, info.memmap_paddr),
            (map.len(), PVH_MEMMAP)
        );
        assert_eq!((mods[0].paddr, mods[0].size), (0x800_0000, 77));
        assert_eq!(memmap[2].addr, HIGH_MEMORY);
        let (none, _, m) = build_pvh(None, &map, 0);
        assert_eq!((none.nr_modules, none.modlist_paddr, m.len()), (0, 0, 0));
        // Written where the start info says, and readable back.
        let (mem, _ram) = memory::create_guest_memory(256 << 20).unwrap();
        write_pvh(&mem, &info, &memmap, &mods).unwrap();
        let back: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP + 24 * 2)).unwrap();
        assert_eq!(back, memmap[2]);
        let back: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(back, info);
        // The memmap must end before the module list's page neighbour, the zero page.
        assert!(PVH_MEMMAP + 24 * memmap.len() as u64 <= ZERO_PAGE);
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let (mem, _ram) = memory::create_guest_memory(16 << 20).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(e.contains("not an ELF vmlinux or a bzImage"), "{e}");
        std::fs::write(&p, b"short").unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(e.contains("not an ELF vmlinux or a bzImage"), "{e}");
    }

    #[test]
    fn command_line_is_written_nul_terminated() {
        let (mem, _ram) = memory::create_guest_memory(16 << 20).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0 panic=-1").unwrap(), 22);
        let mut b = [0u8; 23];
        mem.read_slice(&mut b, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&b, b"console=ttyS0 panic=-1\0");
    }
}
