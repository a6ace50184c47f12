"""scripts/bench --suite swap: remote memory as swap, nbd-umemd against the servers people would
otherwise point their swap at, through the same kernel path.

Contenders: `nbd-umemd serve --memory SIZE --swap`, `nbdkit --swap memory SIZE` and nbd-server over a
sparse file in /dev/shm, each started afresh for every run and attached by scripts/swap-on (nbdfuse +
`losetup --direct-io=on` on this kernel, the same queue settings for all; --force for the peers,
whose memory nbd-umemd's safety check does not vouch for). The workload (swapwork.c) runs in a memory
cgroup limited to a quarter of its working set: fill, sequential verify, random verify (its swap-ins
timed: idle), mixed reads and writes, and a pure swap-out pass with a reader timing its swap-ins
beside it; then, with the workload's pages still on the device and the cgroup's limit lifted,
`swapoff` is timed, and the workload verifies every page once more. At vm.page-cluster 0 and 3.
Beside it, the latency floor: 4 KiB O_DIRECT reads at QD1 on the attached loop device (fio psync), of
each server and of `nbdkit null`, which does nothing. Rounds rotate the order of the contenders.

The remote case (--swap-remote RATE): the servers run in a network namespace joined to the swapping
side by a veth pair shaped with tc tbf, an `nbdkit --filter=delay nbd` proxy beside the servers adding
the delay per read (this kernel has no netem); the swapping side attaches over TCP.

Every setting changed (page-cluster, cgroups, swap, devices, namespaces) is restored on every exit.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from . import reports
from .common import ROOT, Fatal, die, log, read_text
from .machines import HostPair
from .servers import Server, Servers, nbdkit_server, stop_pid

CONTENDERS = ["nbd-umemd", "nbdkit", "nbd-server"]
QD1_CONTENDERS = ["null"] + CONTENDERS
PHASES = ["fill", "seq", "rand", "mixed", "write"]
CG_ROOT = "/sys/fs/cgroup/memory"
PAGE_CLUSTER = "/proc/sys/vm/page-cluster"


class _DaemonServer:
    """nbd-server, which forks a process per connection and only writes its pidfile once it has
    detached: started through its own daemonising, tracked by pid, stopped with SIGTERM."""

    def __init__(self, name, argv, pidfile, log_path, sock):
        self.name, self.argv, self.pidfile, self.log_path, self.sock = name, argv, pidfile, log_path, sock
        self.pid = None

    def start(self):
        for f in (self.pidfile, self.sock):
            if os.path.exists(f):
                os.unlink(f)
        with open(self.log_path, "ab") as out:
            rc = subprocess.run(self.argv + ["-p", self.pidfile], stdout=out, stderr=out, timeout=30).returncode
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if rc == 0 and read_text(self.pidfile).strip() and self.pid is None:
                self.pid = int(read_text(self.pidfile).strip())
            if self.pid and os.path.exists(self.sock):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self.sock)
                        return self
                    except OSError:
                        pass
            time.sleep(0.05)
        self.stop()
        die("%s failed to start (exit %d): %s" % (self.name, rc, read_text(self.log_path)[-2000:]))

    def alive(self):
        try:
            os.kill(self.pid, 0)
            return True
        except (OSError, TypeError):
            return False

    def check_alive(self, what="the benchmark"):
        if not self.alive():
            die("%s died during %s; its log: %s" % (self.name, what, read_text(self.log_path)[-2000:]))

    def stop(self):
        if self.pid:
            kids = [int(d) for d in os.listdir("/proc") if d.isdigit()
                    and read_text("/proc/%s/stat" % d).rsplit(")", 1)[-1].split()[1:2] == [str(self.pid)]]
            stop_pid(self.pid)
            for k in kids:
                stop_pid(k)
        return 0

    def log_problems(self):
        return []


def _run(argv, timeout=120, check=True):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if check and r.returncode != 0:
        raise Fatal("%s failed (%d): %s" % (" ".join(argv), r.returncode, r.stderr.decode(errors="replace").strip()))
    return r.stdout.decode().strip()


def cpu_tree(pid):
    """CPU seconds of PID and all its descendants (living ones, and the reaped ones it waited for)."""
    hz = float(os.sysconf("SC_CLK_TCK"))
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = read_text("/proc/%s/stat" % d)
            if s:
                f = s.rsplit(")", 1)[1].split()
                stats[int(d)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += stats[p][1] + (stats[p][2] if p == pid else 0)
            todo += [c for c, v in stats.items() if v[0] == p]
    return total / hz


def swap_used_kib(dev):
    for line in read_text("/proc/swaps").splitlines()[1:]:
        f = line.split()
        if f and f[0] == dev:
            return int(f[3])
    return None


def vmstat():
    v = dict(l.split() for l in read_text("/proc/vmstat").splitlines() if l.count(" ") == 1)
    return int(v.get("pswpin", 0)), int(v.get("pswpout", 0))


class SwapBench:
    def __init__(self, b):
        self.b, self.o = b, b.o
        self.dir = os.path.join(b.work, "swap")
        os.makedirs(self.dir, exist_ok=True)
        self.devices = []       # attached by us, detached on every exit
        self.cgroups = []
        self.hosts = None
        self.page_cluster = read_text(PAGE_CLUSTER).strip()
        self.ws = self.o.swap_ws
        self.size = "%dM" % max(1024, 4 * self.ws)
        self.work_bin = os.path.join(self.dir, "swapwork")
        self.remote = self.o.swap_remote

    # ---- set-up and clean-up --------------------------------------------------------------------
    def prepare(self):
        if not os.path.isdir(CG_ROOT):
            die("no cgroup-v1 memory controller at %s" % CG_ROOT)
        if len(read_text("/proc/swaps").splitlines()) > 1:
            die("swap is already on (%s): the suite needs the machine's swap to itself"
                % ", ".join(l.split()[0] for l in read_text("/proc/swaps").splitlines()[1:]))
        for tool in ("nbd-server", "nbdfuse", "gcc", "losetup", "swapon"):
            if shutil.which(tool) is None:
                die("%s not found" % tool)
        _run(["gcc", "-O2", "-pthread", "-o", self.work_bin, os.path.join(ROOT, "scripts/umemd_harness/swapwork.c")])

    def close(self):
        for dev in reversed(self.devices):
            subprocess.run(["swapoff", dev], stderr=subprocess.DEVNULL)
            subprocess.run([os.path.join(ROOT, "scripts/swap-off"), dev], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.devices = []
        for cg in self.cgroups:
            for p in read_text(os.path.join(cg, "cgroup.procs")).split():
                try:
                    os.kill(int(p), 9)
                except OSError:
                    pass
            for _ in range(50):
                try:
                    os.rmdir(cg)
                    break
                except OSError:
                    time.sleep(0.1)
        self.cgroups = []
        with open(PAGE_CLUSTER, "w") as f:
            f.write(self.page_cluster)
        if self.hosts:
            self.hosts.close()

    # ---- servers --------------------------------------------------------------------------------
    def server(self, kind, tag):
        d = self.dir
        sock = os.path.join(d, "%s.sock" % tag)
        pidfile = os.path.join(d, "%s.pid" % tag)
        log_path = os.path.join(d, "%s.log" % tag)
        if kind == "nbd-umemd":
            return Server(kind, [self.b.umemd, "serve", "--memory", self.size, "--swap", "--unix", sock,
                                 "--pidfile", pidfile], pidfile, log_path, sock=sock, announce=False, own_session=True)
        if kind == "nbdkit":
            s = nbdkit_server(kind, ["--swap", "memory", self.size], sock, pidfile, log_path)
        elif kind == "null":
            s = nbdkit_server(kind, ["null", self.size], sock, pidfile, log_path)
        elif kind == "nbd-server":
            img = "/dev/shm/nbd-bench-swap-%d.img" % os.getpid()
            with open(img, "w") as f:
                f.truncate(int(self.size[:-1]) << 20)
            self.imgs = getattr(self, "imgs", []) + [img]
            conf = os.path.join(d, "%s.conf" % tag)
            with open(conf, "w") as f:
                f.write("[generic]\n    unixsock = %s\n[swap]\n    exportname = %s\n" % (sock, img))
            return _DaemonServer(kind, ["nbd-server", "-C", conf], pidfile, log_path, sock)
        else:
            raise ValueError(kind)
        s.announce, s.own_session = False, True
        return s

    def export_args(self, kind, sock):
        args = ["--unix", sock]
        if kind == "nbd-server":
            args += ["--export", "swap"]
        return args

    # ---- one swap run ---------------------------------------------------------------------------
    def swap_run(self, kind, pc, rnd):
        tag = "%s-pc%d-%d" % (kind, pc, rnd)
        with Servers() as servers:
            srv = servers.start(self.server(kind, tag))
            dev = _run([os.path.join(ROOT, "scripts/swap-on")] + self.export_args(kind, srv.sock)
                       + ["--priority", "32000", "--force"])
            self.devices.append(dev)
            with open(PAGE_CLUSTER, "w") as f:
                f.write(str(pc))
            cg = os.path.join(CG_ROOT, "nbd-bench-swap-%d" % os.getpid())
            os.mkdir(cg)
            self.cgroups.append(cg)
            with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
                f.write(str((self.ws << 20) // 4))
            cpu0 = cpu_tree(srv.pid)
            in0, out0 = vmstat()
            work = subprocess.Popen(["sh", "-c", 'echo $$ >"$1/cgroup.procs" && exec "$2" "$3" "$4"', "sh", cg,
                                     self.work_bin, str(self.ws), str(rnd * 7919 + pc)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            phases = {}
            try:
                for line in work.stdout:
                    p = json.loads(line)
                    if p["phase"] == "hold":
                        break
                    phases[p["phase"]] = p
                else:
                    raise Fatal("the workload ended early (exit %s) on %s" % (work.wait(), kind))
                held = swap_used_kib(dev) or 0
                with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
                    f.write("-1")
                s_in0, _ = vmstat()
                t0 = time.monotonic()
                _run(["swapoff", dev], timeout=600)
                swapoff = time.monotonic() - t0
                s_in1, _ = vmstat()
                work.stdin.write(b"verify\n")
                work.stdin.flush()
                final = json.loads(work.stdout.readline() or "{}")
                rc = work.wait(timeout=120)
            finally:
                if work.poll() is None:
                    work.kill()
                    work.wait()
            in1, out1 = vmstat()
            cpu = cpu_tree(srv.pid) - cpu0
            srv.check_alive()
            subprocess.run([os.path.join(ROOT, "scripts/swap-off"), dev], stdout=subprocess.DEVNULL, check=True)
            self.devices.remove(dev)
            servers.stop(srv)
            os.rmdir(cg)
            self.cgroups.remove(cg)
        for img in getattr(self, "imgs", []):
            os.unlink(img)
        self.imgs = []
        errors = sum(p.get("errors", 0) for p in phases.values()) + final.get("errors", 1) + (rc != 0)
        r = {"phases": phases, "held_mib": held / 1024.0, "swapoff_s": swapoff, "swapoff_in": s_in1 - s_in0,
             "cpu_s": cpu, "pswpin": in1 - in0, "pswpout": out1 - out0, "errors": errors}
        log("  %-10s pc=%d: %s; swapoff %.2f s (%.0f MiB); server CPU %.2f s, %d in / %d out; errors %d"
            % (kind, pc, ", ".join("%s %.2f s" % (n, phases[n]["seconds"]) for n in PHASES if n in phases),
               swapoff, r["held_mib"], cpu, r["pswpin"], r["pswpout"], errors))
        return r

    # ---- the QD1 floor --------------------------------------------------------------------------
    def qd1_run(self, kind, rnd):
        tag = "%s-qd1-%d" % (kind, rnd)
        out = os.path.join(self.dir, tag + ".json")
        with Servers() as servers:
            srv = servers.start(self.server(kind, tag))
            dev = _run([os.path.join(ROOT, "scripts/attach")] + self.export_args(kind, srv.sock) + ["--swap"])
            self.devices.append(dev)
            cpu0 = cpu_tree(srv.pid)
            try:
                _run(["fio", "--name=qd1", "--filename=" + dev, "--ioengine=psync", "--direct=1", "--rw=randread",
                      "--bs=4k", "--size=%s" % self.size, "--norandommap", "--randrepeat=0", "--time_based",
                      "--runtime=%d" % self.o.runtime, "--ramp_time=%d" % self.o.ramp, "--output-format=json",
                      "--output=" + out], timeout=self.o.runtime + self.o.ramp + 60)
            finally:
                cpu = cpu_tree(srv.pid) - cpu0
                subprocess.run([os.path.join(ROOT, "scripts/detach"), dev], stdout=subprocess.DEVNULL)
                self.devices.remove(dev)
            srv.check_alive()
            servers.stop(srv)
        for img in getattr(self, "imgs", []):
            os.unlink(img)
        self.imgs = []
        j = json.load(open(out))["jobs"][0]["read"]
        clat = j["clat_ns"]
        r = {"iops": j["iops"], "mean": clat["mean"] / 1000.0,
             "p50": clat["percentile"]["50.000000"] / 1000.0, "cpu_per_read_us": cpu * 1e6 / max(1, j["total_ios"])}
        log("  %-10s QD1 4K O_DIRECT: mean %.1f us, p50 %.1f us, server CPU %.1f us per read"
            % (kind, r["mean"], r["p50"], r["cpu_per_read_us"]))
        return r

    def run(self):
        o = self.o
        swaps, qd1 = {}, {}
        n = o.rounds * (len(QD1_CONTENDERS) + 2 * len(CONTENDERS))
        log("swap suite: %d rounds, working set %d MiB in a %d MiB cgroup, device %s; %d runs"
            % (o.rounds, self.ws, self.ws // 4, self.size, n))
        for rnd in range(1, o.rounds + 1):
            log("round %d of %d" % (rnd, o.rounds))
            k = (rnd - 1) % len(QD1_CONTENDERS)
            for kind in QD1_CONTENDERS[k:] + QD1_CONTENDERS[:k]:
                qd1.setdefault(kind, []).append(self.qd1_run(kind, rnd))
            for pc in (0, 3):
                k = (rnd - 1) % len(CONTENDERS)
                for kind in CONTENDERS[k:] + CONTENDERS[:k]:
                    swaps.setdefault((pc, kind), []).append(self.swap_run(kind, pc, rnd))
        return report(swaps, qd1, self, o.markdown)


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2.0


def _spread(xs):
    """(max - min) / median of XS."""
    m = _median(xs)
    return (max(xs) - min(xs)) / m if xs and m else 0.0


def _metric(r, key):
    """One run's value of KEY: PHASE seconds, swapoff, us per swap-in, swap-in latencies, CPU."""
    ph = r["phases"]
    if key in PHASES:
        return ph[key]["seconds"]
    if key == "swapoff":
        return r["swapoff_s"]
    if key.startswith("us/in:"):
        p = key.split(":")[1]
        if p == "swapoff":
            return r["swapoff_s"] * 1e6 / max(1, r["swapoff_in"])
        return ph[p]["seconds"] * 1e6 / max(1, ph[p]["pswpin"])
    if key in ("idle_p50", "idle_p99"):
        return ph["rand"]["p%s_us" % key[-2:]]
    if key in ("busy_p50", "busy_p99"):
        return ph["write"]["p%s_us" % key[-2:]]
    if key == "cpu/in":
        return r["cpu_s"] * 1e6 / max(1, r["pswpin"])
    if key == "cpu":
        return r["cpu_s"]
    raise KeyError(key)


