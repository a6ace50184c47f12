"""scripts/bench: the command line, the setup shared by the suites, and the order they run in."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from . import suites, swapbench
from .common import ROOT, build_release, die, ensure_packages, log, run_main, set_prog, umemd_binary

USAGE = """\
Usage: scripts/bench [OPTIONS]

Core suite: benchmarks `nbd-umemd serve --file F` against `nbdkit file F` (same file in /dev/shm) with fio's
nbd engine over Unix sockets, alternating the two servers round by round, and prints the medians.

Workloads (each run --rounds times per server):
  qd1     4K random read,  iodepth 1   (IOPS, mean and p50 completion latency in us)
  rr16    4K random read,  iodepth 16  (IOPS)
  rw16    4K random write, iodepth 16  (IOPS)
  seq8    1M sequential read, iodepth 8 (GiB/s)

Lazy suite: a source `nbdkit file F` (the same random-data file) is served lazily by
`nbd-umemd serve --source URI --store DIR` and by the nbdkit proxy
`nbdkit --filter=cow nbd socket=SRC cow-on-read=true`, each started afresh (empty store / overlay,
under a temp dir on the root file system) for every round and contender; the order of the
contenders alternates from round to round.
  miss    4K random read, iodepth 1, over the whole (absent) export, source with
          `--filter=delay delay-read=1ms`: p50 and p99 completion latency (us) of nbd-umemd with
          --fetch-size 4K, of nbd-umemd with the default fetch size, of the proxy, and of the
          delayed source read directly
  copy    `nbdcopy URI null:` of the whole export from an undelayed source (seconds), nbd-umemd
          (default fetch size) vs the proxy; also peak RSS (VmHWM) of each server after the copy

Prefetch suite: a source `nbdkit --filter=delay --filter=rate file F delay-read=1ms rate=1G` over a
sparse image whose odd MiBs are holes; contenders nbd-umemd --prefetch off, nbd-umemd with the
background pull (default), and `nbdkit --filter=scan --filter=cow nbd ... cow-on-read=true cow-on-cache=true`:
  miss    4K random read, iodepth 1, started as soon as the contender listens: fio p50/p99 and
          nbd-umemd's own demand-miss p50/p99
  local   time until every page is local with no client, against the ideal (non-zero bytes / rate)

Migrate suite: the same test VM (MIB of RAM, a workload that verifies and rewrites half of it
continuously) live-migrated by scripts/migrate-vm between two network namespaces over one tc tbf link,
by QEMU precopy (auto-converge), QEMU postcopy-ram (switched to post-copy at once), nbd-umemd's file
mode (RAM on a block device) and nbd-umemd's swap mode (RAM in tmpfs, staged as swapped out to an
nbd-umemd swap device that is gone at the end), the order rotating round by round: downtime, time to
guest progress on the destination, time to all RAM on the destination, bytes sent, the guest's rate
before/during/after, data errors, and for the nbd-umemd modes the NBD writes after completion, for swap
mode staging, swapoff and the time until the VM depends on nothing; medians, ratios against postcopy,
the acceptance checks, and a PNG of the guest's rate over time.

TLS suite: nbd-umemd --tls require against nbdkit --tls=require on the same x509 certificates (TLS 1.3
on both; fio over nbds+unix with the test CA in /etc/pki/libnbd, libnbd's default directory, created
and removed by the suite): 4K random read QD1 (p50) and QD16, 1M sequential read QD8; the cost of
scraping --metrics once a second (4K random read QD16, scraped and not; the server's CPU per scrape
against its CPU under that load, the criterion); the demand-miss p50 of a lazy export through a TLS
source link against a plain one. The migration over TLS: --suite migrate
--mig-modes swap,swap-tls (or file,file-tls).

Swap suite: remote memory as swap. nbd-umemd (serve --memory --swap), nbdkit --swap memory and
nbd-server (a file in /dev/shm) as the swap device through the same kernel path (scripts/swap-on:
nbdfuse + losetup --direct-io=on here), each started afresh per run, the order rotating by round; a
workload in a memory cgroup of a quarter of its working set: fill, sequential verify, random verify
(swap-in latency, idle), mixed reads/writes, a swap-out pass with a reader timing its swap-ins; then
swapoff of the device holding the workload's pages. Per phase the time, pswpin/pswpout, µs per
swap-in; server CPU per swap-in; at vm.page-cluster 0 and 3. Beside it the latency floor: 4 KiB
O_DIRECT reads at QD1 on the loop device (fio psync), every page written first, of each server and
of nbdkit null. Restores page-cluster, removes its cgroups, devices and swap on every exit; refuses
to run with swap on.

