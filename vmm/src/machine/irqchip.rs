//! The in-kernel interrupt controllers: PIC + IOAPIC + per-vCPU LAPIC, and the PIT.
//!
//! Keeping them in KVM means timer interrupts and EOIs never leave the kernel, and devices raise
//! lines through irqfds (`serial.rs`). KVM's default GSI routing sends GSIs 0-15 to both the PIC
//! and the IOAPIC pin of the same number, which is what the MADT (no source overrides) tells the
//! guest.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use super::memory::{KVM_IDENTITY_MAP, KVM_TSS};
use super::{Error, Result};

/// Creates the irqchip and the PIT. Must run before any vCPU is created.
pub fn setup_irqchip(vm: &VmFd) -> Result<()> {
    // Intel VMX needs three pages for a real-mode TSS and one for an identity page table
    // somewhere in guest-physical space; put them at the top of the 32-bit hole, where no RAM is.
    vm.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.set_tss_address(KVM_TSS as usize)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    // The speaker port (0x61) is emulated in the kernel as well: Linux's TSC calibration polls
    // the PIT channel 2 output there, and one exit per poll would make it crawl.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))
}
