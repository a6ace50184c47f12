#!/usr/bin/python3
"""QMP (QEMU's JSON monitor protocol): a small client and the switch-over, imported by
scripts/umemd_harness/vm.py for scripts/migrate-vm; also a command line:

    qmp.py migrate SRC.qmp DST.qmp URI [--gate-socket CTL] [--caps CAP,...] [--params JSON] [--postcopy]
                   [--resume-destination]
        Sets the capabilities (and migration parameters) on both sides, starts `migrate URI` on the
        source (then at once `migrate-start-postcopy` with --postcopy), opens the destination
        daemon's pull gate (`gate open` on its control socket CTL) the moment the source reports STOP,
        waits for the migration
        to complete, and prints a JSON report with the timings (ms from `migrate`: source STOP,
        destination RESUME, completion), QEMU's own figures (total-time, downtime, bytes) and the
        guest's downtime (the destination's RESUME event minus the source's STOP event, both
        stamped by QEMU).
        --resume-destination is for a destination QEMU started with -S (as libvirt does): the gate
        opens while the source sends its device state, and once both are done `cont` starts the
        destination (it cannot run before the gate has opened). If the gate does not open, the
        migration is cancelled, or (when the source had already completed) the source continued.
    qmp.py cmd SOCK COMMAND [JSON-ARGS]    one command, its return value printed as JSON
"""
import json
import select
import socket
import sys
import time


class QMP:
    def __init__(self, path, timeout=30.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RuntimeError("no QMP socket at %s after %.0f s" % (path, timeout))
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                msg["host_time"] = time.time()
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError("QMP %s: %s" % (name, msg["error"].get("desc", msg["error"])))
            return msg.get("return")

    def wait_event(self, names, timeout):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise RuntimeError("no %s event within %.0f s" % ("/".join(names), timeout))
            self.poll(left)

    def poll(self, timeout=0.0):
        """Reads the events that arrive within `timeout` s (stamped with the time they were read)."""
        deadline = time.time() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.time()))
            if not ready:
                return
            msg = self._read()
            msg["host_time"] = time.time()
            self.events.append(msg)
            timeout = 0.0
            deadline = time.time()

    def event_time(self, name):
        """The time the first `name` event was read, or None."""
        for e in self.events:
            if e["event"] == name:
                return e["host_time"]
        return None


def control(path, request):
    """One request to an nbd-umemd control socket (JSON lines: a request object such as
    {"command": "gate", "action": "open"} out, one reply object back); the reply, decoded. The
    reply's "ok" says whether the command succeeded, "error" why not. A str REQUEST is sent as the
    line itself (the plain-text commands of builds before the JSON requests)."""
    line = request if isinstance(request, str) else json.dumps(request)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    finally:
        s.close()
    return json.loads(reply.decode("utf-8", "replace"))


def open_gate(gate_socket):
    """`gate open` on an nbd-umemd control socket; the reply (RuntimeError if it failed)."""
    # written straight to the control socket: no process to start while the source completes
    try:
        reply = control(gate_socket, {"command": "gate", "action": "open"})
        if reply.get("ok") is not True and "unknown command" in str(reply.get("error", "")):
            # a build from before the JSON requests (benchmarks compare against older builds):
            # its command is the line "gate open", its reply has no "ok", only "error" on failure
            reply = control(gate_socket, "gate open")
            reply.setdefault("ok", "error" not in reply)
    except (OSError, ValueError) as e:
        raise RuntimeError("gate open on %s failed: %s" % (gate_socket, e))
    if reply.get("ok") is not True:
        raise RuntimeError("gate open failed: %s" % reply.get("error", reply))
    return reply


def _prefetch(gate_socket, action):
    """`prefetch pause|resume` on the destination daemon (a daemon without a background pull says
    so: nothing to hold then)."""
    try:
        control(gate_socket, {"command": "prefetch", "action": action})
    except (OSError, ValueError):
        pass


def _cancel(src):
    """Gives the VM back to the source: migrate_cancel while its migration runs (the source VM resumes
    by itself then), `cont` once it has completed (a source in postmigrate continues)."""
    for _ in range(1000):
        try:
            status = src.cmd("query-migrate").get("status")
            if status in ("completed", "failed", "cancelled", None):
                if src.cmd("query-status").get("status") != "running":
                    src.cmd("cont")
                return
            if status != "cancelling":
                src.cmd("migrate_cancel")
        except (RuntimeError, OSError):
            return
        time.sleep(0.01)


def qemu_time(event):
    """The time QEMU stamped on an event (s), or None."""
    t = event.get("timestamp") or {}
    return t["seconds"] + t["microseconds"] / 1e6 if "seconds" in t else None


