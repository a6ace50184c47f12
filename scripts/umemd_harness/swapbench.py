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
The same workload also runs on a swap device with no server at all ("kernel"): a loop device over a
file in /dev/shm, the floor of what the kernel's swap path costs by itself. Beside it, the latency
floor: 4 KiB O_DIRECT reads at QD1 on the attached loop device (fio psync), every page written first,
of each server and of `nbdkit null`, which does nothing. Rounds rotate the order of the contenders.

The remote case (--swap-remote RATE): the servers run in a network namespace joined to the swapping
side by a veth pair shaped with tc tbf, a delay line beside the servers (delayproxy.c: this kernel has
no netem, and nbdkit's delay filter counts whole milliseconds) holding every byte the server sends for
--swap-delay-us; the swapping side attaches over TCP.

Every setting changed (page-cluster, cgroups, swap, devices, namespaces) is restored on every exit.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time

from . import reports, suites
from .suites import _free_port
from .common import PYTHON, ROOT, Fatal, die, log, read_text
from .servers import Server, Servers, nbdkit_server, stop_pid

CONTENDERS = ["nbd-umemd", "nbdkit", "nbd-server"]
# "kernel": no server; swap on a loop device over a file in /dev/shm (not a contender: the floor)
SWAP_RUNS = CONTENDERS + ["kernel"]
QD1_CONTENDERS = ["null"] + CONTENDERS
PHASES = ["fill", "seq", "rand", "mixed", "write"]
CG_ROOT = "/sys/fs/cgroup/memory"
REMOTE_SERVER, REMOTE_CLIENT = "10.200.9.1", "10.200.9.2"
PAGE_CLUSTER = "/proc/sys/vm/page-cluster"
# How long an idle vCPU polls before it halts (the guest haltpoll cpuidle driver); --halt-poll-ns.
HALT_POLL_NS = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
CPUIDLE_DRIVER = "/sys/devices/system/cpu/cpuidle/current_driver"


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
        self.loops = []         # the kernel floor's loop devices, likewise
        self.cgroups = []
        self.ns = "umemd-swsrv-%d" % os.getpid()
        self.imgs = []          # nbd-server's and the kernel floor's image files in /dev/shm
        self.page_cluster = read_text(PAGE_CLUSTER).strip()
        self.ws = self.o.swap_ws
        self.size = "%dM" % max(1024, 4 * self.ws)
        self.work_bin = os.path.join(self.dir, "swapwork")
        self.proxy_bin = os.path.join(self.dir, "delayproxy")
        self.remote = self.o.swap_remote
        self.halt_poll_ns = None   # the setting found, while the suite has changed it

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
        _run(["gcc", "-O2", "-pthread", "-o", self.proxy_bin, os.path.join(ROOT, "scripts/umemd_harness/delayproxy.c")])
        if self.remote:
            self.setup_link()
        if self.o.halt_poll_ns is not None:
            if not os.path.exists(HALT_POLL_NS):
                die("--halt-poll-ns: %s does not exist (this kernel's idle driver is %s, not haltpoll)"
                    % (HALT_POLL_NS, idle_regime()))
            found = read_text(HALT_POLL_NS).strip()
            with open(HALT_POLL_NS, "w") as f:
                f.write(str(self.o.halt_poll_ns))
            self.halt_poll_ns = found

    def setup_link(self):
        """The server host: a network namespace joined to this one by a veth pair, both ends shaped
        with tc tbf at the --swap-remote rate."""
        ns, here, there = self.ns, "uswr%d" % (os.getpid() % 10000), "uswn%d" % (os.getpid() % 10000)
        _run(["ip", "netns", "add", ns])
        self.netns_made = True
        steps = [["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                 ["ip", "link", "set", there, "netns", ns],
                 ["ip", "addr", "add", REMOTE_CLIENT + "/24", "dev", here], ["ip", "link", "set", here, "up"],
                 ["ip", "-n", ns, "addr", "add", REMOTE_SERVER + "/24", "dev", there],
                 ["ip", "-n", ns, "link", "set", there, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"],
                 ["tc", "qdisc", "add", "dev", here, "root", "tbf", "rate", self.remote, "burst", "256kb", "latency", "50ms"],
                 ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", there, "root", "tbf", "rate", self.remote,
                  "burst", "256kb", "latency", "50ms"]]
        self.veth = here
        for step in steps:
            _run(step)

    def close(self):
        for dev in list(self.devices):
            subprocess.run(["swapoff", dev], stderr=subprocess.DEVNULL)
            subprocess.run([os.path.join(ROOT, "scripts/swap-off"), dev], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            self.devices.remove(dev)
        for dev in list(self.loops):
            self.release_loop(dev)
        for cg in list(self.cgroups):
            self.remove_cgroup(cg)
        self.drop_images()
        with open(PAGE_CLUSTER, "w") as f:
            f.write(self.page_cluster)
        if self.halt_poll_ns is not None:
            with open(HALT_POLL_NS, "w") as f:
                f.write(self.halt_poll_ns)
            self.halt_poll_ns = None
        if getattr(self, "veth", None):
            subprocess.run(["ip", "link", "del", self.veth], stderr=subprocess.DEVNULL)
        if getattr(self, "netns_made", False):
            subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)

    # ---- servers --------------------------------------------------------------------------------
    def server(self, kind, tag):
        d = self.dir
        sock = os.path.join(d, "%s.sock" % tag)
        pidfile = os.path.join(d, "%s.pid" % tag)
        log_path = os.path.join(d, "%s.log" % tag)
        ns = ["ip", "netns", "exec", self.ns] if self.remote else []
        if kind == "nbd-umemd":
            # --swap on the remote path too: its "host" is a network namespace of the swapping kernel,
            # whose reclaim (DAMON's pageout scheme here) would otherwise swap the served memory out
            # to the very device it backs. A run deadlocked that way: the daemon's event loop waited
            # on the writeback of one of its own shmem pages.
            # --metrics: the daemon's own read latency (arrival to reply) during the swap-out pass.
            self.metrics_port = _free_port()
            self.metrics_host = REMOTE_SERVER if self.remote else "127.0.0.1"
            return Server(kind, ns + [self.b.umemd, "serve", "--memory", self.size, "--unix", sock, "--pidfile", pidfile,
                                      "--metrics", "%s:%d" % (self.metrics_host, self.metrics_port), "--swap"],
                          pidfile, log_path, sock=sock, announce=False, own_session=True)
        if kind in ("nbdkit", "null"):
            args = ["null", self.size] if kind == "null" else ["--swap", "memory", self.size]
            s = Server(kind, ns + ["nbdkit", "-f", "-U", sock, "-P", pidfile] + args, pidfile, log_path, sock=sock)
        elif kind == "nbd-server":
            img = "/dev/shm/nbd-bench-swap-%d.img" % os.getpid()
            with open(img, "w") as f:
                f.truncate(int(self.size[:-1]) << 20)
            self.imgs.append(img)
            conf = os.path.join(d, "%s.conf" % tag)
            with open(conf, "w") as f:
                f.write("[generic]\n    unixsock = %s\n[swap]\n    exportname = %s\n" % (sock, img))
            return _DaemonServer(kind, ns + ["nbd-server", "-C", conf], pidfile, log_path, sock)
        else:
            raise ValueError(kind)
        s.announce, s.own_session = False, True
        return s

    def attach_args(self, servers, kind, srv, tag):
        """scripts/attach and swap-on arguments for SRV: its socket, or on the remote path a TCP port of
        the server's host where delayproxy.c holds every byte from the server for --swap-delay-us."""
        if not self.remote:
            return ["--unix", srv.sock] + (["--export", "swap"] if kind == "nbd-server" else [])
        port = _free_port()
        pidfile = os.path.join(self.dir, "%s-proxy.pid" % tag)
        proxy = Server("delay proxy", ["ip", "netns", "exec", self.ns, self.proxy_bin, REMOTE_SERVER, str(port), srv.sock,
                                       str(self.o.swap_delay_us), pidfile],
                       pidfile, os.path.join(self.dir, "%s-proxy.log" % tag))
        proxy.announce, proxy.own_session = False, True
        servers.start(proxy)
        return ["--tcp", "%s:%d" % (REMOTE_SERVER, port)] + (["--export", "swap"] if kind == "nbd-server" else [])

    # ---- devices and cgroups, released on every exit ----------------------------------------------
    @contextlib.contextmanager
    def attached(self, servers, kind, srv, tag, swap):
        """SRV's export attached (scripts/swap-on with swap, else scripts/attach); swapped off and
        detached when the block ends, however it ends (before the servers stop)."""
        args = self.attach_args(servers, kind, srv, tag)
        dev = _run([os.path.join(ROOT, "scripts/swap-on" if swap else "scripts/attach")] + args
                   + (["--priority", "32000", "--force"] if swap else ["--swap"]))
        self.devices.append(dev)
        try:
            yield dev
        finally:
            self.devices.remove(dev)
            r = subprocess.run([os.path.join(ROOT, "scripts/swap-off"), dev], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
            if r.returncode != 0:
                log("WARNING: scripts/swap-off %s: %s" % (dev, r.stderr.decode(errors="replace").strip()))

    @contextlib.contextmanager
    def cgroup(self, limit):
        cg = os.path.join(CG_ROOT, "nbd-bench-swap-%d" % os.getpid())
        os.mkdir(cg)
        self.cgroups.append(cg)
        try:
            with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
            yield cg
        finally:
            self.remove_cgroup(cg)

    def remove_cgroup(self, cg):
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
        self.cgroups.remove(cg)

    def drop_images(self):
        for img in self.imgs:
            if os.path.exists(img):
                os.unlink(img)
        self.imgs = []

    # ---- one swap run ---------------------------------------------------------------------------
    def swap_run(self, kind, pc, rnd):
        r = self.kernel_run(pc, rnd) if kind == "kernel" else self.server_run(kind, pc, rnd)
        cpu = "" if r["cpu_s"] is None else "; server CPU %.2f s" % r["cpu_s"]
        log("  %-10s pc=%d: %s; swapoff %.2f s (%.0f MiB)%s, %d in / %d out; errors %d"
            % (kind, pc, ", ".join("%s %.2f s" % (n, r["phases"][n]["seconds"]) for n in PHASES if n in r["phases"]),
               r["swapoff_s"], r["held_mib"], cpu, r["pswpin"], r["pswpout"], r["errors"]))
        return r

    def server_run(self, kind, pc, rnd):
        """The workload swapping to a server of KIND, attached by scripts/swap-on."""
        tag = "%s-pc%d-%d" % (kind, pc, rnd)
        try:
            with Servers() as servers:
                srv = servers.start(self.server(kind, tag))
                with self.attached(servers, kind, srv, tag, swap=True) as dev, self.cgroup((self.ws << 20) // 4) as cg:
                    with open(PAGE_CLUSTER, "w") as f:
                        f.write(str(pc))
                    r = self.workload(kind, pc, rnd, srv, dev, cg)
                srv.check_alive()
                servers.stop(srv)
        finally:
            self.drop_images()
        return r

    def kernel_run(self, pc, rnd):
        """The workload with swap on a loop device over a file in /dev/shm: no FUSE, no NBD, no server
        (tmpfs has no O_DIRECT, so the loop device goes through its page cache)."""
        img = "/dev/shm/nbd-bench-swap-kernel-%d.img" % os.getpid()
        with open(img, "w") as f:
            f.truncate(int(self.size[:-1]) << 20)
        self.imgs.append(img)
        try:
            dev = _run(["losetup", "-f", "--show", "--sector-size", "4096", img]).strip()
            self.loops.append(dev)
            try:
                _run(["mkswap", dev])
                _run(["swapon", "-p", "32000", dev])
                with self.cgroup((self.ws << 20) // 4) as cg:
                    with open(PAGE_CLUSTER, "w") as f:
                        f.write(str(pc))
                    r = self.workload("kernel", pc, rnd, None, dev, cg)
            finally:
                self.release_loop(dev)
        finally:
            self.drop_images()
        return r

    def release_loop(self, dev):
        """Swaps off and detaches one of the kernel floor's loop devices."""
        subprocess.run(["swapoff", dev], stderr=subprocess.DEVNULL)
        subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
        self.loops.remove(dev)

    def workload(self, kind, pc, rnd, srv, dev, cg):
        """swapwork in cgroup CG swapping to DEV; swapoff timed while it holds its pages. SRV None: no
        server (the kernel floor)."""
        cpu0 = cpu_tree(srv.pid) if srv else 0.0
        in0, out0 = vmstat()
        work = subprocess.Popen(["sh", "-c", 'echo $$ >"$1/cgroup.procs" && exec "$2" "$3" "$4"', "sh", cg,
                                 self.work_bin, str(self.ws), str(rnd * 7919 + pc)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        phases, hist = {}, {}
        try:
            for line in work.stdout:
                p = json.loads(line)
                if p["phase"] == "hold":
                    break
                phases[p["phase"]] = p
                if kind == "nbd-umemd" and p["phase"] in ("mixed", "write"):
                    hist[p["phase"]] = self.read_histogram()
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
        errors = sum(p.get("errors", 0) for p in phases.values()) + final.get("errors", 1) + (rc != 0)
        if "mixed" in hist and "write" in hist:
            phases["write"]["daemon_p99_us"] = _hist_quantile(hist["mixed"], hist["write"], 0.99)
            phases["write"]["daemon_reads"] = hist["write"][-1][1] - hist["mixed"][-1][1]
        return {"phases": phases, "held_mib": held / 1024.0, "swapoff_s": swapoff, "swapoff_in": s_in1 - s_in0,
                "cpu_s": (cpu_tree(srv.pid) - cpu0) if srv else None, "pswpin": in1 - in0, "pswpout": out1 - out0, "errors": errors}

    def read_histogram(self):
        """nbd-umemd's read latency histogram: [(upper bound in µs, cumulative count)], +Inf last."""
        url = "http://%s:%d/metrics" % (self.metrics_host, self.metrics_port)
        argv = (["ip", "netns", "exec", self.ns] if self.remote else []) + ["curl", "-sf", "--max-time", "5", url]
        out = []
        for line in _run(argv).splitlines():
            m = re.match(r'nbd_umemd_request_duration_seconds_bucket\{.*command="read".*le="([^"]+)"\} (\S+)$', line)
            if m:
                out.append((float(m.group(1)) * 1e6, float(m.group(2))))
        if not out:
            raise Fatal("no read latency histogram in %s" % url)
        return out

    # ---- the QD1 floor --------------------------------------------------------------------------
    def qd1_run(self, kind, rnd):
        tag = "%s-qd1-%d" % (kind, rnd)
        out = os.path.join(self.dir, tag + ".json")
        try:
            with Servers() as servers:
                srv = servers.start(self.server(kind, tag))
                with self.attached(servers, kind, srv, tag, swap=False) as dev:
                    # Data on every page first, as on a swap device in use: a read of a page never
                    # written could be answered as a hole, cheaper than a page of data.
                    _run(["fio", "--name=fill", "--filename=" + dev, "--ioengine=psync", "--direct=1", "--rw=write",
                          "--bs=1M", "--size=%s" % self.size, "--refill_buffers", "--output=/dev/null"],
                         timeout=300)
                    cpu0 = cpu_tree(srv.pid)
                    _run(["fio", "--name=qd1", "--filename=" + dev, "--ioengine=psync", "--direct=1", "--rw=randread",
                          "--bs=4k", "--size=%s" % self.size, "--norandommap", "--randrepeat=0", "--time_based",
                          "--runtime=%d" % self.o.runtime, "--ramp_time=%d" % self.o.ramp, "--output-format=json",
                          "--output=" + out], timeout=self.o.runtime + self.o.ramp + 60)
                    cpu = cpu_tree(srv.pid) - cpu0
                srv.check_alive()
                servers.stop(srv)
        finally:
            self.drop_images()
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
        n = o.rounds * (len(QD1_CONTENDERS) + 2 * len(SWAP_RUNS))
        log("swap suite: %d rounds, working set %d MiB in a %d MiB cgroup, device %s; %d runs"
            % (o.rounds, self.ws, self.ws // 4, self.size, n))
        for rnd in range(1, o.rounds + 1):
            log("round %d of %d" % (rnd, o.rounds))
            k = (rnd - 1) % len(QD1_CONTENDERS)
            for kind in QD1_CONTENDERS[k:] + QD1_CONTENDERS[:k]:
                qd1.setdefault(kind, []).append(self.qd1_run(kind, rnd))
            for pc in (0, 3):
                k = (rnd - 1) % len(SWAP_RUNS)
                for kind in SWAP_RUNS[k:] + SWAP_RUNS[:k]:
                    swaps.setdefault((pc, kind), []).append(self.swap_run(kind, pc, rnd))
        return report(swaps, qd1, self, o.markdown)


def _hist_quantile(before, after, q):
    """The upper bound (µs) of the bucket holding quantile Q of the reads between two snapshots."""
    counts = [(b, a - c) for (b, a), (_, c) in zip(after, before)]
    total = counts[-1][1]
    for bound, n in counts:
        if total and n >= q * total:
            return bound
    return float("nan")


def _median(xs):
    """The median of the values that are there (the peers have no daemon histogram); NaN if none."""
    m = suites._median([x for x in xs if x is not None])
    return float("nan") if m is None else m


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
    if key == "busy/idle":
        return ph["write"]["p99_us"] / ph["rand"]["p99_us"]
    if key.startswith("psi:"):
        return ph[key[4:]].get("psi_some_ms")
    if key == "daemon_p99":
        return ph["write"].get("daemon_p99_us")
    if key in ("cpu/in", "cpu") and r["cpu_s"] is None:
        return None   # no server (the kernel floor)
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
    ("busy/idle", "swap-in p99 during swap-out / idle p99", "%.1f"),
    ("daemon_p99", "daemon's read p99 during swap-out, bucket bound (µs)", "%.0f"),
    ("psi:rand", "memory stall (PSI some) in random verify (ms)", "%.0f"),
    ("psi:write", "memory stall (PSI some) in the swap-out pass (ms)", "%.0f"),
    ("cpu", "server CPU per run (s)", "%.2f"), ("cpu/in", "server CPU per swap-in (µs)", "%.1f"),
]
CRITERIA_KEYS = ["fill", "seq", "rand", "swapoff"]


def report(swaps, qd1, sb, markdown):
    o = sb.o
    print("## Swap suite%s" % (" (remote: %s)" % sb.remote if sb.remote else "") if markdown else
          "SWAP SUITE" + (" (remote: %s)" % sb.remote if sb.remote else ""))
    extra = [("workload", "%d MiB in a memory cgroup of %d MiB; device %s; %d rounds" % (sb.ws, sb.ws // 4, sb.size, o.rounds)),
             ("path", "nbdfuse + losetup --direct-io=on (scripts/swap-on)"),
             ("cpuidle", idle_regime() + (" (set by --halt-poll-ns)" if o.halt_poll_ns is not None else ""))]
    if sb.remote:
        extra.append(("link", "veth to a network namespace, tc tbf %s both ways; a delay line beside the server "
                              "(delayproxy.c) holds its replies %d µs; attached over TCP" % (sb.remote, o.swap_delay_us)))
    reports.print_env(sb.b.env().rows(*extra), markdown)
    criteria = []
    errors = sum(r["errors"] for rs in swaps.values() for r in rs)
    for pc in (0, 3):
        print()
        print(("### vm.page-cluster %d" if markdown else "vm.page-cluster %d") % pc)
        header = ["medians"] + CONTENDERS + ["nbd-umemd / best peer", "no server (loop on /dev/shm)"]
        rows = []
        for key, label, fmt in ROWS:
            meds = [_median([_metric(r, key) for r in swaps[(pc, k)]]) for k in CONTENDERS]
            floor = _median([_metric(r, key) for r in swaps[(pc, "kernel")]])
            best = min(meds[1:])
            show = lambda v, f: "-" if v != v else f % v   # NaN: no value (the peers have no such metric)
            rows.append([label] + [show(m, fmt) for m in meds] + [show(meds[0] / best, "%.3f") if best else "-",
                                                                   show(floor, fmt)])
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
        kernel = _median([_metric(r, "busy/idle") for r in swaps[(pc, "kernel")]])
        criteria.append(("page-cluster %d swap-in p99 during swap-out at most 2x idle (with no server at all: %.1fx)"
                         % (pc, kernel), busy <= 2 * idle, busy / idle))
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


def idle_regime():
    """The idle driver, and with haltpoll how long an idle vCPU polls before it halts: at 0 every idle
    vCPU halts at once, and waking a thread on it costs an interrupt and the hypervisor's wake-up."""
    driver = read_text(CPUIDLE_DRIVER, "none").strip()
    poll = read_text(HALT_POLL_NS).strip()   # empty: no haltpoll driver
    return "%s, guest_halt_poll_ns %s" % (driver, poll) if poll else driver


def run_swap(b):
    sb = SwapBench(b)
    try:
        sb.prepare()
        return sb.run()
    finally:
        sb.close()


# =================================================================================================
# Small synchronous writes on a file export (--suite sync)
# =================================================================================================
SYNC_WORKLOADS = [("fua", 1), ("fua", 8), ("flush", 1), ("flush", 8)]


def run_sync(b):
    """`nbd-umemd serve --file F` against `nbdkit file F`, F a written (not sparse) 256 MiB file on the
    root file system: 4 KiB WRITE+FUA and WRITE+FLUSH at QD1 and QD8 (syncwrite.py), both servers
    started once, the order alternating by round and workload; medians of ops/s and latency."""
    o, w = b.o, b.work
    img = os.path.join(w, "sync.img")
    with open(img, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(16 << 20))
        f.flush()
        os.fsync(f.fileno())
    fs = _run(["stat", "-f", "-c", "%T", img])
    results = {}
    with Servers() as servers:
        socks = {k: os.path.join(w, "sync-%s.sock" % k) for k in ("nbd-umemd", "nbdkit")}
        pidfile = os.path.join(w, "sync-umemd.pid")
        srv = {
            "nbd-umemd": servers.start(Server("nbd-umemd", [b.umemd, "serve", "--file", img, "--unix", socks["nbd-umemd"],
                                                            "--pidfile", pidfile], pidfile,
                                              os.path.join(w, "sync-umemd.log"), sock=socks["nbd-umemd"])),
            "nbdkit": servers.start(nbdkit_server("nbdkit", ["file", img], socks["nbdkit"], os.path.join(w, "sync-nbdkit.pid"),
                                                  os.path.join(w, "sync-nbdkit.log"))),
        }
        for rnd in range(1, o.rounds + 1):
            for i, (mode, qd) in enumerate(SYNC_WORKLOADS):
                order = ["nbd-umemd", "nbdkit"] if (rnd + i) % 2 else ["nbdkit", "nbd-umemd"]
                for k in order:
                    srv[k].check_alive()
                    cpu0 = cpu_tree(srv[k].pid)
                    out = _run([PYTHON, os.path.join(ROOT, "scripts/umemd_harness/syncwrite.py"),
                                "nbd+unix:///?socket=" + socks[k], mode, str(qd), str(o.runtime)], timeout=o.runtime + 60)
                    r = json.loads(out)
                    r["cpu_us"] = (cpu_tree(srv[k].pid) - cpu0) * 1e6 / max(1, r["ops"] * o.runtime)
                    results.setdefault((mode, qd, k), []).append(r)
                    log("  round %d %-5s QD%d %-9s %7.0f ops/s, mean %6.0f us" % (rnd, mode, qd, k, r["ops"], r["mean_us"]))
    os.unlink(img)
    md = o.markdown
    print("## Small synchronous writes on a file export" if md else "SMALL SYNCHRONOUS WRITES ON A FILE EXPORT")
    reports.print_env(b.env().rows(("file", "256 MiB, written, on %s (%s)" % (fs, w)),
                                   ("rounds", "%d of %d s per workload and server" % (o.rounds, o.runtime))), md)
    print()
    header = ["4 KiB writes", "nbd-umemd ops/s", "nbdkit ops/s", "ratio", "nbd-umemd mean (µs)", "nbdkit mean (µs)",
              "nbd-umemd rounds", "nbdkit rounds"]
    rows, criteria = [], []
    for mode, qd in SYNC_WORKLOADS:
        a = [r["ops"] for r in results[(mode, qd, "nbd-umemd")]]
        k = [r["ops"] for r in results[(mode, qd, "nbdkit")]]
        ratio = _median(a) / _median(k)
        label = "%s QD%d" % ("WRITE+FUA" if mode == "fua" else "WRITE, FLUSH", qd)
        rows.append([label, "%.0f" % _median(a), "%.0f" % _median(k), "%.3f" % ratio,
                     "%.0f" % _median([r["mean_us"] for r in results[(mode, qd, "nbd-umemd")]]),
                     "%.0f" % _median([r["mean_us"] for r in results[(mode, qd, "nbdkit")]]),
                     " ".join("%.0f" % x for x in a), " ".join("%.0f" % x for x in k)])
        criteria.append(("%s: nbd-umemd at least 1.0x nbdkit" % label, ratio >= 1.0, ratio))
    (reports.md_table if md else reports.txt_table)(header, rows)
    print()
    return reports.print_criteria(criteria, md)


# =================================================================================================
# The hang harness, long mode (--suite hang)
# =================================================================================================
def run_hang(b):
    """Tests/integration/66-swap-hang-guest.sh with HANG_RUNS=--hang-runs boots (the test suite runs 3):
    the real kernel nbd client in a TCG guest swapping to this host's nbd-umemd over TCP, a memory
    eater with no cgroup; counts hangs, panics and data errors."""
    o = b.o
    script = os.path.join(ROOT, "Tests/integration/66-swap-hang-guest.sh")
    topology, cgroup = {"remote": ("remote", 0), "local": ("local", 0), "local-cgroup": ("local", 64)}[o.hang_mode]
    env = dict(os.environ, HANG_RUNS=str(o.hang_runs), NBD_UMEMD=b.umemd, HANG_TOPOLOGY=topology,
               HANG_CGROUP=str(cgroup))
    log("hang harness: %d boots of the test guest, %s (%s)" % (o.hang_runs, o.hang_mode, script))
    t0 = time.monotonic()
    lines = []
    with subprocess.Popen(["bash", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as p:
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if "run " in line or "HANG-HARNESS" in line or "FAIL" in line:
                log(line)
        rc = p.wait()
    minutes = (time.monotonic() - t0) / 60
    summary = [l for l in lines if "HANG-HARNESS" in l]
    fields = dict(re.findall(r"(\S+)=(\[[^\]]*\]|\S+)", summary[-1])) if summary else {}
    md = o.markdown
    if topology == "remote":
        title = "Remote swap hang harness"
        guest = ("QEMU TCG, 256 MiB, hung_task_panic=1 softlockup_panic=1 panic=-1; "
                 "nbd-client -swap over TCP to this host's nbd-umemd; no memory cgroup")
        ram = "RAM"
    else:
        confinement = "eaters in a %d MiB memory cgroup" % cgroup if cgroup else "no memory cgroup"
        title = "Local swap hang harness, " + confinement
        guest = ("QEMU TCG, 640 MiB, hung_task_panic=1 softlockup_panic=1 panic=-1; nbd-umemd serve --memory 256M "
                 "--swap inside the guest, nbd-client -unix -swap; " + confinement)
        ram = "the RAM available with the daemon running"
    print("## " + title if md else title.upper())
    reports.print_env(b.env().rows(("guest", guest),
                                   ("runs", "%d boots, each: an eater round of %s + 100 MiB (write, verify, free), then "
                                            "swapoff while the owner of the pages on the device is stopped" % (o.hang_runs, ram)),
                                   ("elapsed", "%.1f min" % minutes)), md)
    print()
    for k in ("runs", "ok", "hangs", "panics", "data-errors", "incomplete", "swapoff-s"):
        print(("- %s: %s" if md else "%-12s %s") % (k, fields.get(k, "?")))
    print()
    ok = rc == 0 and fields.get("ok") == str(o.hang_runs)
    return reports.print_criteria([("%s of %d runs without hang, panic or data error" % (fields.get("ok", "0"), o.hang_runs),
                                     ok, float(fields.get("ok", 0)))], md, fmt=lambda r: "%.0f" % r)
