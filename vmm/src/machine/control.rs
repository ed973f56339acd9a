//! The VM's run state as QMP sees it, shared by the QMP commands, the signal handler and the
//! machines that come and go.
//!
//! A [`VmControl`] is created once by the VMM and given to every [`Machine`](super::Machine)
//! through [`Config::control`](super::Config::control): a reboot builds a new machine (new VM fd,
//! fresh RAM, the kernel loaded again), so whatever must survive it (the run state, a pending
//! pause, requests made while no machine exists) lives here rather than in the machine.
//!
//! Pausing: the vCPU threads call [`VmControl::park`] before every `KVM_RUN`; [`VmControl::pause`]
//! raises the flag they look at, then kicks the threads that are not parked yet out of `KVM_RUN`
//! with the machine's real-time signal, again every few milliseconds (a kick that lands just
//! before a thread enters `KVM_RUN` is lost; the next one is not), and returns once all of them
//! are parked. Parked threads wait on a condition variable that both [`VmControl::resume`] and
//! the machine's stop path signal, so stopping a paused machine does not hang.
//!
//! Guest time stands still while paused, as under QEMU: `pause` saves the VM's kvmclock once
//! every vCPU is parked and `resume` sets it back (`KVM_GET_CLOCK`/`KVM_SET_CLOCK`), so the
//! guest does not see the paused interval; each vCPU then tells the guest it was stopped
//! (`KVM_KVMCLOCK_CTRL`), which keeps Linux's soft-lockup watchdog quiet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

use super::power::{ExitReason, ExitSignal, Pm1Event};
use crate::qmp::Events;

/// The run states this VMM can be in, with QMP's names (`RunState` in QEMU's schema).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs have not started yet: `-S`, or a reset while paused.
    Prelaunch,
    /// The vCPUs run.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest shut down (or the VMM is quitting).
    Shutdown,
    /// A vCPU failed; the machine cannot go on.
    InternalError,
}

impl RunState {
    /// QMP's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
        }
    }
}

/// Why a machine shut down or reset, with QMP's names (`ShutdownCause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownCause {
    /// An error ended the guest.
    HostError,
    /// QMP `quit`.
    HostQmpQuit,
    /// QMP `system_reset`.
    HostQmpSystemReset,
    /// A signal such as SIGTERM.
    HostSignal,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself.
    GuestReset,
}

impl ShutdownCause {
    /// QMP's name of the cause.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
        }
    }

    /// Whether the guest asked for it (the events' `guest` member).
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset
        )
    }

    /// The cause of `reason` when no host request explains it.
    fn of_guest(reason: ExitReason) -> Self {
        match reason {
            ExitReason::PowerOff | ExitReason::Halted => ShutdownCause::GuestShutdown,
            ExitReason::Reset => ShutdownCause::GuestReset,
            // A signal raises Terminated on the machine's exit signal directly.
            ExitReason::Terminated => ShutdownCause::HostSignal,
            ExitReason::Crashed => ShutdownCause::HostError,
        }
    }
}

/// A control request refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// `cont` after the guest shut down or failed: only a reset could make it runnable again
    /// (QEMU's words for the same refusal).
    #[error("Resetting the Virtual Machine is required")]
    ResetRequired,
    /// A machine is already running on this control.
    #[error("another machine is already attached to this VM control")]
    Busy,
}

/// How the VM starts and what a reset means.
#[derive(Default, Clone)]
pub struct ControlOptions {
    /// Start in `prelaunch` with the vCPUs held until `cont` (QEMU's `-S`).
    pub start_paused: bool,
    /// A reset ends the VMM (QEMU's `-no-reboot`): the events say SHUTDOWN rather than RESET.
    pub no_reboot: bool,
    /// Where STOP, RESUME, RESET, POWERDOWN and SHUTDOWN go.
    pub events: Option<Events>,
}

/// The guest's clock as the VMM can read and set it: the VM's kvmclock in nanoseconds.
pub trait GuestClock: Send + Sync {
    /// The current guest time, if the hypervisor gives it.
    fn now(&self) -> Option<u64>;
    /// Makes the guest time `ns` from now on.
    fn set(&self, ns: u64);
}

impl GuestClock for kvm_ioctls::VmFd {
    fn now(&self) -> Option<u64> {
        self.get_clock().ok().map(|c| c.clock)
    }
    fn set(&self, ns: u64) {
        let data = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        // Only fails on a VM without kvmclock support; the guest then sees the paused time,
        // which is what happens without this anyway.
        let _ = self.set_clock(&data);
    }
}

