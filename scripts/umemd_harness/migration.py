"""Live migration of the test VM between two hosts (network namespaces), the orchestration behind
scripts/migrate-vm:

  source host (netns, 10.200.0.1)         destination host (netns, 10.200.0.2)
    QEMU, RAM = memory-backend-file           nbd-umemd serve --source nbd://10.200.0.1 --gated
      share=on on /dev/shm/RAMFILE            scripts/attach -> block device
    nbd-umemd serve --file RAMFILE            QEMU -incoming, RAM = memory-backend-file on the device
      --readonly (+ nbdkit delay proxy)

Each step is a method of Migration, in the order run() calls them; each checks its result. A failure
before the switch-over (fail_before_switch) leaves the source VM running and removes what was set up
on the destination; close() undoes everything on every exit path. The report (report()) is the JSON
migrate-vm prints as its REPORT line.
"""
import json
import os
import re
import shutil
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


def say(msg):
    log(msg)


class FailedBeforeSwitch(Exception):
    """Raised after fail_before_switch has undone the destination: migrate-vm exits 1."""


class Migration:
    def __init__(self, o, umemd, kernel, directory):
        self.o, self.umemd, self.kernel, self.dir = o, umemd, kernel, directory
        self.id = os.getpid()
        self.hosts = HostPair(self.id, SRC_IP, DST_IP, o.link_rate)
        self.ramfile = "/dev/shm/umemd-vm-%d.ram" % self.id
        self.dst_ramfile = "/dev/shm/umemd-vm-%d-dst.ram" % self.id   # the destination's RAM in QEMU's own modes
        self.src_qemu = self.dst_qemu = self.src_export = self.proxy = self.dst_daemon = None
        self.device = None
        self.outage = None            # (thread, cancel event) of --source-outage
        self.warmer = None            # (thread, dd process holder) reading the device into the page cache
        self.tailers = []
        self.no_hugepage = None

    def path(self, name):
        return os.path.join(self.dir, name)

    # ---- processes ---------------------------------------------------------------------------------
    def _proc(self, name, argv, log_name, host, pidfile=None, log_mode="wb"):
        return Server(name, argv, pidfile, self.path(log_name), netns=host.ns, announce=False, log_mode=log_mode)

    def start_export(self):
        """The source host's export of the RAM file (appends to src-export.log)."""
        pidfile = self.path("src-export.pid")
        exp = self._proc("source export", [self.umemd, "serve", "--file", self.ramfile, "--readonly", "--port",
                                           str(EXPORT_PORT), "--bind", SRC_IP, "--pidfile", pidfile],
                         "src-export.log", self.hosts.src, pidfile, log_mode="ab")
        exp.launch()
        self.src_export = exp
        if not exp.wait_listening(20):
            die("the source export did not start: %s" % tail(self.path("src-export.log"), 3))

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

    # ---- teardown ------------------------------------------------------------------------------------
    def undo_destination(self):
        if self.warmer is not None:
            thread, holder = self.warmer
            if holder.get("proc") is not None and holder["proc"].poll() is None:
                holder["proc"].kill()
            thread.join(5)
        self.warmer = None
        if self.dst_qemu is not None:
            # A QEMU that ignores SIGTERM is stuck in a read of its RAM device that the daemon holds
            # (at a closed gate, or from a source that is gone): the daemon is killed too, the read
            # fails and QEMU can exit.
            self.dst_qemu.stop(quiet=True, stuck=self.dst_daemon.kill if self.dst_daemon is not None else None)
        self.dst_qemu = None
        if self.device:
            subprocess.run([os.path.join(ROOT, "scripts", "detach"), self.device], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            self.device = None
        if self.dst_daemon is not None:
            self.dst_daemon.stop(quiet=True)
        self.dst_daemon = None
        for p in (self.path("store"), self.path("dst.sock"), self.path("dst.ctl"), self.dst_ramfile):
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
        """Every step runs, even when one before it fails or a signal interrupts it; the first such
        exception is raised at the end."""
        first = None
        for step in (self.undo_destination, self.stop_source, self.stop_tailers, self.hosts.close):
            try:
                step()
            except BaseException as e:   # SystemExit from SIGTERM/SIGINT too: finish cleaning up first
                say("cleanup step %s failed: %r" % (step.__name__, e))
                first = first or e
        if first is not None:
            raise first

    def destination_leftovers(self):
        n = 0
        n += os.path.exists(self.path("store"))
        attached = os.path.join(os.environ["NBD_UMEMD_STATE_DIR"], "attached")
        n += bool(os.path.isdir(attached) and os.listdir(attached))
        for pattern in (self.path("dst.sock"), self.path("dst.qmp")):
            n += subprocess.run(["pgrep", "-f", pattern], stdout=subprocess.DEVNULL).returncode == 0
        n += os.path.exists(self.dst_ramfile)
        return n

    def fail_before_switch(self, msg):
        """A failure before the switch-over: the destination is undone, the source VM keeps running."""
        say("error before the switch-over: %s" % msg)
        self.undo_destination()
        if self.src_qemu is not None and self.src_qemu.alive():
            def status():
                try:
                    return vm.qmp_cmd(self.path("src.qmp"), "query-status")
                except (RuntimeError, OSError):
                    return {}
            st = status()
            if '"running"' not in json.dumps(st):
                try:
                    vm.qmp_cmd(self.path("src.qmp"), "cont")
                except (RuntimeError, OSError):
                    pass
            st = status()
            say("the source VM is still there: %s; destination removed (no daemon, device, store or QEMU left)"
                % json.dumps(st))
            with open(self.path("report.json"), "w") as f:
                f.write(json.dumps({"status": "failed-before-switchover", "error": msg, "source_vm": st,
                                    "destination_leftovers": self.destination_leftovers()}) + "\n")
        sys.stdout.write(read_text(self.path("report.json")))
        sys.stdout.flush()
        raise FailedBeforeSwitch(msg)

    # ---- the steps ----------------------------------------------------------------------------------
    def run(self):
        o = self.o
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
        if o.mode == "umemd":
            all_local_ms, pulled = self.wait_all_local(t0)
        else:
            # QEMU's migration is complete (on the destination too, for post-copy) when `migrate` returns
            all_local_ms, pulled = int("%.0f" % mig["completed_ms"]), 0
            say("all RAM on the destination after %d ms: shutting the source down" % all_local_ms)
        link = self.hosts.tx_bytes() - counters[0]
        packets = self.hosts.tx_packets() - counters[1]
        retrans = self.hosts.tcp_retransmits() - counters[2]
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
        if o.mode == "umemd":
            self.start_export()
            self.source_uri = "nbd://%s:%d" % (SRC_IP, EXPORT_PORT)
            if o.link_delay:
                self.proxy = self._proc("delay proxy", [
                    "nbdkit", "--exit-with-parent", "-f", "-p", str(PROXY_PORT), "-i", SRC_IP, "--filter=delay", "nbd",
                    "hostname=" + SRC_IP, "port=%d" % EXPORT_PORT, "delay-read=%sms" % o.link_delay], "proxy.log",
                    self.hosts.src).launch()
                self.source_uri = "nbd://%s:%d" % (SRC_IP, PROXY_PORT)
                time.sleep(0.5)
        time.sleep(float(o.run_before))

    def start_destination(self):
        o = self.o
        wrap = []
        if o.mode == "umemd":
            gate = [] if o.ungated else ["--gated"]
            pidfile = self.path("dst.pid")
            self.dst_daemon = self._proc("destination daemon", [
                self.umemd, "serve", "--source", self.source_uri, "--store", self.path("store"), "--reset-store"] + gate +
                ["--prefetch", o.prefetch, "--control", self.path("dst.ctl"), "--unix", self.path("dst.sock"),
                 "--pidfile", pidfile] + o.dest_args.split(), "dst-daemon.log", self.hosts.dst, pidfile).launch()
            if not self.dst_daemon.wait_listening(30):
                self.fail_before_switch("the destination daemon did not start: %s" % tail(self.path("dst-daemon.log"), 3))
            with open(self.path("attach.log"), "wb") as err:
                res = subprocess.run([os.path.join(ROOT, "scripts", "attach"), "--unix", self.path("dst.sock"),
                                      "--read-ahead", str(o.read_ahead)], stdout=subprocess.PIPE, stderr=err)
            if res.returncode != 0:
                self.fail_before_switch("attach failed: %s" % tail(self.path("attach.log"), 2))
            self.device = res.stdout.decode().strip()
            mem_path = self.device
            if not o.thp:
                wrap = [self.no_hugepage]
            dst_ram = "daemon gated, %s" % self.device
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
            "-qmp", "unix:%s,server,nowait" % self.path("dst.qmp"), "-incoming", "tcp:%s:%d" % (DST_IP, MIG_PORT)],
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
        postcopy = False
        if o.mode == "umemd":
            say("migrating (x-ignore-shared; the gate opens on the source's STOP)")
            caps = ["x-ignore-shared"]
            if not o.ungated:
                gate = self.path("dst.ctl")
        elif o.mode == "precopy":
            say("migrating (QEMU precopy, auto-converge)")
            caps, params = ["auto-converge"], FAST
        else:
            say("migrating (QEMU postcopy-ram, switched to post-copy at once)")
            caps, params, postcopy = ["postcopy-ram"], FAST, True
        self.counters0 = (self.hosts.tx_bytes(), self.hosts.tx_packets(), self.hosts.tcp_retransmits())
        try:
            report = vm.qmp.migrate(self.path("src.qmp"), self.path("dst.qmp"), "tcp:%s:%d" % (DST_IP, MIG_PORT), gate,
                                    caps, postcopy, params)
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

    def status(self):
        """The destination daemon's status (also kept in DIR/dst-status.json); {} if it does not answer."""
        res = subprocess.run([self.umemd, "status", "--control", self.path("dst.ctl")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        out = res.stdout if res.returncode == 0 else b""
        with open(self.path("dst-status.json"), "wb") as f:
            f.write(out)
        try:
            return json.loads(out)
        except ValueError:
            return {}

    def wait_all_local(self, t0):
        """Post-copy: until the destination daemon reports every page local; then the device is read
        once in the background. Returns (ms since t0, bytes pulled)."""
        st = {}
        for _ in range(6000):
            st = self.status()
            if st.get("complete") is True:
                break
            if not self.dst_qemu.alive():
                die("the destination QEMU died during post-copy: %s" % tail(self.path("dst-qemu.log"), 3))
            time.sleep(0.1)
        if st.get("complete") is not True:
            die("not every page was local after 600 s: %s" % json.dumps(st, separators=(",", ":")))
        all_local = ms_since(t0)
        shutil.copy(self.path("dst-status.json"), self.path("dst-status-complete.json"))  # the report's demand-miss figures
        if self.outage is not None:
            self.outage[0].join()
            self.outage = None
        pulled = st.get("bytes_pulled", 0)
        say("every page local after %d ms (%d bytes pulled): shutting the source down" % (all_local, pulled))
        # Every page is in the store now, but the guest still faults each page it has not touched yet
        # through the device (one read-ahead window each). Reading the device once puts all of it in
        # the page cache QEMU's mapping shares, so from then on those faults need no I/O.
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
        return all_local, pulled

    def run_without_source(self, t0):
        """The VM runs on with no source for --keep s; then (umemd) all RAM is re-read with the page
        cache dropped. Returns (ms since t0 at the end, warm-up ms or None, reread True/False/None)."""
        o = self.o
        time.sleep(float(o.keep))
        if not self.dst_qemu.alive():
            die("the destination QEMU died after the source was gone")
        end = ms_since(t0)
        warm_ms = None
        if self.warmer is not None:
            thread, holder = self.warmer
            thread.join()
            self.warmer = None
            if holder.get("rc") != 0:
                die("reading the device into the page cache failed: %s" % read_text(self.path("warm.log")).strip())
            warm_ms = holder["ms"]
        reread = None
        if o.mode == "umemd":
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
        try:
            with open(self.path("dst-status-complete.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {}
        work = re.compile(r"WORK t=([0-9.]+) ops=([0-9]+) rate=([0-9]+) errors=([0-9]+)")

        def timeline(path):
            """(seconds since migrate, ops, rate, errors) of each WORK line; and the WORK-ERROR count"""
            out, bad = [], 0
            for raw in read_text(path).splitlines():
                ts, _, rest = raw.partition(" ")
                bad += "WORK-ERROR" in rest
                x = work.search(rest)
                if x:
                    out.append((float(ts) - t0, int(x.group(2)), int(x.group(3)), int(x.group(4))))
            return out, bad

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
            return round((ops_at(b) - ops_at(a)) / (b - a)) if b > a else None

        first = dst[0][0] if dst else None
        marks = [0.0] + [ts for ts, _, _, _ in dst]
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        stream = m.get("qemu_ram_transferred_bytes") or 0
        return {
            "status": "completed",
            "mode": self.o.mode,
            "downtime_ms": m.get("qemu_downtime_ms"),
            "qemu_total_time_ms": m.get("qemu_total_time_ms"),
            "source_stop_ms": m.get("source_stop_ms"),
            "gate_open_ms": m.get("gate_open_ms"),
            "destination_resume_ms": m.get("destination_resume_ms"),
            "first_progress_on_destination_ms": round(first * 1000, 1) if first is not None else None,
            "all_ram_local_ms": all_local,
            "source_gone_ms": gone,
            "bytes_sent": stream + pulled,
            "link_bytes": link,
            "link_packets": packets,
            "tcp_retransmits": retransmits,
            "migration_stream_bytes": stream,
            "pulled_bytes": pulled,
            "demand_misses": st.get("demand_misses"),
            "miss_latency_p50_us": st.get("miss_latency_p50_us"),
            "miss_latency_p99_us": st.get("miss_latency_p99_us"),
            "background_bytes": st.get("background_bytes"),
            "page_cache_warm_ms": warm,
            "rate_before_ops": rate(-2.0, 0.0),
            "rate_during_ops": rate(0.0, all_local / 1000.0),
            "rate_after_ops": rate(gone / 1000.0, end / 1000.0),
            "ops_after_source_gone": ops_at(end / 1000.0) - ops_at(gone / 1000.0),
            "seconds_run_after_source_gone": round(dst[-1][0] - gone / 1000.0, 1) if dst else 0,
            "max_progress_gap_ms": round(max(gaps) * 1000) if gaps else None,
            "reread_without_source": reread,
            "data_errors": errors,
            "rates": [[round(ts, 3), rt] for ts, _, rt, _ in lines if ts >= -5.0],
        }


def ms_since(t):
    return int("%.0f" % ((time.time() - t) * 1000))
