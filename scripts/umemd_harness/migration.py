"""Live migration of the test VM between two hosts (network namespaces), the orchestration behind
scripts/migrate-vm. Two modes move the RAM through nbd-umemd; precopy and postcopy are QEMU's own.

file mode (--mode file, alias umemd):
  source host (netns, 10.200.0.1)         destination host (netns, 10.200.0.2)
    QEMU, RAM = memory-backend-file           nbd-umemd serve --source nbd://10.200.0.1 --gated
      share=on on /dev/shm/RAMFILE            scripts/attach -> block device
    nbd-umemd serve --file RAMFILE            QEMU -incoming, RAM = memory-backend-file on the device
      --readonly (+ nbdkit delay proxy)

swap mode (--mode swap): the same source; on the destination
    nbd-umemd serve --source ... --swap-size MEM+64M --gated --swap    (a swap export)
    scripts/attach --swap -> DEV; mkswap DEV; swapon -p 32767 DEV
    nbd-umemd stage --ram /dev/shm/RAMFILE-dst --device DEV   (every page of the new RAM file
                                                    "swapped out" to a slot the daemon maps to the
                                                    source page)
    QEMU -incoming, RAM = memory-backend-file share=on on that tmpfs file (stock QEMU)
  and after every page is local: swapoff DEV (the rest comes back from the local store), detach,
  the daemon stopped, the store removed: the VM runs on a plain tmpfs file, depending on nothing.

Each step is a method of Migration, in the order run() calls them; each checks its result. A failure
before the switch-over (fail_before_switch) leaves the source VM running and removes what was set up
on the destination; close() undoes everything on every exit path (swap is system-wide on this
machine: it is never left on). The report (report()) is the JSON migrate-vm prints as its REPORT
line.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from . import vm
from .common import ROOT, die, log, read_text, tail
from .machines import HostPair
from .servers import Server

SRC_IP, DST_IP = "10.200.0.1", "10.200.0.2"
EXPORT_PORT, PROXY_PORT, MIG_PORT = 10809, 10810, 4444
# QEMU's own modes get max-bandwidth 10 GB/s (the default, 128 MiB/s, would cap them below the link)
FAST = {"max-bandwidth": 10000000000}
# vm.page-cluster while swap mode's swapoff runs (see Migration.swapoff)
SWAPOFF_PAGE_CLUSTER = 7
# swap mode: swapoff starts once the destination daemon expects its background pull to end within
# this many seconds (its status's eta_seconds; see start_swapoff)
SWAPOFF_LEAD_S = 1.0
LAZY_MODES = ("file", "swap")      # the modes whose RAM follows through nbd-umemd
SWAP_HEADROOM_MIB = 64             # swap mode: the swap export is the guest RAM plus this much
SWAP_PRIORITY = 32767              # swapon -p: the highest, so the kernel uses this device first
PAGE = 4096


WORK_LINE = re.compile(r"WORK t=([0-9.]+) ops=([0-9]+) rate=([0-9]+) errors=([0-9]+)")


def work_timeline(path):
    """The guest's progress lines in a console timeline (ConsoleStamper's "HOST-TIME LINE"): (host
    time, ops, rate, errors) of each WORK line; and the number of WORK-ERROR lines."""
    out, bad = [], 0
    for raw in read_text(path).splitlines():
        ts, _, rest = raw.partition(" ")
        bad += "WORK-ERROR" in rest
        x = WORK_LINE.search(rest)
        if x:
            out.append((float(ts), int(x.group(2)), int(x.group(3)), int(x.group(4))))
    return out, bad


def say(msg):
    log(msg)


class FailedBeforeSwitch(Exception):
    """Raised after fail_before_switch has undone the destination: migrate-vm exits 1."""


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM are noted inside the block instead of interrupting it (a cleanup that
    stopped half-way could leave a swap device on, which is system-wide); the first one noted is
    acted on afterwards by the handler that was installed before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []

    def note(signum, _frame):
        got.append(signum)
        log("signal %d: finishing the cleanup first" % signum)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got and callable(old[got[0]]):
        old[got[0]](got[0], None)


def run_child(argv, err_path, timeout=None, started=None):
    """Runs ARGV in a session of its own (a Ctrl-C or `timeout` aimed at this process group does not
    cut it off half-way), stdout captured, stderr appended to ERR_PATH; returns (exit status,
    stdout text), status 124 after TIMEOUT s. If this process is interrupted meanwhile (a signal
    raises SystemExit), the child gets SIGTERM and is waited for (SIGKILL after 30 s), so the
    cleanup it does on SIGTERM still happens; then the exception goes on."""
    with open(err_path, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
        if started is not None:
            started(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(proc)
            return 124, ""
        except BaseException:
            _terminate(proc)
            raise
    return proc.returncode, out.decode("utf-8", "replace")


def _terminate(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def active_swaps(min_priority=None):
    """The devices/files in /proc/swaps (only those with at least MIN_PRIORITY, if given)."""
    out = []
    for line in read_text("/proc/swaps").splitlines()[1:]:
        f = line.split()
        if f and (min_priority is None or (len(f) >= 5 and int(f[4]) >= min_priority)):
            out.append(f[0])
    return out


class Migration:
    def __init__(self, o, umemd, kernel, directory):
        self.o, self.umemd, self.kernel, self.dir = o, umemd, kernel, directory
        self.id = os.getpid()
        self.hosts = HostPair(self.id, SRC_IP, DST_IP, o.link_rate)
        self.ramfile = "/dev/shm/umemd-vm-%d.ram" % self.id
        # the destination's RAM file in QEMU's own modes and in swap mode (staged onto the swap device)
        self.dst_ramfile = "/dev/shm/umemd-vm-%d-dst.ram" % self.id
        self.src_qemu = self.dst_qemu = self.src_export = self.proxy = self.dst_daemon = None
        self.device = None
        self.swap_device = None       # swap mode: the device once swapon may have run, until swapoff succeeded
        self.early_swapoff = None     # swap mode: (thread, holder) of the swapoff started near completion
        self.swap_devices = set()     # every device this run made swap (the leftover checks look for them)
        self.staged = None            # swap mode: the stager's STAGED report
        self.stager_pid = None        # swap mode: the stager's pid (its cgroup is named after it)
        self.outage = None            # (thread, cancel event) of --source-outage
        self.warmer = None            # (thread, dd process holder) reading the device into the page cache
        self.tailers = []
        self.no_hugepage = None
        self.counters_setup = None    # link counters when the destination setup began
        self.figures = {}             # swap mode's end of post-copy, file mode's writes after completion
        self.psk = None               # --tls: this run's pre-shared key file (identity "umemd")
        self.tls_probes = None        # --tls: what a client without the key got from the source export

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def swap(self):
        return self.o.mode == "swap"

    # ---- processes ---------------------------------------------------------------------------------
    def _proc(self, name, argv, log_name, host, pidfile=None, log_mode="wb", own_session=False):
        return Server(name, argv, pidfile, self.path(log_name), netns=host.ns, announce=False, log_mode=log_mode,
                      own_session=own_session)

    def make_psk(self):
        """--tls: a fresh pre-shared key for this migration, in psktool's format (identity:hexkey),
        readable by root only; both daemons read it (on two real hosts: copied over a secure channel)."""
        self.psk = self.path("keys.psk")
        fd = os.open(self.psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("umemd:%s\n" % os.urandom(32).hex())

    def start_export(self):
        """The source host's export of the RAM file (appends to src-export.log); with --tls, TLS is
        required with this run's pre-shared key."""
        pidfile = self.path("src-export.pid")
        tls = ["--tls", "require", "--tls-psk", self.psk] if self.psk else []
        exp = self._proc("source export", [self.umemd, "serve", "--file", self.ramfile, "--readonly", "--port",
                                           str(EXPORT_PORT), "--bind", SRC_IP, "--pidfile", pidfile] + tls,
                         "src-export.log", self.hosts.src, pidfile, log_mode="ab")
        exp.launch()
        self.src_export = exp
        if not exp.wait_listening(20):
            die("the source export did not start: %s" % tail(self.path("src-export.log"), 3))

    def probe_without_key(self):
        """--tls: from the destination host, a client with another key and a plain client must both
        be refused by the source export, and read nothing."""
        wrong = self.path("wrong.psk")
        with open(wrong, "w") as f:
            f.write("umemd:%s\n" % os.urandom(32).hex())
        probes = {}
        for name, uri in (("wrong_key", "nbds://umemd@%s:%d/?tls-psk-file=%s" % (SRC_IP, EXPORT_PORT, wrong)),
                          ("plain", "nbd://%s:%d/" % (SRC_IP, EXPORT_PORT))):
            out = self.path("probe-%s.out" % name)
            rc, _ = run_child(self.hosts.dst.cmd(["nbdcopy", uri, out]), self.path("probe-%s.log" % name), timeout=60)
            got = os.path.getsize(out) if os.path.exists(out) else 0
            probes[name] = {"exit_status": rc, "bytes_read": got, "refused": rc != 0 and got == 0,
                            "error": tail(self.path("probe-%s.log" % name), 1).strip()}
            if not probes[name]["refused"]:
                die("--tls: a client without the key read the source export (%s: exit %d, %d bytes)" % (name, rc, got))
        self.tls_probes = probes
        say("TLS: the source export refuses a wrong key and a plain client (%s)" % probes["wrong_key"]["error"])

    def stop_export(self):
        if self.src_export is not None:
            self.src_export.stop(quiet=True)
        self.src_export = None

    def stamp_console(self, console, out):
        t = vm.ConsoleStamper(self.path(console), self.path(out))
        t.start()
        self.tailers.append(t)

    def stop_tailers(self):
        while self.tailers:
            self.tailers.pop().stop()

    def script(self, name, *args):
        """scripts/NAME ARGS (attach, detach) in a session of its own; (exit status, stdout)."""
        return run_child([os.path.join(ROOT, "scripts", name)] + list(args), self.path(name + ".log"), timeout=300)

    # ---- teardown ------------------------------------------------------------------------------------
    def undo_destination(self):
        """Removes everything set up on the destination. Every part is tried even when one before it
        fails, and each is idempotent: close() runs this again after fail_before_switch, and what
        failed the first time is tried again."""
        first = None
        for step in (self.stop_warmer, self.stop_dst_qemu, self.drop_staged_ram, self.swap_off_for_undo,
                     self.detach_device, self.stop_dst_daemon, self.remove_dst_files):
            try:
                step()
            except Exception as e:
                say("undoing the destination: %s: %s" % (step.__name__, e))
                first = first or e
        if first is not None:
            raise first

    def stop_warmer(self):
        if self.warmer is not None:
            thread, holder = self.warmer
            if holder.get("proc") is not None and holder["proc"].poll() is None:
                holder["proc"].kill()
            thread.join(5)
        self.warmer = None

    def stop_dst_qemu(self):
        if self.dst_qemu is None:
            return
        timeout = 10
        if self.swap:
            # a QEMU stuck in a swap-in (at the closed gate) does not exit on SIGTERM; the destination
            # is thrown away, nothing of it is worth a longer wait
            stuck, timeout = self.unstick_swap_in, 2
        else:
            # A QEMU that ignores SIGTERM is stuck in a read of its RAM device that the daemon holds
            # (at a closed gate, or from a source that is gone): the daemon is killed too, the read
            # fails and QEMU can exit.
            stuck = self.dst_daemon.kill if self.dst_daemon is not None else None
        self.dst_qemu.stop(timeout=timeout, quiet=True, stuck=stuck)
        self.dst_qemu = None

    def unstick_swap_in(self):
        """Swap mode: the destination QEMU (SIGKILLed already) is stuck in a swap-in the daemon holds
        at its closed gate, or waiting for a source that is gone. The destination is being thrown
        away, so stale pages no longer matter: the gate opens. If QEMU is still there 60 s later,
        the daemon is killed as the last resort (the swap-in fails; swapoff may then fail too, and
        says so)."""
        proc = self.dst_qemu.proc if self.dst_qemu is not None else None
        try:
            vm.qmp.open_gate(self.path("dst.ctl"))
        except RuntimeError:
            pass
        if proc is None:
            return
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            say("the destination QEMU is still stuck 60 s after SIGKILL: killing the destination daemon")
            if self.dst_daemon is not None:
                self.dst_daemon.kill()

    def drop_staged_ram(self):
        """Swap mode, QEMU gone: the staged RAM file goes before swapoff, so its pages still on the
        device are freed without being read (swapoff would otherwise pull them from the source)."""
        if self.swap and self.dst_qemu is None and os.path.exists(self.dst_ramfile):
            os.unlink(self.dst_ramfile)

    def attached_devices(self):
        """The devices recorded in this run's state directory (scripts/attach's state files)."""
        out = []
        attached = os.path.join(os.environ["NBD_UMEMD_STATE_DIR"], "attached")
        if os.path.isdir(attached):
            for name in os.listdir(attached):
                m = re.search(r"^DEVICE=(\S+)$", read_text(os.path.join(attached, name)), re.M)
                if m:
                    out.append(m.group(1).strip("'\""))
        return out

    def swapoff(self, dev, timeout):
        """swapoff DEV (in a session of its own); (ok, ms, message). vm.page-cluster is raised to
        SWAPOFF_PAGE_CLUSTER for its duration (swapoff reads the slots one readahead window at a
        time: measured on 256 MiB from the local store, 1.13 s at the default 3, 0.40 s at 5,
        0.34 s at 7, 6.9 s at 0) and restored afterwards."""
        t = time.time()
        old = read_text("/proc/sys/vm/page-cluster").strip()
        try:
            with open("/proc/sys/vm/page-cluster", "w") as f:
                f.write("%d\n" % SWAPOFF_PAGE_CLUSTER)
            rc, _ = run_child(["swapoff", dev], self.path("swapoff.log"), timeout=timeout)
        finally:
            if old:
                with open("/proc/sys/vm/page-cluster", "w") as f:
                    f.write(old + "\n")
        ms = ms_since(t)
        if rc == 0 and dev not in active_swaps():
            return True, ms, ""
        return False, ms, "swapoff %s: status %d after %d ms: %s" % (dev, rc, ms, tail(self.path("swapoff.log"), 2))

    def swap_off_for_undo(self):
        """Every device of this run that is still swap is turned off (the daemon must still serve it:
        the kernel reads back what is on it). If that fails the daemon is left running and the error
        says what to run."""
        if self.early_swapoff is not None:
            # a swapoff already running (started before completion) finishes first
            self.early_swapoff[0].join(600)
        candidates = set(self.attached_devices()) | ({self.swap_device} if self.swap_device else set())
        on = [d for d in candidates if d in active_swaps()]
        for dev in on:
            ok, ms, msg = self.swapoff(dev, 600)
            if not ok:
                pid = self.dst_daemon.pid if self.dst_daemon is not None else "?"
                raise RuntimeError("%s; swap is STILL ON %s and its daemon (pid %s) is left running: run `swapoff %s; "
                                   "NBD_UMEMD_STATE_DIR=%s scripts/detach %s; kill %s`"
                                   % (msg, dev, pid, dev, os.environ["NBD_UMEMD_STATE_DIR"], dev, pid))
            say("swapoff %s (undo): %d ms" % (dev, ms))
        self.swap_device = None

    def detach_device(self):
        if self.swap_device is not None or any(d in active_swaps() for d in self.attached_devices()):
            return  # detach refuses a device that is swap (swap_off_for_undo has said why)
        if self.device or self.attached_devices():
            rc, _ = self.script("detach", self.device) if self.device else self.script("detach", "--all")
            if rc != 0:
                say("detach failed: %s" % tail(self.path("detach.log"), 2))
                return
        self.device = None

    def stop_dst_daemon(self):
        if self.dst_daemon is None:
            return
        if self.swap_device is not None:
            raise RuntimeError("the destination daemon (pid %s) is left running: %s is still swap on it"
                               % (self.dst_daemon.pid, self.swap_device))
        self.dst_daemon.stop(quiet=True)
        self.dst_daemon = None

    def remove_dst_files(self):
        paths = [self.path("dst.sock"), self.path("dst.ctl"), self.dst_ramfile]
        if self.dst_daemon is None:   # (a daemon left running still uses its store)
            paths.insert(0, self.path("store"))
        for p in paths:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.unlink(p)

    def stop_source(self):
        if self.outage is not None:
            thread, cancel = self.outage
            cancel.set()
            thread.join(30)
            self.outage = None
        if self.src_qemu is not None:
            try:
                vm.qmp_cmd(self.path("src.qmp"), "quit")
            except (RuntimeError, OSError):
                pass
            self.src_qemu.stop(quiet=True)
        self.src_qemu = None
        if self.proxy is not None:
            self.proxy.stop(quiet=True)
        self.proxy = None
        self.stop_export()
        if os.path.exists(self.ramfile):
            os.unlink(self.ramfile)

    def close(self):
        """Every step runs, even when one before it fails; SIGINT/SIGTERM wait until the end (see
        signals_deferred). The first exception is raised at the end."""
        first = None
        with signals_deferred():
            for step in (self.undo_destination, self.stop_source, self.stop_tailers, self.hosts.close):
                try:
                    step()
                except BaseException as e:
                    say("cleanup step %s failed: %r" % (step.__name__, e))
                    first = first or e
            try:
                left = self.leftovers()
            except Exception as e:
                left = ["(the leftover check failed: %r)" % e]
            if left:
                say("LEFT BEHIND after the cleanup: %s" % "; ".join(left))
            if first is not None:
                raise first

    def leftovers(self, vm_too=True):
        """What this run has left on the destination, one description each: the store, an attached
        device (state file, loop device, nbdfuse), a swap entry, the daemon and, with VM_TOO, the
        destination QEMU and its RAM file."""
        state = os.environ["NBD_UMEMD_STATE_DIR"]
        left = []
        if os.path.exists(self.path("store")):
            left.append("store %s" % self.path("store"))
        attached = self.attached_devices()
        if attached:
            left.append("attached (state files): %s" % " ".join(attached))
        loops = [l for l in subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                 .stdout.decode().splitlines() if state in l]
        if loops:
            left.append("loop device(s): %s" % "; ".join(loops))
        swaps = [d for d in active_swaps() if d in self.swap_devices or d in attached]
        if swaps:
            left.append("swap on %s" % " ".join(swaps))
        patterns = [("destination daemon or nbdfuse", self.path("dst.sock")), ("nbdfuse", state)]
        if vm_too:
            patterns.append(("destination QEMU", self.path("dst.qmp")))
        for what, pattern in patterns:
            res = subprocess.run(["pgrep", "-f", pattern], stdout=subprocess.PIPE)
            if res.returncode == 0:
                left.append("%s: pid %s" % (what, " ".join(res.stdout.decode().split())))
        if vm_too and os.path.exists(self.dst_ramfile):
            left.append("RAM file %s" % self.dst_ramfile)
        # the stager's temporary memory cgroup (STAGED names it: "v1 /sys/fs/cgroup/memory/nbd-umemd-stage-PID")
        cgroups = set()
        if ((self.staged or {}).get("cgroup") or "").split():
            cgroups.add(self.staged["cgroup"].split()[-1])
        if self.stager_pid is not None:
            for base in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
                cgroups.add(os.path.join(base, "nbd-umemd-stage-%d" % self.stager_pid))
        for cg in sorted(cgroups):
            if os.path.isdir(cg):
                left.append("staging cgroup %s" % cg)
        return left

    def destination_leftovers(self):
        left = self.leftovers()
        if left:
            say("left on the destination: %s" % "; ".join(left))
        return len(left)

    def fail_before_switch(self, msg):
        """A failure before the switch-over: the destination is undone, the source VM keeps running."""
        say("error before the switch-over: %s" % msg)
        with signals_deferred():
            try:
                self.undo_destination()
            except Exception as e:
                say("undoing the destination failed: %s" % e)
        if self.src_qemu is not None and self.src_qemu.alive():
            def qmp(name, **args):
                try:
                    return vm.qmp_cmd(self.path("src.qmp"), name, **args)
                except (RuntimeError, OSError):
                    return {}
            # A source still migrating: cancel the migration (the source VM resumes by itself then);
            # one whose migration completed (swap mode: the destination, started with -S, never ran)
            # is continued below.
            if (qmp("query-migrate") or {}).get("status") in ("setup", "active", "pre-switchover", "device"):
                qmp("migrate_cancel")
                for _ in range(100):
                    if (qmp("query-migrate") or {}).get("status") not in ("setup", "active", "pre-switchover", "device",
                                                                            "cancelling"):
                        break
                    time.sleep(0.1)
            source_migration = (qmp("query-migrate") or {}).get("status")
            st = qmp("query-status")
            if '"running"' not in json.dumps(st):
                qmp("cont")
            st = qmp("query-status")
            progress_ms = self.source_progress_after(time.time(), 5)
            say("the source VM is still there: %s (its migration %s; progress %s); destination removed (no daemon, "
                "device, swap, store or QEMU left)" % (json.dumps(st), source_migration,
                                                       "%d ms later" % progress_ms if progress_ms is not None else "none"))
            with open(self.path("report.json"), "w") as f:
                f.write(json.dumps({"status": "failed-before-switchover", "mode": self.o.mode, "error": msg,
                                    "source_vm": st, "source_migration": source_migration,
                                    "source_progress_after_ms": progress_ms,
                                    "destination_leftovers": self.destination_leftovers(),
                                    "swap_devices": sorted(self.swap_devices),
                                    "destination_ram_file": self.dst_ramfile}) + "\n")
        sys.stdout.write(read_text(self.path("report.json")))
        sys.stdout.flush()
        raise FailedBeforeSwitch(msg)

    def refusing_gate(self):
        """--fail-gate: a control socket that refuses every request, `gate open` after 0.5 s (the
        source has sent everything by then): stands for a destination daemon whose late-page copy
        fails. Its path."""
        path = self.path("refusing.ctl")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(4)

        def serve():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    try:
                        request = json.loads(conn.recv(65536).decode("utf-8", "replace") or "{}")
                    except ValueError:
                        request = {}
                    if request.get("command") == "gate":
                        time.sleep(0.5)
                    what = request.get("command", "request")
                    conn.sendall(b'{"ok": false, "error": "%s refused (migrate-vm --fail-gate)"}\n'
                                 % (b"gate open" if what == "gate" else what.encode()))

        threading.Thread(target=serve, daemon=True).start()
        return path

    def source_progress_after(self, t, timeout):
        """ms from T until the source guest's console shows progress (a WORK line), None if not within
        TIMEOUT s."""
        deadline = time.time() + timeout
        while True:
            later = [ts for ts, _, _, _ in work_timeline(self.path("src-timeline.log"))[0] if ts > t]
            if later:
                return int((later[0] - t) * 1000)
            if time.time() > deadline:
                return None
            time.sleep(0.1)

    # ---- the steps ----------------------------------------------------------------------------------
    def run(self):
        o = self.o
        # what this run creates outside its directory, for a cleanup after it was killed (lib.sh's
        # undo_swap_run): the RAM files and the namespaces
        with open(self.path("run.env"), "w") as f:
            f.write("SRC_RAM=%s\nDST_RAM=%s\nNETNS='%s %s'\n" % (self.ramfile, self.dst_ramfile, self.hosts.src.ns,
                                                                 self.hosts.dst.ns))
        self.hosts.setup()
        say("hosts: %s (%s) and %s (%s)%s%s" % (self.hosts.src.ns, SRC_IP, self.hosts.dst.ns, DST_IP,
                                                ", link %s" % o.link_rate if o.link_rate else "",
                                                ", +%s ms per source read" % o.link_delay if o.link_delay else ""))
        self.build_guest()
        self.start_source()
        self.start_destination()
        mig = self.migrate()
        t0 = mig["migrate_started_at"]
        if o.outage_s:
            self.start_outage()
        counters = self.counters0
        if o.mode in LAZY_MODES:
            all_local_ms, pulled = self.wait_all_local(t0)
            if o.mode == "file":
                self.start_warming()
        else:
            # QEMU's migration is complete (on the destination too, for post-copy) when `migrate` returns
            all_local_ms, pulled = int("%.0f" % mig["completed_ms"]), 0
            say("all RAM on the destination after %d ms: shutting the source down" % all_local_ms)

        def link_counters():
            return (self.hosts.tx_bytes() - counters[0], self.hosts.tx_packets() - counters[1],
                    self.hosts.tcp_retransmits() - counters[2])

        if self.swap:
            # The source is not needed any more: the link is read and the source shut down while the
            # destination lets go of its device (neither waits for the other).
            gone = {}

            def stop_source():
                gone["link"] = link_counters()
                self.stop_source()
                gone["ms"] = ms_since(t0)

            stopper = threading.Thread(target=stop_source, daemon=True)
            stopper.start()
            try:
                self.become_independent(t0)
            finally:
                stopper.join()
            if "ms" not in gone:
                die("shutting the source down failed")
            gone_ms = gone["ms"]
            link, packets, retrans = gone["link"]
        else:
            link, packets, retrans = link_counters()
            self.stop_source()
            gone_ms = ms_since(t0)
        end_ms, warm_ms, reread = self.run_without_source(t0)
        self.stop_tailers()
        r = self.report(mig, t0, all_local_ms, gone_ms, end_ms, pulled, link, reread, retrans, warm_ms, packets)
        with open(self.path("report.json"), "w") as f:
            f.write(json.dumps(r) + "\n")
        short = dict(r)
        short.pop("rates")
        say("report: %s" % json.dumps(short))
        print("REPORT %s" % json.dumps(r))

    def build_guest(self):
        with open(self.path("init"), "w") as f:
            f.write('#!/bin/sh\n. /lib/guest-init.sh\nsay "up $(awk \'/^MemTotal/ {print $2}\' /proc/meminfo) kB"\n'
                    "exec nbd-mmap work --size %dM --report-ms 250\n" % self.o.work)
        vm.guest_initramfs(self.path("initrd.gz"), self.path("init"))

    def qemu_args(self, console, mem_path):
        return vm.qemu_args(self.kernel, self.path("initrd.gz"), self.path(console), self.o.mem, mem_path)

    def start_source(self):
        o = self.o
        try:
            with open(self.ramfile, "wb") as f:
                f.truncate(o.mem << 20)
        except OSError:
            die("cannot create %s" % self.ramfile)
        args = self.qemu_args("src-console.log", self.ramfile)
        self.stamp_console("src-console.log", "src-timeline.log")
        self.src_qemu = self._proc("source QEMU", ["qemu-system-x86_64"] + args +
                                   ["-qmp", "unix:%s,server,nowait" % self.path("src.qmp")], "src-qemu.log",
                                   self.hosts.src).launch()
        console = self.path("src-console.log")
        for _ in range(1200):
            if vm.console_has(console, b"WORK t="):
                break
            if not self.src_qemu.alive():
                panic = [l for l in read_text(console).splitlines() if "Kernel panic" in l][:1]
                die("the source QEMU exited: %s%s" % (tail(self.path("src-qemu.log"), 3), "".join(panic)))
            time.sleep(0.1)
        if not vm.console_has(console, b"WORK t="):
            die("the guest's workload did not start within 120 s")
        say("source VM running (%d MiB RAM, working set %d MiB); migrating (%s) in %s s" % (o.mem, o.work, o.mode, o.run_before))
        if o.mode in LAZY_MODES:
            if o.tls:
                self.make_psk()
            self.start_export()
            self.source_uri = ("nbds://umemd@%s:%d/" if o.tls else "nbd://%s:%d") % (SRC_IP, EXPORT_PORT)
            if o.tls:
                self.probe_without_key()
            if o.link_delay:
                self.proxy = self._proc("delay proxy", [
                    "nbdkit", "--exit-with-parent", "-f", "-p", str(PROXY_PORT), "-i", SRC_IP, "--filter=delay", "nbd",
                    "hostname=" + SRC_IP, "port=%d" % EXPORT_PORT, "delay-read=%sms" % o.link_delay], "proxy.log",
                    self.hosts.src).launch()
                self.source_uri = "nbd://%s:%d" % (SRC_IP, PROXY_PORT)
                time.sleep(0.5)
        time.sleep(float(o.run_before))

    def counters(self):
        return (self.hosts.tx_bytes(), self.hosts.tx_packets(), self.hosts.tcp_retransmits())

    def start_destination(self):
        o = self.o
        self.counters_setup = self.counters()
        wrap = []
        if o.mode == "file":
            self.start_dst_daemon()
            self.attach_ram_device()
            mem_path = self.device
            if not o.thp:
                wrap = [self.no_hugepage]
            dst_ram = "daemon gated, %s" % self.device
        elif o.mode == "swap":
            self.start_dst_daemon()
            self.attach_swap_device()
            self.swap_on()
            self.stage()
            # stock QEMU on the tmpfs file: no no-hugepage wrapper (tmpfs huge pages are off here)
            mem_path = self.dst_ramfile
            st = self.staged
            dst_ram = ("daemon gated, RAM in %s: %d pages staged as swapped out to %s (%d zero pages not staged) in "
                       "%s ms" % (self.dst_ramfile, st["staged"], self.device, st["zero_pages"], st["total_ms"]))
        else:
            try:
                with open(self.dst_ramfile, "wb") as f:
                    f.truncate(o.mem << 20)
            except OSError:
                self.fail_before_switch("cannot create %s" % self.dst_ramfile)
            mem_path = self.dst_ramfile
            dst_ram = "RAM in %s" % self.dst_ramfile
        if o.fail_dest:
            mem_path = self.path("no-such-dir/ram")
        args = self.qemu_args("dst-console.log", mem_path)
        self.stamp_console("dst-console.log", "dst-timeline.log")
        self.dst_qemu = self._proc("destination QEMU", wrap + ["qemu-system-x86_64"] + args + [
            "-qmp", "unix:%s,server,nowait" % self.path("dst.qmp"), "-incoming", "tcp:%s:%d" % (DST_IP, MIG_PORT)]
            # swap mode: the destination stays paused after loading the state until the gate has opened
            + (["-S"] if self.swap else []),
            "dst-qemu.log", self.hosts.dst).launch()
        for _ in range(100):
            if self.qmp_answers("dst.qmp"):
                break
            if not self.dst_qemu.alive():
                self.fail_before_switch("the destination QEMU exited: %s" % tail(self.path("dst-qemu.log"), 2))
            time.sleep(0.1)
        if not self.qmp_answers("dst.qmp"):
            self.fail_before_switch("the destination QEMU does not answer QMP")
        say("destination ready: %s, QEMU waiting for the incoming migration" % dst_ram)

    def start_dst_daemon(self):
        """The destination's nbd-umemd: a lazy export of the source (file mode), or a swap export of
        MEM + 64 MiB whose slots map to source pages (swap mode; --swap: its memory locked, so it
        never waits on the reclaim it serves). In swap mode it runs in a session of its own: a
        Ctrl-C must not stop it before swapoff has read back what is on its device."""
        o = self.o
        pidfile = self.path("dst.pid")
        args = [self.umemd, "serve", "--source", self.source_uri, "--store", self.path("store"), "--reset-store"]
        if self.psk:
            args += ["--source-tls-psk", self.psk]
        if self.swap:
            args += ["--swap-size", "%dM" % (o.mem + SWAP_HEADROOM_MIB), "--gated", "--swap"]
        elif not o.ungated:
            args += ["--gated"]
        args += ["--prefetch", o.prefetch, "--control", self.path("dst.ctl"), "--unix", self.path("dst.sock"),
                 "--pidfile", pidfile] + o.dest_args.split()
        with open(self.path("dst-daemon.cmd"), "w") as f:
            f.write(" ".join(args) + "\n")
        self.dst_daemon = self._proc("destination daemon", args, "dst-daemon.log", self.hosts.dst, pidfile,
                                     own_session=self.swap).launch()
        if not self.dst_daemon.wait_listening(30):
            self.fail_before_switch("the destination daemon did not start: %s" % tail(self.path("dst-daemon.log"), 3))

    def attach_ram_device(self):
        """File mode: the export as a block device (read-ahead --read-ahead KiB) for QEMU's mem-path."""
        rc, out = self.script("attach", "--unix", self.path("dst.sock"), "--read-ahead", str(self.o.read_ahead))
        if rc != 0:
            self.fail_before_switch("attach failed: %s" % tail(self.path("attach.log"), 2))
        self.device = out.strip()

    def attach_swap_device(self):
        """Swap mode: the swap export as a block device (scripts/attach --swap: locked nbdfuse + loop
        here, or nbd-client -swap)."""
        rc, out = self.script("attach", "--swap", "--unix", self.path("dst.sock"))
        if rc != 0 or not out.strip().startswith("/dev/"):
            self.fail_before_switch("attach --swap failed: %s" % tail(self.path("attach.log"), 2))
        self.device = out.strip()

    def check_top_priority(self, dev):
        """Staging needs the kernel to swap out to DEV alone: another active swap device at the same
        (top) priority would get every other page (the kernel uses same-priority devices in turn),
        e.g. a second swap-mode run on this machine."""
        others = [d for d in active_swaps(SWAP_PRIORITY) if d != dev]
        if others:
            self.fail_before_switch("another swap device is active at priority %d (%s): swap-mode staging needs "
                                    "to be alone at the top priority (one swap-mode migration per machine at a time)"
                                    % (SWAP_PRIORITY, " ".join(others)))

    def swap_on(self):
        """mkswap and swapon -p 32767 on the device (from here on every exit path turns it off)."""
        dev = self.device
        self.check_top_priority(dev)
        rc, _ = run_child(["mkswap", dev], self.path("swapon.log"), timeout=120)
        if rc != 0:
            self.fail_before_switch("mkswap %s failed: %s" % (dev, tail(self.path("swapon.log"), 2)))
        self.swap_device = dev
        self.swap_devices.add(dev)
        rc, _ = run_child(["swapon", "-p", str(SWAP_PRIORITY), dev], self.path("swapon.log"), timeout=120)
        if rc != 0 or dev not in active_swaps():
            self.fail_before_switch("swapon -p %d %s failed: %s" % (SWAP_PRIORITY, dev, tail(self.path("swapon.log"), 2)))
        say("swap on %s, priority %d (%d MiB)" % (dev, SWAP_PRIORITY, self.o.mem + SWAP_HEADROOM_MIB))

    def stage(self):
        """nbd-umemd stage: creates the destination's RAM file and stages every non-zero page of it as
        swapped out to a slot the daemon maps to the source page (its STAGED line has the phases).
        Run outside the destination's network namespace: `ip netns exec` mounts a /sys of its own,
        without the cgroup file systems the stager needs; it only talks to the control socket."""
        ctl = self.path("dst.ctl")
        self.check_top_priority(self.device)
        t = time.time()
        rc, out = run_child([self.umemd, "stage", "--ram", self.dst_ramfile, "--control", ctl, "--device", self.device],
                            self.path("stage.log"), timeout=900, started=lambda p: setattr(self, "stager_pid", p.pid))
        wall = ms_since(t)
        with open(self.path("stage.out"), "w") as f:
            f.write(out)
        lines = [l[len("STAGED "):] for l in out.splitlines() if l.startswith("STAGED ")]
        if rc != 0 or not lines:
            self.fail_before_switch("staging failed (status %d): %s" % (rc, tail(self.path("stage.log"), 3)))
        try:
            st = json.loads(lines[-1])
        except ValueError:
            self.fail_before_switch("staging printed an unreadable STAGED line: %s" % lines[-1])
        st["wall_ms"] = wall
        pages = (self.o.mem << 20) // PAGE
        status = self.status()
        problems = []
        if st.get("pages") != pages:
            problems.append("%s pages in the RAM file, expected %d" % (st.get("pages"), pages))
        if (st.get("staged") or 0) + (st.get("zero_pages") or 0) != st.get("pages"):
            problems.append("staged %s + zero %s != pages %s" % (st.get("staged"), st.get("zero_pages"), st.get("pages")))
        if status.get("staging") != "sealed":
            problems.append("the daemon's staging is %r, not sealed" % status.get("staging"))
        if status.get("staged_slots") != st.get("staged"):
            problems.append("the daemon decoded %s markers, the stager staged %s" % (status.get("staged_slots"),
                                                                                     st.get("staged")))
        if status.get("duplicate_markers"):
            problems.append("%s duplicate markers" % status.get("duplicate_markers"))
        if problems:
            self.fail_before_switch("staging check failed: %s" % "; ".join(problems))
        self.staged = st
        say("staged: %s (the daemon maps %s slots)" % (json.dumps(st), status.get("mapped_slots")))

    def qmp_answers(self, sock):
        try:
            vm.qmp_cmd(self.path(sock), "query-status", timeout=0.5)
            return True
        except (RuntimeError, OSError):
            return False

    def migrate(self):
        o = self.o
        gate = None
        params = None
        postcopy = resume = False
        if o.mode == "file":
            say("migrating (x-ignore-shared; the gate opens on the source's STOP)")
            caps = ["x-ignore-shared"]
            if not o.ungated:
                gate = self.path("dst.ctl")
        elif o.mode == "swap":
            say("migrating (x-ignore-shared; on the source's STOP the gate opens while the device state "
                "goes over, then `cont` starts the destination)")
            caps, gate, resume = ["x-ignore-shared"], self.path("dst.ctl"), True
            if o.fail_gate:
                gate = self.refusing_gate()
        elif o.mode == "precopy":
            say("migrating (QEMU precopy, auto-converge)")
            caps, params = ["auto-converge"], FAST
        else:
            say("migrating (QEMU postcopy-ram, switched to post-copy at once)")
            caps, params, postcopy = ["postcopy-ram"], FAST, True
        self.counters0 = self.counters()
        try:
            report = vm.qmp.migrate(self.path("src.qmp"), self.path("dst.qmp"), "tcp:%s:%d" % (DST_IP, MIG_PORT), gate,
                                    caps, postcopy, params, resume_destination=resume)
        except (RuntimeError, OSError) as e:
            report = {"status": "error", "error": str(e)}
        text = json.dumps(report)
        with open(self.path("migrate.json"), "w") as f:
            f.write(text + "\n")
        if report.get("status") != "completed":
            self.fail_before_switch("migration failed: %s" % text)
        say("switched over: %s" % text)
        return report

    def start_outage(self):
        o = self.o
        cancel = threading.Event()

        def outage():
            if cancel.wait(o.outage_at):
                return
            say("source outage: killing the source export for %s s" % o.outage_s)
            self.src_export.kill()
            self.src_export.proc.wait()
            if cancel.wait(float(o.outage_s)):
                return
            self.start_export()
            say("source export restarted")

        t = threading.Thread(target=outage, daemon=True)
        t.start()
        self.outage = (t, cancel)

    def status(self, keep="dst-status.json"):
        """The destination daemon's status (also kept in DIR/KEEP); {} if it does not answer. Asked on
        the control socket directly (no process to start: the polls time the completion)."""
        try:
            reply = vm.qmp.control(self.path("dst.ctl"), {"command": "status"})
            out = json.dumps(reply).encode() if reply.get("ok") is True else b""
        except (OSError, ValueError):
            out = b""
        with open(self.path(keep), "wb") as f:
            f.write(out)
        try:
            return json.loads(out)
        except ValueError:
            return {}

    def wait_all_local(self, t0):
        """Post-copy: until the destination daemon reports every page (swap mode: every mapped slot)
        local. Returns (ms since t0, bytes pulled)."""
        st = {}
        deadline = time.time() + 600
        while time.time() < deadline:
            st = self.status()
            eta = st.get("eta_seconds")
            if self.swap and self.early_swapoff is None and (
                    st.get("complete") is True or (eta is not None and eta <= SWAPOFF_LEAD_S)):
                self.start_swapoff()
            if st.get("complete") is True:
                break
            if not self.dst_qemu.alive():
                die("the destination QEMU died during post-copy: %s" % tail(self.path("dst-qemu.log"), 3))
            time.sleep(0.02)
        if st.get("complete") is not True:
            die("not every page was local after 600 s: %s" % json.dumps(st, separators=(",", ":")))
        all_local = ms_since(t0)
        shutil.copy(self.path("dst-status.json"), self.path("dst-status-complete.json"))  # the report's demand-miss figures
        if self.outage is not None:
            self.outage[0].join()
            self.outage = None
        pulled = st.get("bytes_pulled", 0)
        say("every page local after %d ms (%d bytes pulled): shutting the source down" % (all_local, pulled))
        return all_local, pulled

    def start_warming(self):
        """File mode: every page is in the store now, but the guest still faults each page it has not
        touched yet through the device (one read-ahead window each). Reading the device once puts
        all of it in the page cache QEMU's mapping shares, so from then on those faults need no I/O."""
        holder = {}

        def warm():
            t = time.time()
            with open(self.path("warm.log"), "wb") as err:
                holder["proc"] = subprocess.Popen(["dd", "if=" + self.device, "of=/dev/null", "bs=4M", "status=none"],
                                                  stderr=err)
                holder["rc"] = holder["proc"].wait()
            if holder["rc"] == 0:
                holder["ms"] = ms_since(t)

        thread = threading.Thread(target=warm, daemon=True)
        thread.start()
        self.warmer = (thread, holder)

    def start_swapoff(self):
        """Swap mode: swapoff starts in the background once the pull is expected to end within
        SWAPOFF_LEAD_S; the slots it reads that are still absent are pulled on demand, so the device
        is released about when the last page arrives instead of a whole swapoff later. (A fixed share
        of the pull, half, started it 3 s before the end at 200 Mbit/s, its reads competing with the
        guest's faults all that time.)"""
        holder = {"t": time.time()}

        def run():
            holder["result"] = self.swapoff(self.device, 600)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.early_swapoff = (thread, holder)
        say("swapoff %s started" % self.device)

    def become_independent(self, t0):
        """Swap mode, every slot local and the source shut down: swapoff (the kernel reads the slots
        still swapped out, from the local store), detach, the daemon stopped, the store removed.
        The VM then runs on the plain tmpfs RAM file. Checks that nothing of the destination's
        machinery is left and keeps the figures for the report."""
        fig = self.figures
        dev = self.device
        complete = self.read_json("dst-status-complete.json")
        if self.early_swapoff is None:
            self.start_swapoff()
        thread, holder = self.early_swapoff
        thread.join()
        ok, fig["swapoff_ms"], msg = holder["result"]
        fig["swapoff_started_ms"] = int((holder["t"] - t0) * 1000)
        if not ok:
            die(msg)
        self.swap_device = None
        say("swapoff %s: %d ms" % (dev, fig["swapoff_ms"]))
        t = time.time()
        rc, _ = self.script("detach", dev)
        if rc != 0:
            die("detach %s failed: %s" % (dev, tail(self.path("detach.log"), 2)))
        self.device = None
        fig["detach_ms"] = ms_since(t)
        final = self.status("dst-status-stop.json")
        if not final:
            die("the destination daemon did not answer before its stop")
        t = time.time()
        fig["daemon_exit_status"] = self.dst_daemon.stop(quiet=True)
        self.dst_daemon = None
        fig["daemon_stop_ms"] = ms_since(t)
        if fig["daemon_exit_status"] != 0:
            say("WARNING: the destination daemon exited with status %s after SIGTERM" % fig["daemon_exit_status"])
        shutil.rmtree(self.path("store"), ignore_errors=True)
        for p in (self.path("dst.sock"), self.path("dst.ctl")):
            if os.path.lexists(p):
                os.unlink(p)
        fig["independent_ms"] = ms_since(t0)
        left = self.leftovers(vm_too=False)
        fig["leftovers_after_independent"] = len(left)
        fig["leftovers_after_independent_list"] = left
        # NBD writes from completion until the daemon stopped (swap-outs of anything reclaimed to
        # the device meanwhile); after that there is no daemon, device or store to write to.
        for key in ("writes", "bytes_written"):
            a, b = complete.get(key), final.get(key)
            fig["daemon_%s_at_complete" % key] = a
            fig["daemon_%s_at_stop" % key] = b
            fig["%s_after_complete" % key] = b - a if a is not None and b is not None else None
        fig["writes_after_complete_basis"] = (
            "daemon status writes/bytes_written at completion and just before its stop (after swapoff and "
            "detach); the daemon, device and store are gone from independent_ms on")
        say("independent of the destination daemon after %d ms: swapoff %d ms, detach %d ms, daemon stop %d ms, %s; "
            "%d NBD writes (%s bytes) from completion until the daemon stopped"
            % (fig["independent_ms"], fig["swapoff_ms"], fig["detach_ms"], fig["daemon_stop_ms"],
                                                     "nothing left" if not left else "LEFT: " + "; ".join(left),
                                                     fig["writes_after_complete"] or 0,
                                                     fig["bytes_written_after_complete"] or 0))

    def read_json(self, name):
        try:
            with open(self.path(name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def run_without_source(self, t0):
        """The VM runs on with no source for --keep s; then (file mode) the daemon's writes since
        completion are read, and all RAM is re-read with the page cache dropped. Returns (ms since t0
        at the end, warm-up ms or None, reread True/False/None)."""
        o = self.o
        time.sleep(float(o.keep))
        if not self.dst_qemu.alive():
            die("the destination QEMU died after the source was gone")
        end = ms_since(t0)
        if o.mode == "file":
            complete, now = self.read_json("dst-status-complete.json"), self.status("dst-status-end.json")
            for key in ("writes", "bytes_written"):
                a, b = complete.get(key), now.get(key)
                self.figures["daemon_%s_at_complete" % key] = a
                self.figures["daemon_%s_at_end" % key] = b
                self.figures["%s_after_complete" % key] = b - a if a is not None and b is not None else None
            self.figures["writes_after_complete_basis"] = ("daemon status writes/bytes_written at completion and at "
                                                           "the end of --keep")
        warm_ms = None
        if self.warmer is not None:
            thread, holder = self.warmer
            thread.join()
            self.warmer = None
            if holder.get("rc") != 0:
                die("reading the device into the page cache failed: %s" % read_text(self.path("warm.log")).strip())
            warm_ms = holder["ms"]
        reread = None
        if o.mode == "file":
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            before = self.status().get("bytes_pulled")
            reread = False
            with open(self.path("reread.log"), "wb") as err:
                rc = subprocess.run(["timeout", "120", "nbdcopy", "nbd+unix:///?socket=" + self.path("dst.sock"), "null:"],
                                    stderr=err).returncode
            if rc == 0:
                reread = self.status().get("bytes_pulled") == before
        return end, warm_ms, reread

    # ---- report --------------------------------------------------------------------------------------
    def report(self, m, t0, all_local, gone, end, pulled, link, reread, retransmits, warm, packets):
        st = self.read_json("dst-status-complete.json")
        fig = self.figures
        def timeline(path):
            """(seconds since migrate, ops, rate, errors) of each WORK line; and the WORK-ERROR count"""
            lines, bad = work_timeline(path)
            return [(ts - t0, ops, rate, err) for ts, ops, rate, err in lines], bad

        src, src_bad = timeline(self.path("src-timeline.log"))
        dst, dst_bad = timeline(self.path("dst-timeline.log"))
        errors = src_bad + dst_bad + max([e for _, _, _, e in src + dst] + [0])
        stop = (m.get("source_stop_ms") or 0) / 1000.0
        # The guest's progress over time: the source until it stopped, then the destination. Its
        # operation count carries over with the migrated state, so the count at time t is the highest
        # one shown by t.
        lines = sorted([p for p in src if p[0] <= stop] + dst)

        def ops_at(t):
            return max([ops for ts, ops, _, _ in lines if ts <= t] + [0])

        def rate(a, b):
            return round((ops_at(b) - ops_at(a)) / (b - a)) if b is not None and b > a else None

        first = dst[0][0] if dst else None
        marks = [0.0] + [ts for ts, _, _, _ in dst]
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        stream = m.get("qemu_ram_transferred_bytes") or 0
        # When the VM depends on nothing but its own QEMU: swap mode after the teardown; QEMU's modes
        # once the source is shut down; file mode never (the daemon and device stay under its RAM).
        independent = fig.get("independent_ms") if self.swap else gone if self.o.mode in ("precopy", "postcopy") else None
        staged = self.staged or {}
        setup_link = self.counters0[0] - self.counters_setup[0] if self.counters_setup else None
        return {
            "status": "completed",
            "mode": self.o.mode,
            "downtime_ms": m.get("qemu_downtime_ms"),
            "qemu_total_time_ms": m.get("qemu_total_time_ms"),
            "source_stop_ms": m.get("source_stop_ms"),
            "gate_open_ms": m.get("gate_open_ms"),
            "late_pages": m.get("late_pages"),
            "destination_continue_ms": m.get("continue_ms"),
            "guest_downtime_ms": m.get("guest_downtime_ms"),
            "destination_resume_ms": m.get("destination_resume_ms"),
            "first_progress_on_destination_ms": round(first * 1000, 1) if first is not None else None,
            "all_ram_local_ms": all_local,
            "source_gone_ms": gone,
            "swapoff_ms": fig.get("swapoff_ms"),
            "swapoff_started_ms": fig.get("swapoff_started_ms"),
            "detach_ms": fig.get("detach_ms"),
            "daemon_stop_ms": fig.get("daemon_stop_ms"),
            "swap_device": sorted(self.swap_devices)[0] if self.swap_devices else None,
            "destination_ram_file": self.dst_ramfile if self.o.mode != "file" else None,
            "independent_ms": independent,
            "leftovers_after_independent": fig.get("leftovers_after_independent"),
            "staging_ms": staged.get("total_ms"),
            "staging_phases_ms": {k[:-3]: v for k, v in staged.items()
                                  if k.endswith("_ms") and k not in ("total_ms", "wall_ms")} or None,
            "staging_wall_ms": staged.get("wall_ms"),
            "staged_pages": staged.get("staged"),
            "staged_zero_pages": staged.get("zero_pages"),
            "bytes_sent": stream + pulled,
            "link_bytes": link,
            "link_bytes_destination_setup": setup_link,
            "link_packets": packets,
            "tcp_retransmits": retransmits,
            "migration_stream_bytes": stream,
            "pulled_bytes": pulled,
            "demand_misses": st.get("demand_misses"),
            "miss_latency_p50_us": st.get("miss_latency_p50_us"),
            "miss_latency_p99_us": st.get("miss_latency_p99_us"),
            "background_bytes": st.get("background_bytes"),
            "writes_after_complete": fig.get("writes_after_complete"),
            "bytes_written_after_complete": fig.get("bytes_written_after_complete"),
            "writes_after_complete_window_s": round((end - all_local) / 1000.0, 1) if self.o.mode in LAZY_MODES else None,
            "writes_after_complete_basis": fig.get("writes_after_complete_basis"),
            "daemon_writes": {k: v for k, v in fig.items() if k.startswith(("daemon_writes", "daemon_bytes"))} or None,
            "daemon_exit_status": fig.get("daemon_exit_status"),
            "page_cache_warm_ms": warm,
            "rate_before_ops": rate(-2.0, 0.0),
            "rate_during_ops": rate(0.0, all_local / 1000.0),
            "rate_after_ops": rate(gone / 1000.0, end / 1000.0),
            "rate_after_independent_ops": rate(independent / 1000.0, end / 1000.0) if independent is not None else None,
            "ops_after_source_gone": ops_at(end / 1000.0) - ops_at(gone / 1000.0),
            "seconds_run_after_source_gone": round(dst[-1][0] - gone / 1000.0, 1) if dst else 0,
            "ops_after_independent": ops_at(end / 1000.0) - ops_at(independent / 1000.0) if independent is not None else None,
            "seconds_run_after_independent": (round(dst[-1][0] - independent / 1000.0, 1) if dst else 0)
            if independent is not None else None,
            "max_progress_gap_ms": round(max(gaps) * 1000) if gaps else None,
            "reread_without_source": reread,
            "data_errors": errors,
            "tls": {"psk_identity": "umemd", "probes_without_key": self.tls_probes} if self.psk else None,
            "leftovers_after_independent_list": fig.get("leftovers_after_independent_list"),
            "rates": [[round(ts, 3), rt] for ts, _, rt, _ in lines if ts >= -5.0],
        }


def ms_since(t):
    return int("%.0f" % ((time.time() - t) * 1000))