/// One vCPU of the attached machine.
#[derive(Default)]
struct VcpuSlot {
    /// The thread to kick; `None` before it started and once the machine is stopping (its
    /// handle must not be used after the machine joins it).
    thread: Option<libc::pthread_t>,
    parked: bool,
}

/// The machine currently running on this control.
struct Current {
    exit: Arc<ExitSignal>,
    pm1: Arc<Mutex<Pm1Event>>,
    clock: Option<Arc<dyn GuestClock>>,
    vcpus: Vec<VcpuSlot>,
}

struct Inner {
    state: RunState,
    /// vCPUs must park (stop, or `-S`); survives machines.
    pause: bool,
    machine: Option<Current>,
    /// The host request raised on the current machine, to tell a QMP `system_reset` from the
    /// guest's own reset when the machine ends.
    raised: Option<(ExitReason, ShutdownCause)>,
    /// A host request made while no machine could take it (before the first, during a
    /// reboot); the next machine gets it as soon as it is attached.
    pending: Option<(ExitReason, ShutdownCause)>,
    /// A power button press made while no machine was attached.
    powerdown_pending: bool,
    /// The guest time when the current machine was paused, restored on resume.
    frozen_clock: Option<u64>,
}

/// The VM's run state and the requests QMP and signals make of it. Share it as an `Arc`.
pub struct VmControl {
    inner: Mutex<Inner>,
    cond: Condvar,
    /// A lock-free copy of `Inner::pause` for the vCPUs' fast path before every `KVM_RUN`.
    pause_hint: AtomicBool,
    no_reboot: bool,
    events: Option<Events>,
}

/// How often [`VmControl::pause`] kicks vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

