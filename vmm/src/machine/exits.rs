//! The vCPU run loop: dispatches port and MMIO exits to the buses and turns the guest's ways of
//! stopping (ACPI S5, reset, triple fault, a halt nothing can wake) into an [`ExitReason`].

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::bus::Bus;
use super::control::VmControl;
use super::power::{ExitReason, ExitSignal};
use super::{Error, Result};

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct ExitContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// The machine-wide stop request.
    pub exit: Arc<ExitSignal>,
    /// Pause and resume (QMP `stop`/`cont`).
    pub control: Arc<VmControl>,
}

/// Runs `vcpu` (number `id`) until the machine stops; returns why. Errors (a failed `KVM_RUN`,
/// an entry failure, an emulation failure) are returned to the caller, which raises
/// [`ExitReason::Crashed`].
pub fn run_vcpu(vcpu: &mut VcpuFd, id: usize, ctx: &ExitContext) -> Result<ExitReason> {
    ctx.control.vcpu_started(id);
    loop {
        if let Some(reason) = ctx.exit.get() {
            return Ok(reason);
        }
        // While the VM is paused, wait here, outside KVM_RUN.
        if ctx.control.park(id, &ctx.exit) {
            // Tell the guest it was stopped (a flag in its pvclock page), so that its watchdogs
            // do not take the pause for a hang. Fails when the guest does not use kvmclock,
            // and then there is nobody to tell.
            let _ = vcpu.kvmclock_ctrl();
        }
        if let Some(reason) = ctx.exit.get() {
            return Ok(reason);
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // A kick from another thread (the machine is stopping or pausing), or a signal for
            // us.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                ctx.pio.write(port.into(), data);
            }
            VcpuExit::IoIn(port, data) => {
                ctx.pio.read(port.into(), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                ctx.mmio.read(addr, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                ctx.mmio.write(addr, data);
            }
            // Only seen without an in-kernel LAPIC: then nothing can wake the vCPU.
            VcpuExit::Hlt => ctx.exit.raise(ExitReason::Halted),
            // A triple fault: what a PC does is reset.
            VcpuExit::Shutdown => ctx.exit.raise(ExitReason::Reset),
            VcpuExit::SystemEvent(kind, _) => ctx.exit.raise(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                _ => ExitReason::PowerOff,
            }),
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(Error::Vcpu(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
                )));
            }
            VcpuExit::InternalError => {
                // SAFETY: reading the `internal` member of the kvm_run exit union is what
                // KVM_EXIT_INTERNAL_ERROR defines as valid; both fields are plain integers.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let regs = vcpu
                    .get_regs()
                    .map(|r| format!(" at rip {:#x}", r.rip))
                    .unwrap_or_default();
                return Err(Error::Vcpu(format!(
                    "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}){regs}"
                )));
            }
            other => return Err(Error::Vcpu(format!("unhandled vCPU exit: {other:?}"))),
        }
    }
}
