//! vCPU state: CPUID, MSRs, FPU, and the registers for each way of entering the guest.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memory::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4};
use super::{Error, Result};

/// CPUID.1:ECX "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX "hyper-threading": set when there is more than one logical CPU per package.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX TSC-deadline timer: KVM's LAPIC emulates it, but only reports it through
/// KVM_CAP_TSC_DEADLINE_TIMER, not in the supported CPUID.
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adjusts the host-supported CPUID to what this vCPU of a `vcpus`-CPU machine should see.
///
/// `KVM_GET_SUPPORTED_CPUID` describes what KVM can virtualise, not a machine topology: the APIC
/// ids, the logical processor counts and the hypervisor bit must be filled in per vCPU, or a
/// Linux guest with several CPUs assigns them all the same APIC id.
pub fn fixup_cpuid(entries: &mut [kvm_cpuid_entry2], vcpu: u8, vcpus: u8, tsc_deadline: bool) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package,
                // EBX[15:8] CLFLUSH line size in quadwords (keep the host's).
                e.ebx = (u32::from(vcpu) << 24) | (u32::from(vcpus) << 16) | (e.ebx & 0xffff);
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Extended topology: EDX is the x2APIC id on every subleaf.
            0xb | 0x1f => e.edx = u32::from(vcpu),
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1. Present the
            // vCPUs as cores of one package, matching the HTT/logical count above.
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(vcpus.saturating_sub(1)) << 26);
            }
            _ => {}
        }
    }
}

/// Reads the supported CPUID from KVM, fixes it up for `vcpu`, and installs it.
pub fn setup_cpuid(kvm: &Kvm, vcpu_fd: &VcpuFd, vcpu: u8, vcpus: u8) -> Result<()> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    fixup_cpuid(cpuid.as_mut_slice(), vcpu, vcpus, tsc_deadline);
    vcpu_fd
        .set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The boot MSR values: syscall MSRs cleared, fast strings on, and MTRRs enabled with
/// write-back as the default type (without it Linux maps all of RAM uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Installs [`boot_msrs`]; all of them must be accepted.
pub fn setup_msrs(vcpu_fd: &VcpuFd) -> Result<()> {
    let entries = boot_msrs();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
    let n = vcpu_fd
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        return Err(Error::Config(format!(
            "KVM refused MSR {:#x}",
            entries[n].index
        )));
    }
    Ok(())
}

/// The x87/SSE state at power-on: default control word and MXCSR.
pub fn setup_fpu(vcpu_fd: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu_fd
        .set_fpu(&fpu)
        .map_err(|e| Error::Kvm("KVM_SET_FPU", e))
}

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Real mode at `cs:ip` = `0:entry` (test programs).
    Real,
    /// 32-bit protected mode, paging off, `ebx` = the PVH start info (Xen's PVH boot ABI).
    Pvh,
    /// 64-bit long mode with the first GiB identity-mapped, `rsi` = the zero page (Linux's
    /// 64-bit boot protocol).
    Long,
}

/// A flat GDT descriptor: `flags` is the high nibble of byte 6 (G, D/B, L, AVL), `access` byte 5.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT for `mode`: null, code (selector 0x8), data (0x10), TSS (0x18).
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Long => gdt_entry(0xa09b, 0, 0xfffff), // G, L, present, exec/read, accessed
        _ => gdt_entry(0xc09b, 0, 0xfffff),               // G, D (32-bit)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment register view of a GDT entry.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Identity page tables for the first GiB (2 MiB pages), as the 64-bit boot protocol requires.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("page tables: {e}")))
    };
    w(PDPT | 0x3, PML4)?;
    w(PD | 0x3, PDPT)?;
    for i in 0..512u64 {
        // Present, writable, page size (2 MiB).
        w((i << 21) | 0x83, PD + i * 8)?;
    }
    Ok(())
}

/// Sets the boot vCPU's registers: segments, control registers, `rip = entry`, and the boot
/// argument (`rbx` for PVH, `rsi` for the 64-bit protocol). Writes the GDT (and for long mode the
/// page tables) to guest memory.
pub fn setup_boot_regs(
    vcpu_fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    entry: u64,
    boot_arg: u64,
) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu_fd
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Real => {
            for s in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                s.base = 0;
                s.selector = 0;
            }
        }
        EntryMode::Pvh | EntryMode::Long => {
            let table = gdt(mode);
            for (i, e) in table.iter().enumerate() {
                mem.write_obj(*e, GuestAddress(BOOT_GDT + i as u64 * 8))
                    .map_err(|e| Error::Memory(format!("GDT: {e}")))?;
            }
            mem.write_obj(0u64, GuestAddress(BOOT_IDT))
                .map_err(|e| Error::Memory(format!("IDT: {e}")))?;
            sregs.gdt.base = BOOT_GDT;
            sregs.gdt.limit = (table.len() * 8 - 1) as u16;
            sregs.idt.base = BOOT_IDT;
            sregs.idt.limit = 7;
            let code = segment(table[1], 1);
            let data = segment(table[2], 2);
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(table[3], 3);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            if mode == EntryMode::Long {
                write_page_tables(mem)?;
                sregs.cr3 = PML4;
                sregs.cr4 |= CR4_PAE;
                sregs.cr0 |= CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
                regs.rsi = boot_arg;
                regs.rsp = BOOT_STACK;
                regs.rbp = BOOT_STACK;
            } else {
                regs.rbx = boot_arg;
            }
        }
    }
    vcpu_fd
        .set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    vcpu_fd
        .set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0x0000_0800,
            ecx: 0,
            edx: EDX_HTT,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_fixups_give_each_vcpu_its_apic_id() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(4, 0),
            entry(7, 0),
        ];
        let before7 = e[4];
        fixup_cpuid(&mut e, 2, 4, true);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].edx, 2);
        assert_eq!(e[3].eax >> 26, 3);
        assert_eq!(e[4], before7, "other leaves untouched");

        let mut one = vec![entry(1, 0)];
        fixup_cpuid(&mut one, 0, 1, false);
        assert_eq!(one[0].edx & EDX_HTT, 0);
        assert_eq!(one[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(one[0].ebx >> 16, 1);
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let long = gdt(EntryMode::Long);
        let cs = segment(long[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.present, cs.s, cs.g),
            (1, 0, 0xb, 1, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        let pvh = gdt(EntryMode::Pvh);
        let cs = segment(pvh[1], 1);
        assert_eq!((cs.l, cs.db), (0, 1));
        let ds = segment(pvh[2], 2);
        assert_eq!((ds.type_, ds.selector, ds.limit), (3, 0x10, 0xffff_ffff));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn msrs_enable_mtrrs_write_back() {
        let m = boot_msrs();
        let def = m.iter().find(|e| e.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.data, 0x806);
    }
}