def migrate(src_path, dst_path, uri, gate_socket=None, caps=("x-ignore-shared",), postcopy=False, params=None,
            resume_destination=False):
    src, dst = QMP(src_path), QMP(dst_path)
    for q in (src, dst):
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": c, "state": True} for c in caps if c])
        if params:
            q.cmd("migrate-set-parameters", **params)
    report = {"uri": uri, "capabilities": [c for c in caps if c], "parameters": params or {},
              "resume_destination": resume_destination}
    if resume_destination:
        # the destination's MIGRATION events say when it has loaded the state (no polling while the
        # two QEMUs complete)
        dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    if resume_destination and gate_socket:
        # The destination's background pull waits until it runs (below): until then the source is
        # still completing and the two hosts' cores are better left to it.
        _prefetch(gate_socket, "pause")
    t0 = time.time()
    report["migrate_started_at"] = t0
    src.cmd("migrate", uri=uri)
    if postcopy:
        src.cmd("migrate-start-postcopy")
    stop = src.wait_event(["STOP"], 1800)
    report["source_stop_ms"] = round((stop["host_time"] - t0) * 1000, 1)
    if gate_socket:
        try:
            reply = open_gate(gate_socket)
        except RuntimeError:
            if resume_destination:
                _cancel(src)
            raise
        report["gate_open_ms"] = round((time.time() - t0) * 1000, 1)
        report["gate_reply"] = reply
        if "late_pages" in reply:
            report["late_pages"] = reply["late_pages"]
    if resume_destination:
        # The destination (-S) has loaded the device state once its side of the migration completes;
        # `cont` starts it. Until then the source can still take the VM back.
        deadline = time.time() + 600
        while True:
            status = dst.cmd("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.time() > deadline:
                _cancel(src)
                raise RuntimeError("the destination did not load the migration (status %s)" % status)
            try:
                dst.wait_event(["MIGRATION"], max(0.001, deadline - time.time()))
            except RuntimeError:
                pass
        dst.cmd("cont")
        report["continue_ms"] = round((time.time() - t0) * 1000, 1)
        if gate_socket:
            _prefetch(gate_socket, "resume")
    # Poll the source until the migration ends, reading the destination's events as they come (its
    # RESUME comes long before the end of a post-copy migration).
    while True:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        dst.poll(0.02)
    report["completed_ms"] = round((time.time() - t0) * 1000, 1)
    report["status"] = info.get("status")
    if info.get("status") != "completed":
        report["error"] = info.get("error-desc", "migration " + str(info.get("status")))
        return report
    resumed = next((e for e in dst.events if e["event"] == "RESUME"), None) or dst.wait_event(["RESUME"], 600)
    report["destination_resume_ms"] = round((resumed["host_time"] - t0) * 1000, 1)
    a, b = qemu_time(stop), qemu_time(resumed)
    report["guest_downtime_ms"] = round((b - a) * 1000, 2) if a is not None and b is not None else None
    if postcopy:
        # The destination has all RAM once its own side of the migration completes.
        while dst.cmd("query-migrate").get("status") not in ("completed", "failed", None):
            time.sleep(0.01)
        report["completed_ms"] = round((time.time() - t0) * 1000, 1)
    report["qemu_total_time_ms"] = info.get("total-time")
    report["qemu_downtime_ms"] = info.get("downtime")
    ram = info.get("ram", {})
    report["qemu_ram_transferred_bytes"] = ram.get("transferred")
    report["destination_status"] = dst.cmd("query-status").get("status")
    return report


def main(argv):
    if len(argv) >= 5 and argv[1] == "migrate":
        caps, postcopy, params, gate_socket, resume = ["x-ignore-shared"], False, None, None, False
        rest = argv[5:]
        while rest:
            a = rest.pop(0)
            if a == "--gate-socket":
                gate_socket = rest.pop(0)
            elif a == "--caps":
                caps = [c for c in rest.pop(0).split(",") if c]
            elif a == "--params":
                params = json.loads(rest.pop(0))
            elif a == "--postcopy":
                postcopy = True
            elif a == "--resume-destination":
                resume = True
            else:
                sys.exit("qmp.py: unknown option %s" % a)
        try:
            report = migrate(argv[2], argv[3], argv[4], gate_socket, caps, postcopy, params, resume)
        except RuntimeError as e:
            report = {"status": "error", "error": str(e)}
        print(json.dumps(report))
        return 0 if report.get("status") == "completed" else 1
    if len(argv) >= 4 and argv[1] == "cmd":
        args = json.loads(argv[4]) if len(argv) > 4 else {}
        try:
            print(json.dumps(QMP(argv[2], timeout=5).cmd(argv[3], **args)))
        except RuntimeError as e:
            sys.exit("qmp.py: %s" % e)
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