impl VmControl {
    /// A control in `prelaunch`; the first machine attached starts running unless
    /// `options.start_paused`.
    pub fn new(options: ControlOptions) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                state: RunState::Prelaunch,
                pause: options.start_paused,
                machine: None,
                raised: None,
                pending: None,
                powerdown_pending: false,
                frozen_clock: None,
            }),
            cond: Condvar::new(),
            pause_hint: AtomicBool::new(options.start_paused),
            no_reboot: options.no_reboot,
            events: options.events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: &str, data: Value) {
        if let Some(events) = &self.events {
            events.emit(event, data);
        }
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// Whether a reset ends the VMM (`-no-reboot`) rather than rebooting.
    pub fn no_reboot(&self) -> bool {
        self.no_reboot
    }

    /// Whether the caller should build a new machine after [`Machine::run`](super::Machine::run)
    /// returned `reason`: a reset, unless `-no-reboot`.
    pub fn reboots_after(&self, reason: ExitReason) -> bool {
        reason == ExitReason::Reset && !self.no_reboot
    }

    /// QMP `stop`: returns once every vCPU of the running machine is out of `KVM_RUN` and parked,
    /// then emits STOP. Before the machine starts (`prelaunch`) it only keeps the vCPUs from
    /// starting; in other states it does nothing, as QEMU does.
    pub fn pause(&self) {
        let mut g = self.lock();
        match g.state {
            RunState::Running => {}
            RunState::Prelaunch => {
                g.pause = true;
                self.pause_hint.store(true, Ordering::SeqCst);
                return;
            }
            _ => return,
        }
        g.pause = true;
        self.pause_hint.store(true, Ordering::SeqCst);
        while let Some(m) = &g.machine {
            // A machine that is stopping will not run guest code again.
            if m.exit.get().is_some() {
                break;
            }
            let mut all_parked = true;
            for slot in m.vcpus.iter().filter(|s| !s.parked) {
                all_parked = false;
                if let Some(t) = slot.thread {
                    kick(t);
                }
            }
            if all_parked {
                break;
            }
            g = self
                .cond
                .wait_timeout(g, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // Another `stop` (from another client) may have finished while the lock was released
        // for waiting, or the machine ended: then there is nothing left to do or announce.
        if g.state != RunState::Running {
            return;
        }
        if let Some(m) = g.machine.as_ref().filter(|m| m.exit.get().is_none()) {
            // Every vCPU is out of guest mode: the guest's time stops here.
            let now = m.clock.as_ref().and_then(|c| c.now());
            g.frozen_clock = now;
        }
        g.state = RunState::Paused;
        drop(g);
        self.emit("STOP", Value::Null);
    }

    /// QMP `cont`: lets the vCPUs run and emits RESUME. Refused after a shutdown or a vCPU
    /// failure; nothing happens when already running.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        match g.state {
            RunState::Shutdown | RunState::InternalError => {
                return Err(ControlError::ResetRequired)
            }
            RunState::Running => return Ok(()),
            RunState::Prelaunch | RunState::Paused => {}
        }
        if let Some(ns) = g.frozen_clock.take() {
            if let Some(clock) = g.machine.as_ref().and_then(|m| m.clock.as_ref()) {
                clock.set(ns);
            }
        }
        g.pause = false;
        self.pause_hint.store(false, Ordering::SeqCst);
        g.state = RunState::Running;
        self.cond.notify_all();
        drop(g);
        self.emit("RESUME", Value::Null);
        Ok(())
    }

    /// QMP `system_reset`: ends the current machine with [`ExitReason::Reset`] (the caller
    /// builds a new one, see [`VmControl::reboots_after`]).
    pub fn request_reset(&self) {
        self.raise(ExitReason::Reset, ShutdownCause::HostQmpSystemReset);
    }

    /// Ends the current machine with [`ExitReason::Terminated`] for `cause` (QMP `quit`:
    /// [`ShutdownCause::HostQmpQuit`]; a signal: [`ShutdownCause::HostSignal`]); the caller then
    /// ends the VMM. Works while paused.
    pub fn request_shutdown(&self, cause: ShutdownCause) {
        self.raise(ExitReason::Terminated, cause);
    }

    /// QMP `system_powerdown`: emits POWERDOWN and presses the ACPI power button; the guest
    /// decides what to do about it (Linux's `button` driver reports KEY_POWER).
    pub fn request_powerdown(&self) {
        let mut g = self.lock();
        match &g.machine {
            Some(m) => m
                .pm1
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button(),
            None => g.powerdown_pending = true,
        }
        drop(g);
        self.emit("POWERDOWN", Value::Null);
    }

    fn raise(&self, reason: ExitReason, cause: ShutdownCause) {
        let mut g = self.lock();
        let live = g.machine.as_ref().filter(|m| m.exit.get().is_none());
        match live {
            Some(m) => {
                m.exit.raise(reason);
                g.raised = Some((reason, cause));
            }
            None => {
                // During a reboot the old machine is already ending: the request is for the next
                // one. A pending quit is not downgraded to a reset.
                if !matches!(g.pending, Some((ExitReason::Terminated, _))) {
                    g.pending = Some((reason, cause));
                }
            }
        }
    }

    /// The current machine's guest time (kvmclock, in nanoseconds), if a machine is running.
    pub fn guest_clock(&self) -> Option<u64> {
        let g = self.lock();
        g.machine.as_ref()?.clock.as_ref()?.now()
    }

    /// Makes a machine with `vcpus` vCPUs the current one (from `Machine::run`, before its vCPU
    /// threads start). Requests made while no machine existed are applied now.
    pub(crate) fn attach(
        &self,
        exit: Arc<ExitSignal>,
        pm1: Arc<Mutex<Pm1Event>>,
        clock: Option<Arc<dyn GuestClock>>,
        vcpus: usize,
    ) -> Result<(), ControlError> {
        let mut g = self.lock();
        if g.machine.is_some() {
            return Err(ControlError::Busy);
        }
        if std::mem::take(&mut g.powerdown_pending) {
            pm1.lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button();
        }
        if let Some((reason, cause)) = g.pending.take() {
            exit.raise(reason);
            g.raised = Some((reason, cause));
        }
        g.frozen_clock = None;
        g.machine = Some(Current {
            exit,
            pm1,
            clock,
            vcpus: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
        });
        let resumed = if g.pause {
            if g.state != RunState::Paused {
                g.state = RunState::Prelaunch;
            }
            false
        } else {
            std::mem::replace(&mut g.state, RunState::Running) != RunState::Running
        };
        drop(g);
        if resumed {
            // As QEMU does when it starts the vCPUs.
            self.emit("RESUME", Value::Null);
        }
        Ok(())
    }

    /// Called by vCPU thread `id` when it starts, so that [`VmControl::pause`] can kick it.
    pub(crate) fn vcpu_started(&self, id: usize) {
        let mut g = self.lock();
        let Some(m) = g.machine.as_mut() else { return };
        // A machine already stopping is never kicked (and `stopping` may have run already).
        if m.exit.get().is_some() {
            return;
        }
        if let Some(slot) = m.vcpus.get_mut(id) {
            // SAFETY: pthread_self has no preconditions.
            slot.thread = Some(unsafe { libc::pthread_self() });
        }
    }

    /// Called by vCPU thread `id` before every `KVM_RUN`: blocks while the VM is paused, until
    /// resumed or until the machine stops (`exit` raised). Returns whether it waited.
    pub(crate) fn park(&self, id: usize, exit: &ExitSignal) -> bool {
        if !self.pause_hint.load(Ordering::SeqCst) {
            return false;
        }
        let mut g = self.lock();
        let mut waited = false;
        while g.pause && exit.get().is_none() {
            let Some(slot) = g.machine.as_mut().and_then(|m| m.vcpus.get_mut(id)) else {
                return waited;
            };
            waited = true;
            if !slot.parked {
                slot.parked = true;
                // `pause` waits for the last vCPU to get here.
                self.cond.notify_all();
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(slot) = g.machine.as_mut().and_then(|m| m.vcpus.get_mut(id)) {
            slot.parked = false;
        }
        waited
    }

    /// Called by `Machine::run` once its exit signal is raised, before it joins the vCPU
    /// threads: wakes parked vCPUs (they see the signal and return) and forgets the threads, so
    /// that nothing kicks them once joined.
    pub(crate) fn stopping(&self) {
        let mut g = self.lock();
        if let Some(m) = g.machine.as_mut() {
            for slot in &mut m.vcpus {
                slot.thread = None;
            }
        }
        self.cond.notify_all();
    }

    /// Called by `Machine::run` when its vCPUs are gone: the run state follows `reason` and
    /// the matching event (RESET, SHUTDOWN, or STOP for a failure) is emitted.
    pub(crate) fn detach(&self, reason: ExitReason) {
        let mut g = self.lock();
        g.machine = None;
        g.frozen_clock = None;
        let cause = match g.raised.take() {
            Some((r, cause)) if r == reason => cause,
            _ => ShutdownCause::of_guest(reason),
        };
        let data = json!({"guest": cause.by_guest(), "reason": cause.as_str()});
        let event = match reason {
            ExitReason::Reset if !self.no_reboot => {
                // The next machine continues the run state; a reset while paused leaves the VM
                // in prelaunch, as in QEMU, until `cont`.
                if g.state == RunState::Paused {
                    g.state = RunState::Prelaunch;
                }
                ("RESET", data)
            }
            ExitReason::Crashed => {
                let was_running = g.state == RunState::Running;
                g.state = RunState::InternalError;
                if !was_running {
                    return;
                }
                ("STOP", Value::Null)
            }
            _ => {
                g.state = RunState::Shutdown;
                ("SHUTDOWN", data)
            }
        };
        drop(g);
        self.emit(event.0, event.1);
    }
}

/// Interrupts `thread`'s `KVM_RUN` with the machine's kick signal.
fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` was recorded by the vCPU thread itself while its machine's exit signal
    // was not raised; the machine joins its threads only after raising that signal and then
    // calling `stopping` (which forgets them under the lock our caller holds), and our caller
    // checks the signal under that lock before kicking. So `thread` names a live, or finished
    // but unjoined, thread. The signal has a handler installed by `Machine::run` before any
    // vCPU thread starts.
    unsafe {
        libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::power::IrqLine;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    struct NoLine;
    impl IrqLine for NoLine {
        fn set_level(&self, _: bool) {}
    }

    fn pm1() -> Arc<Mutex<Pm1Event>> {
        Arc::new(Mutex::new(Pm1Event::new(Box::new(NoLine))))
    }

    /// A control whose events a test reads back.
    fn control(options: ControlOptions) -> (Arc<VmControl>, BufReader<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        let events = Events::default();
        events.add(Arc::new(Mutex::new(a)));
        b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let c = VmControl::new(ControlOptions {
            events: Some(events),
            ..options
        });
        (c, BufReader::new(b))
    }

    fn next_event(r: &mut BufReader<UnixStream>) -> Value {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let mut v: Value = serde_json::from_str(&l).unwrap();
        v.as_object_mut().unwrap().remove("timestamp");
        v
    }

    /// A clock the test moves by hand; records what the control sets it to.
    #[derive(Default)]
    struct FakeClock {
        now: AtomicU64,
        set_to: Mutex<Vec<u64>>,
    }
    impl GuestClock for FakeClock {
        fn now(&self) -> Option<u64> {
            Some(self.now.load(Ordering::SeqCst))
        }
        fn set(&self, ns: u64) {
            self.set_to.lock().unwrap().push(ns);
            self.now.store(ns, Ordering::SeqCst);
        }
    }

    #[test]
    fn guest_time_stands_still_while_paused() {
        let c = VmControl::new(ControlOptions::default());
        let clock = Arc::new(FakeClock::default());
        clock.now.store(1_000, Ordering::SeqCst);
        let m = FakeMachine::start_with_clock(&c, 2, clock.clone());
        m.wait_for_progress(0);
        // Running: nothing is touched.
        c.resume().unwrap();
        assert!(clock.set_to.lock().unwrap().is_empty());
        c.pause();
        clock.now.store(5_000, Ordering::SeqCst); // time passes while paused
        assert_eq!(c.guest_clock(), Some(5_000));
        c.resume().unwrap();
        assert_eq!(*clock.set_to.lock().unwrap(), vec![1_000]);
        assert_eq!(c.guest_clock(), Some(1_000));
        m.exit.raise(ExitReason::PowerOff);
        m.finish(&c);
        assert_eq!(c.guest_clock(), None);
    }

    /// Stand-in vCPU threads: park, then "run" (count) until the exit signal is raised. The
    /// handler for the kick signal is installed so kicks are harmless.
    struct FakeMachine {
        exit: Arc<ExitSignal>,
        counts: Vec<Arc<AtomicU64>>,
        threads: Vec<std::thread::JoinHandle<()>>,
        pm1: Arc<Mutex<Pm1Event>>,
    }

    impl FakeMachine {
        fn start(c: &Arc<VmControl>, n: usize) -> Self {
            Self::start_with_clock(c, n, Arc::new(FakeClock::default()))
        }

        fn start_with_clock(c: &Arc<VmControl>, n: usize, clock: Arc<FakeClock>) -> Self {
            crate::machine::install_kick_handler().unwrap();
            let exit = ExitSignal::new().unwrap();
            let pm1 = pm1();
            c.attach(exit.clone(), pm1.clone(), Some(clock.clone()), n)
                .unwrap();
            let counts: Vec<_> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
            let threads = counts
                .iter()
                .enumerate()
                .map(|(id, count)| {
                    let (c, exit, count) = (c.clone(), exit.clone(), count.clone());
                    std::thread::spawn(move || {
                        c.vcpu_started(id);
                        while exit.get().is_none() {
                            c.park(id, &exit);
                            count.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    })
                })
                .collect();
            FakeMachine {
                exit,
                counts,
                threads,
                pm1,
            }
        }

        fn total(&self) -> u64 {
            self.counts.iter().map(|c| c.load(Ordering::SeqCst)).sum()
        }

        fn wait_for_progress(&self, from: u64) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.total() <= from {
                assert!(Instant::now() < deadline, "the vCPUs never ran");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// What `Machine::run` does once the exit signal is raised.
        fn finish(self, c: &VmControl) -> ExitReason {
            let reason = self.exit.wait();
            c.stopping();
            for t in self.threads {
                t.join().unwrap();
            }
            c.detach(reason);
            reason
        }
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_lets_them_go() {
        let (c, mut ev) = control(ControlOptions::default());
        assert_eq!(c.state(), RunState::Prelaunch);
        let m = FakeMachine::start(&c, 3);
        assert_eq!(next_event(&mut ev), json!({"event": "RESUME"}));
        assert_eq!(c.state(), RunState::Running);
        m.wait_for_progress(0);
        c.pause();
        assert_eq!(c.state(), RunState::Paused);
        assert_eq!(next_event(&mut ev)["event"], "STOP");
        // Every thread is parked: nothing moves.
        let a = m.total();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(m.total(), a);
        // Two clients stopping at once: one STOP only (the next event is cont's RESUME).
        c.resume().unwrap();
        assert_eq!(next_event(&mut ev)["event"], "RESUME");
        let both: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.pause())
            })
            .collect();
        both.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.state(), RunState::Paused);
        assert_eq!(next_event(&mut ev)["event"], "STOP");
        // stop while paused: nothing, no event; cont: RESUME and progress.
        c.pause();
        c.resume().unwrap();
        assert_eq!(next_event(&mut ev)["event"], "RESUME");
        assert_eq!(c.state(), RunState::Running);
        m.wait_for_progress(a);
        // cont while running: nothing.
        c.resume().unwrap();
        c.request_shutdown(ShutdownCause::HostQmpQuit);
        assert_eq!(m.finish(&c), ExitReason::Terminated);
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})
        );
        assert_eq!(c.state(), RunState::Shutdown);
        assert_eq!(c.resume(), Err(ControlError::ResetRequired));
    }

    #[test]
    fn stopping_a_paused_machine_does_not_hang() {
        let (c, _ev) = control(ControlOptions::default());
        let m = FakeMachine::start(&c, 2);
        m.wait_for_progress(0);
        c.pause();
        // The guest's own power-off cannot happen while paused; a signal can.
        m.exit.raise(ExitReason::Terminated);
        assert_eq!(m.finish(&c), ExitReason::Terminated);
        assert_eq!(c.state(), RunState::Shutdown);
    }

    #[test]
    fn start_paused_holds_the_vcpus_until_cont() {
        let (c, mut ev) = control(ControlOptions {
            start_paused: true,
            ..Default::default()
        });
        let m = FakeMachine::start(&c, 1);
        assert_eq!(c.state(), RunState::Prelaunch);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(m.total(), 0);
        // stop in prelaunch: no event, still prelaunch.
        c.pause();
        assert_eq!(c.state(), RunState::Prelaunch);
        c.resume().unwrap();
        assert_eq!(next_event(&mut ev)["event"], "RESUME");
        m.wait_for_progress(0);
        m.exit.raise(ExitReason::PowerOff);
        assert_eq!(m.finish(&c), ExitReason::PowerOff);
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}})
        );
    }

    #[test]
    fn resets_continue_on_a_new_machine_and_name_their_cause() {
        let (c, mut ev) = control(ControlOptions::default());
        let m = FakeMachine::start(&c, 1);
        next_event(&mut ev); // RESUME
        c.request_reset();
        let r = m.finish(&c);
        assert!(c.reboots_after(r));
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}})
        );
        assert_eq!(c.state(), RunState::Running);
        // The next machine: no RESUME (the VM never stopped); the guest resets itself.
        let m = FakeMachine::start(&c, 1);
        m.wait_for_progress(0);
        m.exit.raise(ExitReason::Reset);
        m.finish(&c);
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}})
        );
        // Paused, then reset: prelaunch, and the next machine waits for cont.
        let m = FakeMachine::start(&c, 1);
        c.pause();
        assert_eq!(next_event(&mut ev)["event"], "STOP");
        c.request_reset();
        m.finish(&c);
        next_event(&mut ev); // RESET
        assert_eq!(c.state(), RunState::Prelaunch);
        // Requests made between machines are kept for the next one.
        c.request_powerdown();
        assert_eq!(next_event(&mut ev), json!({"event": "POWERDOWN"}));
        c.request_shutdown(ShutdownCause::HostQmpQuit);
        c.request_reset();
        let m = FakeMachine::start(&c, 1);
        assert_eq!(
            m.pm1.lock().unwrap().status(),
            crate::machine::power::PWRBTN
        );
        assert_eq!(m.total(), 0);
        assert_eq!(m.finish(&c), ExitReason::Terminated);
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})
        );
    }

    #[test]
    fn no_reboot_turns_resets_into_shutdowns() {
        let (c, mut ev) = control(ControlOptions {
            no_reboot: true,
            ..Default::default()
        });
        let m = FakeMachine::start(&c, 1);
        next_event(&mut ev); // RESUME
        m.exit.raise(ExitReason::Reset);
        let r = m.finish(&c);
        assert!(!c.reboots_after(r));
        assert_eq!(
            next_event(&mut ev),
            json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}})
        );
        assert_eq!(c.state(), RunState::Shutdown);
    }

    #[test]
    fn a_control_runs_one_machine_at_a_time() {
        let c = VmControl::new(ControlOptions::default());
        let m = FakeMachine::start(&c, 1);
        assert_eq!(
            c.attach(ExitSignal::new().unwrap(), pm1(), None, 1),
            Err(ControlError::Busy)
        );
        m.exit.raise(ExitReason::PowerOff);
        m.finish(&c);
    }
}
