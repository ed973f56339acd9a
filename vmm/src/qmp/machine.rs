//! The VM's run-state commands of QMP over a [`VmControl`]: query-status, query-kvm, stop, cont,
//! system_reset, system_powerdown and quit. Their events (STOP, RESUME, RESET, POWERDOWN,
//! SHUTDOWN) are emitted by the control, which also sees the guest's own power-off and reset.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{Handler, QmpError};
use crate::machine::control::{RunState, ShutdownCause, VmControl};

/// The run-state commands.
pub struct MachineCommands {
    control: Arc<VmControl>,
}

impl MachineCommands {
    /// Commands acting on `control` (the one every machine of the VMM runs under).
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }

    fn query_status(&self) -> Value {
        let state = self.control.state();
        // QEMU 9.0 removed the deprecated `singlestep` member (always false under KVM); the
        // greeting announces a later QEMU, so it is not sent.
        json!({
            "status": state.as_str(),
            "running": state == RunState::Running,
        })
    }
}

impl Handler for MachineCommands {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
        let known = matches!(
            command,
            "query-status"
                | "query-kvm"
                | "stop"
                | "cont"
                | "system_reset"
                | "system_powerdown"
                | "quit"
        );
        if !known {
            return None;
        }
        // None of these commands takes arguments; QEMU refuses any with this message.
        if let Some(name) = args.keys().next() {
            return Some(Err(QmpError::generic(format!(
                "Parameter '{name}' is unexpected"
            ))));
        }
        let done = Ok(json!({}));
        Some(match command {
            "query-status" => Ok(self.query_status()),
            // KVM is the only accelerator this VMM has, and a machine exists only if it opened.
            "query-kvm" => Ok(json!({"enabled": true, "present": true})),
            "stop" => {
                self.control.pause();
                done
            }
            "cont" => self
                .control
                .resume()
                .map(|()| json!({}))
                .map_err(|e| QmpError::generic(e.to_string())),
            "system_reset" => {
                self.control.request_reset();
                done
            }
            "system_powerdown" => {
                self.control.request_powerdown();
                done
            }
            _ => {
                // quit: the answer goes out while the VMM winds down (closing disks first).
                self.control.request_shutdown(ShutdownCause::HostQmpQuit);
                done
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::control::ControlOptions;
    use crate::qmp::Handlers;

    /// Knows one command, which shadows the machine's `stop` when listed first.
    struct Echo;
    impl Handler for Echo {
        fn execute(
            &self,
            command: &str,
            _: &Map<String, Value>,
        ) -> Option<Result<Value, QmpError>> {
            (command == "stop" || command == "echo").then(|| Ok(json!(command)))
        }
    }

    #[test]
    fn handlers_ask_each_in_turn_and_the_first_that_knows_answers() {
        let control = VmControl::new(ControlOptions::default());
        let both = Handlers(vec![
            Arc::new(Echo),
            Arc::new(MachineCommands::new(control.clone())),
        ]);
        let none = Map::new();
        assert_eq!(both.execute("echo", &none), Some(Ok(json!("echo"))));
        assert_eq!(both.execute("stop", &none), Some(Ok(json!("stop"))));
        assert_eq!(
            both.execute("query-kvm", &none),
            Some(Ok(json!({"enabled": true, "present": true})))
        );
        assert_eq!(both.execute("query-block", &none), None);
        assert_eq!(Handlers(Vec::new()).execute("stop", &none), None);
    }

    fn run(h: &MachineCommands, cmd: &str) -> Result<Value, QmpError> {
        h.execute(cmd, &Map::new()).expect("a known command")
    }

    #[test]
    fn commands_follow_the_control_before_any_machine() {
        let control = VmControl::new(ControlOptions {
            start_paused: true,
            ..Default::default()
        });
        let h = MachineCommands::new(control.clone());
        assert_eq!(
            run(&h, "query-status").unwrap(),
            json!({"status": "prelaunch", "running": false})
        );
        assert_eq!(
            run(&h, "query-kvm").unwrap(),
            json!({"enabled": true, "present": true})
        );
        assert_eq!(run(&h, "stop").unwrap(), json!({}));
        assert_eq!(control.state(), RunState::Prelaunch);
        assert_eq!(run(&h, "cont").unwrap(), json!({}));
        assert_eq!(
            run(&h, "query-status").unwrap(),
            json!({"status": "running", "running": true})
        );
        assert!(h.execute("query-block", &Map::new()).is_none());
        let mut args = Map::new();
        args.insert("force".into(), json!(true));
        assert_eq!(
            h.execute("stop", &args).unwrap(),
            Err(QmpError::generic("Parameter 'force' is unexpected"))
        );
    }
}
