#!/usr/bin/python3
"""Drives a running vmm over QMP for scripts/vmm-lab.sh's qmp case, in step with the guest's
console, and exits 0 only if every answer and event was what QEMU would give.

usage: qmp-lab-driver.py SOCKET CONSOLE MARKER NEW-CD-MEDIUM NEW-CD-MD5

The guest (see the case's /init) prints MARKER-prefixed lines: its disk work, "ready", "cd
changed DIGEST" once it reads the new medium, then a heartbeat every 0.2 s until the power
button is pressed.
"""
import json
import os
import socket
import sys
import time

sock_path, console, marker, new_medium, new_md5 = sys.argv[1:6]
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.2f}s] {msg}", flush=True)


def fail(msg):
    log(f"FAIL: {msg}")
    sys.exit(1)


def console_text():
    try:
        with open(console, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def wait_console(what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{marker} {what}" in console_text():
            return
        time.sleep(0.1)
    fail(f"'{marker} {what}' did not appear on the console within {timeout} s")


class Qmp:
    def __init__(self, path):
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    fail(f"cannot connect to {path}")
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self.events = []
        greeting = self.read()
        if "QMP" not in greeting:
            fail(f"no greeting: {greeting}")
        log(f"greeting: {json.dumps(greeting['QMP']['version'])}")

    def read(self):
        line = self.file.readline()
        if not line:
            return None
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self.read()
            if r is None:
                fail(f"{name}: the connection closed")
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def ok(self, name, **args):
        r = self.cmd(name, **args)
        if "return" not in r:
            fail(f"{name}: {r}")
        log(f"{name} {json.dumps(args) if args else ''} -> {json.dumps(r['return'])[:200]}")
        return r["return"]

    def wait_event(self, name, timeout=60):
        self.sock.settimeout(timeout)
        try:
            while True:
                for i, e in enumerate(self.events):
                    if e["event"] == name:
                        return self.events.pop(i)
                r = self.read()
                if r is None:
                    fail(f"the connection closed before event {name}")
                if "event" in r:
                    self.events.append(r)
        except socket.timeout:
            fail(f"no {name} event within {timeout} s")
        finally:
            self.sock.settimeout(None)


q = Qmp(sock_path)
q.ok("qmp_capabilities")

status = q.ok("query-status")
if status.get("status") != "running" or status.get("running") is not True:
    fail(f"query-status: {status}")
if q.ok("query-kvm") != {"enabled": True, "present": True}:
    fail("query-kvm does not report KVM")

blocks = {b["device"]: b for b in q.ok("query-block")}
want = {"virtio0": "qcow2", "disk1": "qcow2", "cd0": "raw"}
for dev, fmt in want.items():
    b = blocks.get(dev)
    if not b or b.get("inserted", {}).get("drv") != fmt:
        fail(f"query-block: {dev} missing or not {fmt}: {b}")
if blocks["virtio0"]["inserted"]["cache"] != {"writeback": True, "direct": True, "no-flush": False}:
    fail(f"query-block: virtio0 was opened with cache=none: {blocks['virtio0']['inserted']['cache']}")
if not blocks["cd0"].get("removable") or blocks["cd0"].get("tray_open"):
    fail(f"query-block: cd0 should be removable with its tray closed: {blocks['cd0']}")
if blocks["disk1"].get("removable"):
    fail("query-block: disk1 is not removable")
if q.ok("query-blockstats") is None:
    fail("query-blockstats")

wait_console("ready")
stats = {s["device"]: s["stats"] for s in q.ok("query-blockstats")}
for dev in ("virtio0", "disk1"):
    if stats[dev]["wr_operations"] == 0 or stats[dev]["rd_operations"] == 0:
        fail(f"query-blockstats: {dev} shows no reads or writes: {stats[dev]}")
log(f"blockstats: virtio0 wr_bytes={stats['virtio0']['wr_bytes']} disk1 wr_bytes={stats['disk1']['wr_bytes']}")

# The new medium: the tray opens and closes (two events), and the guest reads the new bytes.
# The guest polls the drive, and Linux locks the tray while /dev/sr0 is open: as QEMU says,
# wait for the tray to be unlocked and try again.
for attempt in range(100):
    r = q.cmd("blockdev-change-medium", id="cd", filename=new_medium, format="raw")
    if "return" in r:
        log(f"blockdev-change-medium -> {r['return']} (attempt {attempt + 1})")
        break
    if "is locked" not in r.get("error", {}).get("desc", ""):
        fail(f"blockdev-change-medium: {r}")
    time.sleep(0.1)
else:
    fail("blockdev-change-medium: the tray stayed locked")
trays = [q.wait_event("DEVICE_TRAY_MOVED")["data"]["tray-open"] for _ in range(2)]
if trays != [True, False]:
    fail(f"DEVICE_TRAY_MOVED events: tray-open {trays}, expected [True, False]")
wait_console(f"cd changed {new_md5}")
cd = next(b for b in q.ok("query-block") if b["device"] == "cd0")
if cd.get("inserted", {}).get("file") != new_medium:
    fail("query-block does not show the new medium")

# stop: the guest's heartbeat stops; cont: it goes on.
wait_console("heartbeat 2")
q.ok("stop")
q.wait_event("STOP")
if q.ok("query-status") != {"status": "paused", "running": False}:
    fail("query-status after stop is not paused")
time.sleep(0.5)
before = console_text().count(f"{marker} heartbeat")
time.sleep(2)
after = console_text().count(f"{marker} heartbeat")
if after != before:
    fail(f"the guest ran while stopped ({before} -> {after} heartbeats)")
log(f"stopped for 2 s: heartbeats stayed at {after}")
q.ok("cont")
q.wait_event("RESUME")
deadline = time.monotonic() + 30
while console_text().count(f"{marker} heartbeat") <= after:
    if time.monotonic() > deadline:
        fail("the guest did not run again after cont")
    time.sleep(0.1)
log("after cont: heartbeats go on")

# The power button: POWERDOWN at once, SHUTDOWN once the guest has powered itself off.
q.ok("system_powerdown")
q.wait_event("POWERDOWN")
shutdown = q.wait_event("SHUTDOWN", timeout=120)
if shutdown["data"].get("guest") is not True:
    fail(f"SHUTDOWN should come from the guest: {shutdown}")
log(f"SHUTDOWN {json.dumps(shutdown['data'])}")
log("ok")
