//! QMP, the QEMU Machine Protocol, on a unix socket: the greeting, capabilities negotiation,
//! commands with their `return` or `error` answers, and events broadcast to every client in
//! command mode. What the commands do is up to a [`Handler`]; [`block`] implements the block
//! commands over the VMM's drives, [`machine`] the VM's run-state commands; [`Handlers`]
//! combines them.

pub mod block;
pub mod machine;

use serde_json::{json, Map, Value};
use std::cell::Cell;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// A command's failure, as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
    pub class: &'static str,
    /// What went wrong, for a person.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound`.
    pub fn device_not_found(device: &str) -> Self {
        QmpError {
            class: "DeviceNotFound",
            desc: format!("Device '{device}' not found"),
        }
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(command: &str) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: format!("The command {command} has not been found"),
        }
    }
}

/// Runs QMP commands.
pub trait Handler: Send + Sync {
    /// Runs `command` with `args`; `None` when this handler does not know the command.
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>>;
}

/// Several handlers as one: the first that knows a command runs it.
pub struct Handlers(pub Vec<Arc<dyn Handler>>);

impl Handler for Handlers {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
        self.0.iter().find_map(|h| h.execute(command, args))
    }
}

/// Where events go: every client that has finished capabilities negotiation.
#[derive(Default, Clone)]
pub struct Events {
    clients: Arc<Mutex<Vec<Arc<Mutex<UnixStream>>>>>,
}

impl Events {
    /// Sends `event` with `data` to every client in command mode; clients that went away are
    /// dropped. `Value::Null` sends the event without a `data` member (STOP, RESUME, ...).
    pub fn emit(&self, event: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut msg = json!({
            "event": event,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if !data.is_null() {
            msg["data"] = data;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|c| send(&mut c.lock().unwrap_or_else(|e| e.into_inner()), &msg).is_ok());
    }

    pub(crate) fn add(&self, client: Arc<Mutex<UnixStream>>) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client);
    }
}

fn send(stream: &mut UnixStream, msg: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.extend_from_slice(b"\r\n");
    stream.write_all(&line)
}

/// A QMP server: accepts clients on a unix socket, one thread each.
pub struct Server {
    /// Set once the first client has connected (for QEMU's `wait=on`).
    connected: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// Commands being run or answered, by every client.
    busy: Arc<crate::executor::InFlight>,
}

impl Server {
    /// Listens on `path` (replacing a stale socket) and serves clients with `handler` on
    /// threads of their own; `events` (shared with whatever emits them) reaches every client
    /// in command mode. `version` is the (major, minor, micro) the greeting announces.
    pub fn bind(
        path: &Path,
        handler: Arc<dyn Handler>,
        events: Events,
        version: (u32, u32, u32),
    ) -> io::Result<Self> {
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let ev = events;
        let connected = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let first = Arc::clone(&connected);
        let busy = Arc::new(crate::executor::InFlight::default());
        let busy_clients = Arc::clone(&busy);
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    *first.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    first.1.notify_all();
                    let (handler, ev) = (Arc::clone(&handler), ev.clone());
                    let busy = Arc::clone(&busy_clients);
                    let _ =
                        std::thread::Builder::new()
                            .name("qmp-client".into())
                            .spawn(move || {
                                let hang_up = stream.try_clone();
                                let _ = serve_client(stream, handler.as_ref(), &ev, version, &busy);
                                // The event sink may still hold the stream: hang up for real.
                                if let Ok(s) = hang_up {
                                    let _ = s.shutdown(std::net::Shutdown::Both);
                                }
                            });
                }
            })?;
        Ok(Server { connected, busy })
    }

    /// Waits until every command that has started has been answered: a `quit` ends the
    /// machine from inside the command, and its reply must still reach the client before the
    /// process exits.
    pub fn finish_replies(&self) {
        self.busy.wait_idle();
    }

    /// Blocks until a client has connected (QEMU's `-qmp ...,server=on,wait=on` holds the
    /// machine until then).
    pub fn wait_for_client(&self) {
        let (lock, cv) = &*self.connected;
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*c {
            c = cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Most bytes one command may take; a client sending more is disconnected.
const MAX_COMMAND: u64 = 1 << 20;

fn serve_client(
    stream: UnixStream,
    handler: &dyn Handler,
    events: &Events,
    (major, minor, micro): (u32, u32, u32),
    busy: &crate::executor::InFlight,
) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let reply = |msg: Value| send(&mut writer.lock().unwrap_or_else(|e| e.into_inner()), &msg);
    reply(json!({"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "img-vmm"},
        "capabilities": ["oob"],
    }}))?;
    let mut negotiated = false;
    let count = Rc::new(Cell::new(0));
    let reader = PerMessageLimit {
        inner: io::BufReader::new(stream),
        count: Rc::clone(&count),
    };
    let mut messages = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        let next = messages.next();
        count.set(0);
        let msg = match next {
            None => return Ok(()),
            Some(Ok(m)) => m,
            Some(Err(e)) if e.is_eof() || e.is_io() => return Ok(()),
            Some(Err(e)) => {
                // A syntax error ends the stream's usefulness: answer, then hang up.
                reply(error(
                    &QmpError::generic(format!("JSON parse error, {e}")),
                    None,
                ))?;
                return Ok(());
            }
        };
        let id = msg.get("id").cloned();
        let Some(obj) = msg.as_object() else {
            reply(error(
                &QmpError::generic("QMP input must be a JSON object"),
                id,
            ))?;
            continue;
        };
        let Some(cmd) = obj
            .get("execute")
            .or_else(|| obj.get("exec-oob"))
            .and_then(Value::as_str)
        else {
            reply(error(
                &QmpError::generic("QMP input lacks member 'execute'"),
                id,
            ))?;
            continue;
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                reply(error(
                    &QmpError::generic("QMP input member 'arguments' must be an object"),
                    id,
                ))?;
                continue;
            }
        };
        if !negotiated {
            if cmd == "qmp_capabilities" {
                negotiated = true;
                reply(answer(json!({}), id))?;
                events.add(Arc::clone(&writer));
            } else {
                reply(error(
                    &QmpError {
                        class: "CommandNotFound",
                        desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                    },
                    id,
                ))?;
            }
            continue;
        }
        busy.start();
        let result = match cmd {
            "qmp_capabilities" => Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            _ => handler
                .execute(cmd, args)
                .unwrap_or_else(|| Err(QmpError::command_not_found(cmd))),
        };
        let sent = match result {
            Ok(v) => reply(answer(v, id)),
            Err(e) => reply(error(&e, id)),
        };
        busy.finish();
        sent?;
    }
}

fn answer(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn error(e: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// A reader that fails once more than [`MAX_COMMAND`] bytes arrive without a message being
/// completed (the caller resets the count after each): the parser buffers a whole value, so
/// this bounds its memory whatever a client sends.
struct PerMessageLimit<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: io::Read> io::Read for PerMessageLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        if self.count.get() > MAX_COMMAND {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "QMP command too long",
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