ROWS = [
    ("fill", "fill (s)", "%.2f"), ("seq", "sequential verify (s)", "%.2f"), ("rand", "random verify (s)", "%.2f"),
    ("mixed", "mixed read/write (s)", "%.2f"), ("write", "swap-out pass with a reader (s)", "%.2f"),
    ("swapoff", "swapoff (s)", "%.2f"),
    ("us/in:seq", "µs per swap-in, sequential", "%.1f"), ("us/in:rand", "µs per swap-in, random", "%.1f"),
    ("us/in:swapoff", "µs per swap-in, swapoff", "%.1f"),
    ("idle_p50", "swap-in p50, idle (µs)", "%.0f"), ("idle_p99", "swap-in p99, idle (µs)", "%.0f"),
    ("busy_p50", "swap-in p50 during swap-out (µs)", "%.0f"), ("busy_p99", "swap-in p99 during swap-out (µs)", "%.0f"),
    ("cpu", "server CPU per run (s)", "%.2f"), ("cpu/in", "server CPU per swap-in (µs)", "%.1f"),
]
CRITERIA_KEYS = ["fill", "seq", "rand", "swapoff"]


def report(swaps, qd1, sb, markdown):
    o = sb.o
    print("## Swap suite%s" % (" (remote: %s)" % sb.remote if sb.remote else "") if markdown else
          "SWAP SUITE" + (" (remote: %s)" % sb.remote if sb.remote else ""))
    reports.print_env(sb.b.env().rows(("workload", "%d MiB in a memory cgroup of %d MiB; device %s; %d rounds"
                                       % (sb.ws, sb.ws // 4, sb.size, o.rounds))), markdown)
    criteria = []
    errors = sum(r["errors"] for rs in swaps.values() for r in rs)
    for pc in (0, 3):
        print()
        print(("### vm.page-cluster %d" if markdown else "vm.page-cluster %d") % pc)
        header = ["medians"] + CONTENDERS + ["nbd-umemd / best peer"]
        rows = []
        for key, label, fmt in ROWS:
            meds = [_median([_metric(r, key) for r in swaps[(pc, k)]]) for k in CONTENDERS]
            best = min(meds[1:])
            rows.append([label] + [fmt % m for m in meds] + ["%.3f" % (meds[0] / best) if best else "-"])
            if key in CRITERIA_KEYS:
                peer = CONTENDERS[1 + meds[1:].index(best)]
                spread = _spread([_metric(r, key) for r in swaps[(pc, peer)]])
                ratio = meds[0] / best
                criteria.append(("page-cluster %d %s: nbd-umemd at or below the best peer (%s, spread %.0f %%)"
                                 % (pc, key, peer, 100 * spread), ratio <= 1 + spread, ratio))
        (reports.md_table if markdown else reports.txt_table)(header, rows)
        cpu = [_median([_metric(r, "cpu/in") for r in swaps[(pc, k)]]) for k in CONTENDERS]
        criteria.append(("page-cluster %d CPU per swap-in at most nbdkit's" % pc, cpu[0] <= cpu[1], cpu[0] / cpu[1]))
        busy = _median([_metric(r, "busy_p99") for r in swaps[(pc, "nbd-umemd")]])
        idle = _median([_metric(r, "idle_p99") for r in swaps[(pc, "nbd-umemd")]])
        criteria.append(("page-cluster %d swap-in p99 during swap-out at most 2x idle" % pc, busy <= 2 * idle, busy / idle))
    print()
    print("### Latency floor: 4 KiB O_DIRECT reads at QD1 on the loop device" if markdown else
          "LATENCY FLOOR: 4 KiB O_DIRECT reads at QD1 on the loop device")
    header = ["medians"] + QD1_CONTENDERS
    rows = []
    for key, label in (("mean", "mean (µs)"), ("p50", "p50 (µs)"), ("cpu_per_read_us", "server CPU per read (µs)")):
        rows.append([label] + ["%.1f" % _median([r[key] for r in qd1[k]]) for k in QD1_CONTENDERS])
    rows.append(["added over null, mean (µs)"] + ["%.1f" % (_median([r["mean"] for r in qd1[k]]) - _median([r["mean"] for r in qd1["null"]]))
                                                   for k in QD1_CONTENDERS])
    (reports.md_table if markdown else reports.txt_table)(header, rows)
    floor = _median([r["mean"] for r in qd1["null"]])
    added = {k: _median([r["mean"] for r in qd1[k]]) - floor for k in CONTENDERS}
    criteria.append(("nbd-umemd's added QD1 latency at most nbdkit's + 5 µs (%.1f vs %.1f µs)" % (added["nbd-umemd"], added["nbdkit"]),
                     added["nbd-umemd"] <= added["nbdkit"] + 5, added["nbd-umemd"] - added["nbdkit"]))
    criteria.append(("no data errors (%d)" % errors, errors == 0, errors))
    print()
    return reports.print_criteria(criteria, markdown)


def run_swap(b):
    sb = SwapBench(b)
    try:
        sb.prepare()
        return sb.run()
    finally:
        sb.close()
        for img in getattr(sb, "imgs", []):
            try:
                os.unlink(img)
            except OSError:
                pass