Sync suite: small synchronous writes on a file export: nbd-umemd --file F against nbdkit file F, F a
written 256 MiB file on the root file system; 4 KiB WRITE+FUA and WRITE then FLUSH at QD1 and QD8
(libnbd from Python), both servers started once, the order alternating; ops/s and mean latency.

Hang suite: the remote swap hang harness (Tests/integration/66-swap-hang-guest.sh, which scripts/test
runs 3 times) for --hang-runs boots: a TCG guest with 256 MiB, hung_task_panic=1 and panic=-1 swaps
over TCP with the real nbd-client -swap to this host's nbd-umemd while a memory eater with no cgroup
writes, verifies and frees RAM + 100 MiB, then swapoff with the owner of the swapped pages stopped;
hangs, panics and data errors counted. --hang-mode local runs the same harness with the daemon
inside the guest (serve --swap, a Unix socket, a 640 MiB guest), local-cgroup with the eaters in a
64 MiB memory cgroup as well.

Options:
  --suite S       core, lazy, prefetch, migrate, tls, swap, sync, hang or all (default all, env
                  BENCH_SUITE; all = the first four)
  --rounds N      rounds per workload and server          (default 5, env BENCH_ROUNDS)
  --runtime S     measured seconds per fio run            (default 5, env BENCH_RUNTIME)
  --ramp S        unmeasured warm-up seconds per fio run  (default 1, env BENCH_RAMP)
  --size SIZE     size of the test file, e.g. 1G, 512M    (default 1G, env BENCH_SIZE)
  --mig-rounds N  migrate suite: rounds                    (default 3, env BENCH_MIG_ROUNDS)
  --mig-mem MIB   migrate suite: guest RAM                 (default 192)
  --mig-link RATE migrate suite: tc tbf rate of the link   (default 200mbit)
  --mig-keep S    migrate suite: seconds the guest runs on after the source is gone (swap mode: after
                  the destination daemon is gone too) (default 30: the acceptance checks look at the
                  30 s after completion)
  --mig-modes L   migrate suite: the contenders, comma-separated, from precopy, postcopy, file, swap,
                  file-tls, swap-tls (-tls: migrate-vm --tls) (default the first four; umemd = file)
  --plot FILE     migrate suite: where to draw the rate plot (default docs/migration-rate.png)
  --swap-ws MIB   swap suite: the workload's working set    (default 256; the cgroup gets a quarter)
  --swap-remote RATE  swap suite, remote path: the servers in a network namespace behind a veth pair
                  shaped with tc tbf at RATE (e.g. 1gbit), attached over TCP through a delay line on
                  the server's side (delayproxy.c; this kernel has no netem)
  --swap-delay-us US  swap suite, remote path: how long the delay line holds the server's replies
                  (default 200)
  --halt-poll-ns NS   swap suite: how long an idle vCPU polls before it halts, for the run (the guest
                  haltpoll driver's guest_halt_poll_ns; restored after; default: leave it as it is)
  --hang-runs N   hang suite: guest boots                   (default 30)
  --hang-mode M   hang suite: remote, local or local-cgroup (default remote)
  --markdown      print the report as Markdown (for BENCHMARKS.md)
  --check         exit 1 if an acceptance criterion is not met (default: only report it)
  --no-build      do not install packages or build; use $NBD_UMEMD or .build/release/nbd-umemd
  --aa            A/A calibration: run a second `nbdkit file F` in place of nbd-umemd (no build),
                  to see how far two identical servers drift apart on this machine (core only)
  -h, --help      show this help

Progress goes to stderr, the report to stdout.
"""

BASE_TOOLS = "libnbd-dev libnbd-bin python3-libnbd nbdkit qemu-utils fio pkg-config"


class Options:
    def __init__(self):
        env = os.environ.get
        self.rounds = env("BENCH_ROUNDS", "5")
        self.runtime = env("BENCH_RUNTIME", "5")
        self.ramp = env("BENCH_RAMP", "1")
        self.size = env("BENCH_SIZE", "1G")
        self.suite = env("BENCH_SUITE", "")
        self.markdown = self.check = self.aa = False
        self.build = True
        self.mig_rounds = env("BENCH_MIG_ROUNDS", "3")
        self.mig_mem, self.mig_link, self.mig_keep, self.plot = "192", "200mbit", "30", ""
        self.mig_modes = "precopy,postcopy,file,swap"
        self.swap_ws, self.swap_remote, self.swap_delay_us, self.hang_runs = "256", "", "200", "30"
        self.hang_mode = "remote"
        self.halt_poll_ns = None


# option -> (attribute, what it needs, accepts --opt=VALUE)
VALUED = {
    "--rounds": ("rounds", "a value", True), "--runtime": ("runtime", "a value", True),
    "--ramp": ("ramp", "a value", True), "--size": ("size", "a value", True), "--suite": ("suite", "a value", True),
    "--mig-rounds": ("mig_rounds", "a value", False), "--mig-mem": ("mig_mem", "a value", False),
    "--mig-link": ("mig_link", "a value", False), "--mig-keep": ("mig_keep", "a value", False),
    "--mig-modes": ("mig_modes", "a list", False),
    "--plot": ("plot", "a file", False), "--swap-ws": ("swap_ws", "a value", False),
    "--swap-remote": ("swap_remote", "a rate", False), "--swap-delay-us": ("swap_delay_us", "a value", False),
    "--hang-runs": ("hang_runs", "a value", False),
    "--hang-mode": ("hang_mode", "a value", False),
    "--halt-poll-ns": ("halt_poll_ns", "a value", False),
}
FLAGS = {"--markdown": ("markdown", True), "--check": ("check", True), "--no-build": ("build", False), "--aa": ("aa", True)}


def check_ranges(o, ranges):
    """Each (attribute, lo, hi, unit): a whole number in lo..hi, or a fatal error that says so."""
    for attr, lo, hi, unit in ranges:
        v = getattr(o, attr)
        if re.fullmatch(r"[0-9]+", v) is None or not lo <= int(v) <= hi:
            die("--%s must be %d..%d%s, got '%s'" % (attr.replace("_", "-"), lo, hi, unit, v))


def parse(argv):
    o = Options()
    args = list(argv)
    while args:
        a = args.pop(0)
        name, eq, value = a.partition("=")
        if a in VALUED:
            if not args:
                die("%s needs %s" % (a, VALUED[a][1]))
            setattr(o, VALUED[a][0], args.pop(0))
        elif eq and name in VALUED and VALUED[name][2]:
            setattr(o, VALUED[name][0], value)
        elif a in FLAGS:
            setattr(o, *FLAGS[a])
        elif a in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        else:
            sys.stderr.write(USAGE)
            die("unknown argument: %s" % a)

    check_ranges(o, [("rounds", 1, 100, ""), ("runtime", 1, 600, " seconds"), ("ramp", 0, 60, " seconds")])
    size = subprocess.run(["numfmt", "--from=iec", re.sub(r"[bB]$", "", o.size)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    if size.returncode != 0:
        die("--size: cannot parse '%s' (use e.g. 1G, 512M)" % o.size)
    o.size_bytes = int(size.stdout)
    if o.size_bytes < 16 * 1024 * 1024:
        die("--size must be at least 16M")
    if o.size_bytes % 1048576:
        die("--size must be a multiple of 1M")
    if not o.suite:
        o.suite = "core" if o.aa else "all"
    if o.suite not in ("core", "lazy", "prefetch", "migrate", "tls", "swap", "sync", "hang", "all"):
        die("--suite must be core, lazy, prefetch, migrate, tls, swap, sync, hang or all, got '%s'" % o.suite)
    check_ranges(o, [("mig_rounds", 1, 20, ""), ("mig_mem", 64, 4096, " MiB"), ("mig_keep", 1, 600, " seconds"),
                     ("swap_ws", 64, 8192, " MiB"), ("swap_delay_us", 0, 1000000, " µs"), ("hang_runs", 1, 1000, "")])
    if o.halt_poll_ns is not None:
        check_ranges(o, [("halt_poll_ns", 0, 10000000, " ns")])
        o.halt_poll_ns = int(o.halt_poll_ns)
        if o.suite != "swap":
            die("--halt-poll-ns only applies to the swap suite (use --suite swap)")
    if o.hang_mode not in ("remote", "local", "local-cgroup"):
        die("--hang-mode must be remote, local or local-cgroup, got '%s'" % o.hang_mode)
    if o.swap_remote and not re.fullmatch(r"[0-9]+[kmg]?bit", o.swap_remote):
        die("--swap-remote wants a tc rate such as 1gbit, got '%s'" % o.swap_remote)
    if not re.fullmatch(r"[0-9]+[kmg]?bit", o.mig_link):
        die("--mig-link wants a tc rate such as 200mbit, got '%s'" % o.mig_link)
    modes = [{"umemd": "file"}.get(m, m) for m in o.mig_modes.split(",") if m]
    bad = [m for m in modes if m not in suites.MIG_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        die("--mig-modes wants distinct modes from %s, got '%s'" % (",".join(suites.MIG_MODES), o.mig_modes))
    o.mig_modes = modes   # (round 1 runs them in this order; each round starts one later)
    o.plot = o.plot or os.path.join(ROOT, "docs", "migration-rate.png")
    if o.aa and o.suite != "core":
        die("--aa only applies to the core suite (use --suite core)")
    for k in ("rounds", "runtime", "ramp", "mig_rounds", "mig_mem", "mig_keep", "swap_ws", "swap_delay_us", "hang_runs"):
        setattr(o, k, int(getattr(o, k)))
    return o


def setup(o, run):
    """Packages, the binary and the tools the chosen suites need; returns the nbd-umemd path."""
    if o.build:
        ensure_packages()
        if "migrate" in run:
            ensure_packages("python3-matplotlib", "iproute2", "fuse3")
        if "tls" in run:
            ensure_packages("gnutls-bin", "curl")
        if "hang" in run:
            ensure_packages("qemu-system-x86", "busybox-static", "cpio", "nbd-client")
        if "swap" in run:
            ensure_packages("nbd-server", "fuse3", "gcc", "libc6-dev", "util-linux", "iproute2")
    umemd = None
    if not o.aa:
        if o.build:
            log("building nbd-umemd (release)")
            umemd = build_release()
        else:
            umemd = umemd_binary()
        if not os.access(umemd, os.X_OK):
            die("nbd-umemd binary not found at %s" % umemd)
    for tool in ["fio", "nbdkit", "python3", "numfmt", "timeout"] + (["nbdcopy"] if "lazy" in run else []):
        if shutil.which(tool) is None:
            die("%s not found (install: %s)" % (tool, BASE_TOOLS))
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if subprocess.run(["fio", "--enghelp=nbd"], **quiet).returncode != 0:
        die("this fio has no nbd ioengine")
    if "lazy" in run:
        for plugin in ("file", "nbd"):
            if subprocess.run(["nbdkit", plugin, "--dump-plugin"], **quiet).returncode != 0:
                die("nbdkit has no %s plugin" % plugin)
        for filt in ("delay", "cow"):
            if subprocess.run(["nbdkit", "--filter=" + filt, "null", "--dump-plugin"], **quiet).returncode != 0:
                die("nbdkit has no %s filter" % filt)
    return umemd


def main(argv):
    o = parse(argv)
    run = ["core", "lazy", "prefetch", "migrate"] if o.suite == "all" else [o.suite]
    umemd = setup(o, run)
    work = tempfile.mkdtemp(prefix="nbd-bench.", dir="/tmp")
    b = suites.Bench(o, umemd, work)
    try:
        if set(run) & {"core", "lazy", "prefetch", "tls"}:
            st = os.statvfs("/dev/shm")
            if st.f_bavail * st.f_frsize <= o.size_bytes + 64 * 1048576:
                die("not enough space in /dev/shm for %s" % o.size)
            fd, b.img = tempfile.mkstemp(prefix="nbd-bench.", dir="/dev/shm")
            log("filling %s with %s of random data" % (b.img, o.size))
            with os.fdopen(fd, "wb") as f:
                left = o.size_bytes
                while left:
                    f.write(os.urandom(min(left, 1 << 24)))
                    left -= min(left, 1 << 24)
            if os.path.getsize(b.img) != o.size_bytes:
                die("%s has the wrong size" % b.img)
        met = True
        for i, name in enumerate(run):
            if i:
                print()
                sys.stdout.flush()
            run_suite = ({"swap": swapbench.run_swap, "sync": swapbench.run_sync, "hang": swapbench.run_hang}.get(name)
                         or getattr(suites, "run_" + name))
            met = run_suite(b) and met
            sys.stdout.flush()
        return 1 if o.check and not met else 0
    finally:
        if b.img:
            os.unlink(b.img)
        shutil.rmtree(work, ignore_errors=True)


def entry():
    set_prog("bench")
    sys.exit(run_main(main, sys.argv[1:]))
