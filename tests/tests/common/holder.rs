//! Processes that hold an image open until dropped (qemu-io, qemu-storage-daemon, qemu-nbd,
//! img bench): what locking tests run against.
#![allow(dead_code)]

use super::img_bin;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// A process that holds an image until dropped.
pub struct Holder {
    /// A child to stop by killing it (img bench), rather than by closing its input.
    kill: bool,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// A daemon (qemu-storage-daemon, qemu-nbd) that forked away: its pid file.
    pid_file: Option<PathBuf>,
}

impl Holder {
    /// qemu-io with the image open (`-r`: read-only), reading commands from a pipe. Ready once
    /// it has answered a read, which proves the image is open.
    pub fn qemu_io(fmt: &str, path: &Path, extra: &[&str]) -> Holder {
        let mut child = Command::new("qemu-io")
            .args(extra)
            .args(["-f", fmt])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run qemu-io");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            if line.contains("read 512/512 bytes at offset 0") {
                break;
            }
            if n == 0 {
                let status = child.wait().unwrap();
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                panic!(
                    "qemu-io {extra:?} {} did not open: {status} {err}",
                    path.display()
                );
            }
        }
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Holder {
            kill: false,
            child: Some(child),
            stdin: Some(stdin),
            pid_file: None,
        }
    }

    /// A daemon started with `args` that forks away once it is up (its parent exits then),
    /// writing its pid to `pid_file`.
    pub fn daemon(cmd: &str, args: &[String], pid_file: PathBuf) -> Holder {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(pid_file.exists(), "{cmd} wrote no pid file");
        Holder {
            kill: false,
            child: None,
            stdin: None,
            pid_file: Some(pid_file),
        }
    }

    /// qemu-storage-daemon with a qcow2 node on `path` (read-write).
    pub fn storage_daemon(dir: &Path, path: &Path) -> Holder {
        let pid = dir.join("qsd.pid");
        let args = vec![
            "--daemonize".to_string(),
            "--pidfile".into(),
            pid.display().to_string(),
            "--blockdev".into(),
            format!("driver=file,node-name=f,filename={}", path.display()),
            "--blockdev".into(),
            "driver=qcow2,node-name=q,file=f".into(),
        ];
        Holder::daemon("qemu-storage-daemon", &args, pid)
    }

    /// qemu-nbd serving `path` (qcow2, writable) on a Unix socket.
    pub fn nbd(dir: &Path, path: &Path) -> Holder {
        let pid = dir.join("nbd.pid");
        let args = vec![
            "--fork".to_string(),
            "--pid-file".into(),
            pid.display().to_string(),
            "--socket".into(),
            dir.join("nbd.sock").display().to_string(),
            "-f".into(),
            "qcow2".into(),
            path.display().to_string(),
        ];
        Holder::daemon("qemu-nbd", &args, pid)
    }

    /// img holding the image open through `img bench` with a practically endless count. Ready
    /// once bench has printed its first line, which it does after opening the image.
    pub fn img_bench(fmt: &str, path: &Path, extra: &[&str]) -> Holder {
        let mut child = Command::new(img_bin())
            .arg("bench")
            .args(extra)
            .args([
                "-c",
                "2000000000",
                "-d",
                "1",
                "-s",
                "512",
                "-S",
                "0",
                "-f",
                fmt,
            ])
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run img");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if !line.starts_with("Sending") {
            let status = child.wait().unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!(
                "img bench {extra:?} {} did not start: {status} {err}",
                path.display()
            );
        }
        Holder {
            kill: true,
            child: Some(child),
            stdin: None,
            pid_file: None,
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // qemu-io quits on "quit" (or at the end of its input, when the pipe closes).
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        if let Some(mut child) = self.child.take() {
            if self.kill {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Some(pid_file) = self.pid_file.take() {
            let pid: libc::pid_t = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if pid > 0 {
                // SAFETY: plain kill(2) of the daemon this holder started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                // It is not our child, so wait for it by watching /proc: gone, or a zombie
                // (whose descriptors, and so locks, are released already).
                for _ in 0..2000 {
                    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                        Ok(s) if !s.contains(") Z ") => {
                            std::thread::sleep(std::time::Duration::from_millis(5))
                        }
                        _ => break,
                    }
                }
            }
        }
    }
}
