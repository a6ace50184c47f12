"""scripts/demo: the migration demo (scripts/migrate-vm, its figures) and the lazy-paging demo
(--lazy: servers started and stopped through umemd_harness.servers)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from .common import ROOT, Fatal, build_release, die, ensure_packages, log, run_main, set_prog, umemd_binary
from .servers import Server

HELP = """\
scripts/demo: a short end-to-end demo of nbd-umemd on a fresh Debian machine.

Default: live migration. Installs what it needs, builds the release binary and a test VM (Debian's
kernel, a busybox initramfs whose workload verifies and rewrites half of guest RAM continuously),
and live-migrates the running VM with scripts/migrate-vm between two network namespaces over a
200 Mbit/s link in swap mode: the destination's RAM is staged as swapped out to an nbd-umemd swap
device, the destination QEMU starts at once and its swap-ins follow from the source, the source is
shut down once every page is local, swapoff brings in the rest and the daemon, device and store go:
the VM runs on plain memory. (With zswap on, swap mode cannot stage: the file mode then.) Prints
the figures (downtime, time until the guest progresses on the destination, time until all RAM is
local and until the VM depends on nothing, bytes, data errors). Needs root. Exits non-zero on any
data error or anything left behind.

--lazy: the lazy-paging demo instead (no root, no VM): makes a 64 MiB partly sparse image, serves
it, inspects it with nbdinfo, copies it back with nbdcopy, writes through a --memory export, then
serves the image lazily through a second nbd-umemd and shows pages pulled on demand until it is
complete, then once more with the background pull, and stops the servers with SIGTERM.

