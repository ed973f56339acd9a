//! The QMP server over a real socket, with the block commands over real images.

use super::block::{BlockCommands, Drive, NamedDrive};
use super::*;
use crate::scsi::{Lun, LunKind, LunOptions};
use crate::virtio_blk::{BlockDevice, DeviceOptions};
use img_core::{open_image, OpenOptions};
use std::io::{BufRead, BufReader};

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Client {
    fn connect(path: &Path) -> (Self, Value) {
        let s = UnixStream::connect(path).unwrap();
        let mut c = Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
        };
        let greeting = c.line();
        (c, greeting)
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "{l:?}");
        serde_json::from_str(&l).unwrap()
    }

    /// Sends `msg` and returns the answer, keeping the events that came before it.
    fn call(&mut self, msg: Value) -> Value {
        self.writer.write_all(msg.to_string().as_bytes()).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Value {
        self.call(json!({"execute": cmd, "arguments": args}))
    }
}

fn qcow2(dir: &Path, name: &str) -> Image {
    let path = dir.join(name);
    img_core::qcow2::create(
        &path,
        &img_core::qcow2::Qcow2CreateOptions {
            size: 16 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    open_image(&path, &OpenOptions::default()).unwrap()
}

use img_core::Image;

fn server(dir: &Path) -> (std::path::PathBuf, Arc<BlockDevice>, Arc<Lun>) {
    let disk = Arc::new(BlockDevice::new(
        qcow2(dir, "disk.qcow2"),
        DeviceOptions::default(),
    ));
    let cd = Arc::new(Lun::new(
        None,
        LunOptions {
            kind: LunKind::Cdrom,
            ..Default::default()
        },
    ));
    let sock = dir.join("qmp.sock");
    let events = Events::default();
    let block = BlockCommands::new(
        vec![
            NamedDrive {
                settings: Default::default(),
                id: "drive0".into(),
                qdev: "vda".into(),
                drive: Drive::Virtio(Arc::clone(&disk)),
            },
            NamedDrive {
                settings: Default::default(),
                id: "cd0".into(),
                qdev: "scsi-cd0".into(),
                drive: Drive::Scsi(Arc::clone(&cd)),
            },
        ],
        events.clone(),
    );
    Server::bind(&sock, Arc::new(block), events, (7, 2, 0)).unwrap();
    (sock, disk, cd)
}

#[test]
fn greeting_negotiation_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _, _) = server(dir.path());
    let (mut c, greeting) = Client::connect(&sock);
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 7);
    assert!(greeting["QMP"]["capabilities"].is_array());
    // Before negotiation, only qmp_capabilities is accepted.
    let r = c.exec("query-block", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = c.call(json!({"execute": "qmp_capabilities", "id": 7}));
    assert_eq!(r, json!({"return": {}, "id": 7}));
    let r = c.exec("qmp_capabilities", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = c.exec("no-such-command", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = c.call(json!({"arguments": {}}));
    assert_eq!(r["error"]["class"], "GenericError");
    let r = c.call(json!([1, 2]));
    assert_eq!(r["error"]["class"], "GenericError");
    let r = c.exec("eject", json!({"device": "nope"}));
    assert_eq!(r["error"]["class"], "DeviceNotFound");
    let r = c.exec("eject", json!({"device": "drive0"}));
    assert_eq!(r["error"]["desc"], "Device 'drive0' is not removable");
}

#[test]
fn query_block_and_blockstats() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _, _) = server(dir.path());
    let (mut c, _) = Client::connect(&sock);
    c.exec("qmp_capabilities", json!({}));
    let r = c.exec("query-block", json!({}));
    let list = r["return"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["device"], "drive0");
    assert_eq!(list[0]["inserted"]["drv"], "qcow2");
    assert_eq!(list[0]["inserted"]["image"]["virtual-size"], 16 << 20);
    assert_eq!(list[0]["removable"], false);
    assert_eq!(list[1]["removable"], true);
    assert_eq!(list[1]["tray_open"], true);
    assert!(list[1].get("inserted").is_none());
    let r = c.exec("query-blockstats", json!({}));
    assert_eq!(r["return"][0]["stats"]["wr_operations"], 0);
}

#[test]
fn cdrom_media_and_tray_events() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _, cd) = server(dir.path());
    let iso = dir.path().join("a.iso");
    std::fs::write(&iso, vec![0x41u8; 1 << 20]).unwrap();
    let (mut c, _) = Client::connect(&sock);
    c.exec("qmp_capabilities", json!({}));
    let r = c.exec(
        "blockdev-change-medium",
        json!({"id": "scsi-cd0", "filename": iso, "format": "raw"}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert!(!cd.is_tray_open());
    let r = c.exec("query-block", json!({}));
    assert_eq!(r["return"][1]["inserted"]["ro"], true);
    assert_eq!(r["return"][1]["tray_open"], false);
    // The tray closed with the new medium: an event for the closing (it was open).
    let moved: Vec<bool> = c
        .events
        .iter()
        .map(|e| {
            assert_eq!(e["event"], "DEVICE_TRAY_MOVED");
            assert_eq!(e["data"]["device"], "cd0");
            e["data"]["tray-open"].as_bool().unwrap()
        })
        .collect();
    assert_eq!(moved, vec![false]);
    // Eject: the tray opens (an event), the medium is gone.
    let r = c.exec("eject", json!({"device": "cd0"}));
    assert_eq!(r, json!({"return": {}}));
    assert!(cd.is_tray_open());
    let r = c.exec("query-block", json!({}));
    assert!(r["return"][1].get("inserted").is_none());
    assert_eq!(c.events.last().unwrap()["data"]["tray-open"], true);
    // A missing file is a clean error.
    let r = c.exec(
        "blockdev-change-medium",
        json!({"device": "cd0", "filename": dir.path().join("missing.iso")}),
    );
    assert_eq!(r["error"]["class"], "GenericError");
}

#[test]
fn internal_snapshot_of_a_qcow2_drive() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, disk, _) = server(dir.path());
    let (mut c, _) = Client::connect(&sock);
    c.exec("qmp_capabilities", json!({}));
    let r = c.exec(
        "blockdev-snapshot-internal-sync",
        json!({"device": "drive0", "name": "snap1"}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.exec(
        "blockdev-snapshot-internal-sync",
        json!({"device": "drive0", "name": "snap1"}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Snapshot with name 'snap1' already exists"
    );
    let r = c.exec(
        "blockdev-snapshot-internal-sync",
        json!({"device": "cd0", "name": "x"}),
    );
    assert_eq!(r["error"]["class"], "GenericError");
    disk.close().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(dir.path().join("disk.qcow2"))
        .output()
        .expect("qemu-img runs");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("snap1"), "{listing}");
    let out = std::process::Command::new("qemu-img")
        .args(["check"])
        .arg(dir.path().join("disk.qcow2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn oversized_input_disconnects_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _, _) = server(dir.path());
    let (mut c, _) = Client::connect(&sock);
    c.exec("qmp_capabilities", json!({}));
    let huge = format!("{{\"execute\": \"{}", "x".repeat(3 << 20));
    let _ = c.writer.write_all(huge.as_bytes());
    let mut l = String::new();
    // The server hangs up rather than buffer without end.
    let n = c.reader.read_line(&mut l).unwrap_or(0);
    assert_eq!(n, 0, "{l}");
}