Usage: scripts/demo [--lazy] [--no-build]   (--no-build: use $NBD_UMEMD or .build/release/nbd-umemd)
"""

BASE_PACKAGES = "libnbd-dev libnbd-bin python3-libnbd nbdkit qemu-utils fio pkg-config"


def out(text=""):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def say(text):
    out("\n== %s" % text)


def binary(build, packages=()):
    if build:
        ensure_packages(*packages)
        umemd = build_release()
    else:
        umemd = umemd_binary()
    if not os.access(umemd, os.X_OK):
        die("nbd-umemd binary not found at %s" % umemd)
    return umemd


# ---- the migration demo ----------------------------------------------------------------------------
FIGURES = [
    ("migration mode", lambda r: r["mode"]),
    ("RAM staged as swapped out before `migrate` (swap)", lambda r: "%s ms" % r["staging_ms"]),
    ("downtime (QEMU's: source stop to end of stream)", lambda r: "%s ms" % r["downtime_ms"]),
    ("guest downtime (source STOP to destination RESUME)", lambda r: "%s ms" % r["guest_downtime_ms"]),
    ("guest making progress on the destination after", lambda r: "%s ms" % r["first_progress_on_destination_ms"]),
    ("all guest RAM local on the destination after", lambda r: "%s ms" % r["all_ram_local_ms"]),
    ("VM depending on nothing but its QEMU after (swap)", lambda r: "%s ms (swapoff %s ms, %s things left)" % (
        r["independent_ms"], r["swapoff_ms"], r["leftovers_after_independent"])),
    ("bytes sent by the source host (link)", lambda r: "{:,}".format(r["link_bytes"])),
    ("page faults that waited for the source", lambda r: "%s (p50 %.1f ms, p99 %.1f ms)" % (
        r["demand_misses"], (r["miss_latency_p50_us"] or 0) / 1000, (r["miss_latency_p99_us"] or 0) / 1000)),
    ("guest rate before / during / after, page-ops/s", lambda r: "%s / %s / %s" % (
        r["rate_before_ops"], r["rate_during_ops"], r["rate_after_ops"])),
    ("seconds the guest ran with the source gone", lambda r: "%s" % r["seconds_run_after_source_gone"]),
    ("NBD writes to the daemon after completion", lambda r: "%s" % r["writes_after_complete"]),
    ("all RAM re-read with the source gone (file)", lambda r: {True: "ok", False: "FAILED"}.get(
        r["reread_without_source"], "None")),
    ("data errors seen by the guest", lambda r: "%s" % r["data_errors"]),
]


def zswap_on():
    try:
        with open("/sys/module/zswap/parameters/enabled") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def migrate_demo(build):
    if os.getuid() != 0:
        die("the migration demo needs root (network namespaces, a loop device, QEMU); try scripts/demo --lazy")
    if build:
        out("\n== installing packages (if missing) and building nbd-umemd in release mode")
    binary(build, ("iproute2", "fuse3", "python3"))
    mode = "swap"
    if zswap_on():
        # swap mode's staging needs every staged page on the device itself, which zswap would keep
        out("\n== zswap is on here: swap mode cannot stage, so the demo uses the file mode")
        mode = "file"
    out("\n== live-migrating a 160 MiB VM (64 MiB working set) over a 200 Mbit/s link, %s mode" % mode)
    args = ["--mode", mode, "--mem", "160", "--work", "64", "--link-rate", "200mbit", "--run-before", "2", "--keep", "5"]
    out("$ scripts/migrate-vm " + " ".join(args))
    proc = subprocess.Popen([os.path.join(ROOT, "scripts", "migrate-vm")] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    report = None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line.startswith("REPORT "):
            report = json.loads(line[len("REPORT "):])
        elif line.startswith("[migrate-vm]") and "report:" not in line:
            out(line)
    rc = proc.wait()
    if rc != 0 or report is None:
        die("the migration failed (scripts/migrate-vm exited %d)" % rc)
    out("\n== figures")
    for k, v in FIGURES:
        try:
            text = v(report)
        except (KeyError, TypeError):
            continue
        if "None" not in text:
            out("  %-52s %s" % (k, text))
    if report["data_errors"] != 0:
        return 1
    if mode == "file" and not report["reread_without_source"]:
        return 1
    if mode == "swap" and report["leftovers_after_independent"] != 0:
        return 1
    out("\ndemo OK: the VM moved with zero data errors and runs on without its source%s" % (
        ", with no daemon, device, store or swap entry left behind" if mode == "swap" else ""))
    return 0


# ---- the lazy-paging demo ----------------------------------------------------------------------------
def run(*argv):
    """Prints the command and runs it (60 s at most); fatal if it fails."""
    out("$ " + " ".join(shlex.quote(a) for a in argv))
    rc = subprocess.run(["timeout", "60"] + list(argv)).returncode
    if rc != 0:
        die("%s exited with status %d" % (argv[0], rc))


def same(a, b, msg):
    if subprocess.run(["cmp", a, b]).returncode != 0:
        die(msg)


class LazyDemo:
    def __init__(self, umemd, tmp):
        self.umemd, self.tmp = umemd, tmp
        self.servers = {}

    def p(self, name):
        return os.path.join(self.tmp, name)

    def spawn(self, key, name, args):
        """nbd-umemd serve ARGS with its pidfile and log in TMP/KEY.{pid,log}; prints the command."""
        pidfile = self.p(key + ".pid")
        argv = [self.umemd, "serve"] + args + ["--pidfile", pidfile]
        out("$ " + " ".join(shlex.quote(a) for a in argv) + " &")
        srv = Server(name, argv, pidfile, self.p(key + ".log"), announce=False)
        self.servers[key] = srv
        srv.start()
        return srv

    def status(self, ctl):
        res = subprocess.run([self.umemd, "status", "--control", self.p(ctl)], stdout=subprocess.PIPE)
        return res.stdout.decode().strip()

    def close(self):
        for srv in self.servers.values():
            srv.stop()

    def run(self):
        umemd, p = self.umemd, self.p
        img, sock, memsock = p("disk.img"), p("file.sock"), p("mem.sock")
        uri, memuri = "nbd+unix:///?socket=" + sock, "nbd+unix:///?socket=" + memsock

        # --- 2. a partly sparse image --------------------------------------------------------------
        say("making a 64 MiB image: holes everywhere except four regions of random data")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
            # region: offset and length in KiB (all multiples of 64 KiB)
            for off, length in ((0, 1024), (8192, 4096), (30720, 512), (61440, 4096)):
                out("  random data at %d.%d MiB, %d KiB" % (off // 1024, (off % 1024) * 100 // 1024, length))
                f.seek(off << 10)
                f.write(os.urandom(length << 10))

        def du(*a):
            return subprocess.run(["du", "-h"] + list(a) + [img], stdout=subprocess.PIPE).stdout.decode().split("\t")[0]
        out("  apparent size: %s, allocated on disk: %s" % (du("--apparent-size"), du()))

        # --- 3. serve it ---------------------------------------------------------------------------
        say("serving the image with nbd-umemd on a Unix socket")
        srv = self.spawn("file", "nbd-umemd", ["--file", img, "--unix", sock])
        out("listening, pid %d" % srv.pid)
        say("what a client sees: nbdinfo")
        run("nbdinfo", uri)
        say("allocation map (holes vs data): nbdinfo --map")
        run("nbdinfo", "--map", uri)
        run("nbdinfo", "--map", "--totals", uri)

        # --- 4. read it all back -------------------------------------------------------------------
        say("copying the export back to a local file with nbdcopy and comparing")
        run("nbdcopy", uri, p("copy.img"))
        same(img, p("copy.img"), "the copy read through nbd-umemd differs from the image")
        out("demo: data verified")

        # --- 5. write through the server -----------------------------------------------------------
        say("writing the image into a fresh --memory 64M export, then reading it back")
        srv = self.spawn("mem", "nbd-umemd (memory)", ["--memory", "64M", "--unix", memsock])
        out("listening, pid %d" % srv.pid)
        run("nbdinfo", "--size", memuri)
        run("nbdcopy", img, memuri)
        run("nbdcopy", memuri, p("back.img"))
        same(img, p("back.img"), "data written through the memory export came back different")
        out("demo: write path verified (memory export holds the same 64 MiB)")
        run("nbdinfo", "--map", "--totals", memuri)

        # --- 6. lazy paging ------------------------------------------------------------------------
        lazysock = p("lazy.sock")
        lazyuri = "nbd+unix:///?socket=" + lazysock
        say("lazy paging: a second nbd-umemd serves the first one's export, pulling pages on first access")
        srv = self.spawn("lazy", "nbd-umemd (lazy)", ["--source", uri, "--store", p("store"), "--prefetch", "off",
                                                      "--unix", lazysock, "--control", p("lazy.ctl")])
        out("listening, pid %d; the source's holes are already local, its data is not:" % srv.pid)
        run(umemd, "status", "--control", p("lazy.ctl"))
        say("two reads (a page-fault-sized one and a 64 KiB one) pull only what they touch")
        run("qemu-io", "-r", "-f", "raw", lazyuri, "-c", "read 8200k 4k", "-c", "read 60M 64k")
        run(umemd, "status", "--control", p("lazy.ctl"))
        say("copying the whole lazy export: everything else is pulled once, then the source is no longer needed")
        run("nbdcopy", lazyuri, p("lazy.img"))
        same(img, p("lazy.img"), "the lazy export differs from the image")
        out("demo: lazy export verified")
        st = self.status("lazy.ctl")
        out(st)
        if '"complete": true' not in st:
            die("the lazy export did not report completion")

        # --- 6b. background pull -------------------------------------------------------------------
        bgsock = p("bg.sock")
        say("background pull: a third nbd-umemd (fresh store, default --prefetch adaptive, capped at 16 MiB/s) with no client")
        self.spawn("bg", "nbd-umemd (background)", ["--source", uri, "--store", p("bgstore"), "--max-rate", "16M",
                                                    "--unix", bgsock, "--control", p("bg.ctl")])
        for i in range(600):
            st = self.status("bg.ctl")
            if '"complete": true' in st:
                break
            if i % 10 == 0:
                j = json.loads(st)
                out("  %5.1f%% local, %.1f MB/s, ETA %s s" % (100 * j["progress"], j["background_rate_bps"] / 1e6,
                                                               j["eta_seconds"]))
            time.sleep(0.1)
        out(st)
        if '"complete": true' not in st:
            die("the background pull did not complete within 60 s")
        run("nbdcopy", "nbd+unix:///?socket=" + bgsock, p("bg.img"))
        same(img, p("bg.img"), "the background-pulled export differs from the image")
        out("demo: background pull verified")

        # --- 7. shut down --------------------------------------------------------------------------
        say("stopping the servers with SIGTERM")
        ok = True
        for key, name in (("bg", "background"), ("lazy", "lazy"), ("file", "file"), ("mem", "memory")):
            srv = self.servers.pop(key)
            out("$ kill -TERM %d" % srv.pid)
            rc = srv.stop(quiet=True)
            out("  %s server (pid %d) exited with status %d" % (name, srv.pid, rc))
            ok = ok and rc == 0
        for s in (sock, memsock, lazysock, bgsock):
            if os.path.exists(s):
                out("  note: socket file %s was left behind" % s)
        if not ok:
            die("a server did not exit 0 on SIGTERM")
        say("demo: all steps passed")
        return 0


def lazy_demo(build):
    if build:
        say("installing packages (if missing): %s" % BASE_PACKAGES)
        ensure_packages()
        say("building nbd-umemd in release mode")
    umemd = binary(build)
    for tool in ("nbdinfo", "nbdcopy", "qemu-io", "cmp", "timeout"):
        if shutil.which(tool) is None:
            die("%s not found (install: %s)" % (tool, BASE_PACKAGES))
    out("binary: %s" % umemd)
    tmp = tempfile.mkdtemp(prefix="nbd-demo.", dir="/tmp")
    demo = LazyDemo(umemd, tmp)
    rc = 1
    try:
        rc = demo.run()
    except Fatal as e:
        log("error: %s" % e)
    finally:
        demo.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if rc != 0:
            log("demo FAILED (exit status %d)" % rc)
    return rc


def main(argv):
    build, demo = True, "migrate"
    for a in argv:
        if a == "--no-build":
            build = False
        elif a == "--lazy":
            demo = "lazy"
        elif a in ("-h", "--help"):
            sys.stdout.write(HELP)
            return 0
        else:
            die("unknown argument: %s (try --help)" % a)
    return migrate_demo(build) if demo == "migrate" else lazy_demo(build)


def entry():
    set_prog("demo")
    sys.exit(run_main(main, sys.argv[1:]))
