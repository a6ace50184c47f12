"""scripts/migrate-vm: the command line, the checks and the working directory around a Migration."""
import os
import re
import shutil
import sys
import tempfile

from . import migration, vm
from .common import Fatal, build_no_hugepage, build_release, die, ensure_packages, log, run_main, set_prog, umemd_binary

USAGE = """\
Usage: scripts/migrate-vm [--mode swap|file|precopy|postcopy] [--mem MIB] [--work MIB] [--run-before S]
                          [--keep S] [--link-rate RATE] [--link-delay MS] [--prefetch MODE]
                          [--source-outage S[@AFTER]] [--fail-dest] [--fail-gate] [--ungated] [--tls] [--dir DIR]

Boots a test VM (Debian's kernel, a busybox initramfs running `nbd-mmap work`, which verifies and
rewrites a working set of --work MiB continuously and prints its progress on the serial console)
on the source host and migrates it. Both hosts are network namespaces on this machine, joined by a
veth pair. Four modes:

file (`umemd` is the same): the destination's RAM is a block device on nbd-umemd
  source host (netns, 10.200.0.1)         destination host (netns, 10.200.0.2)
    QEMU, RAM = memory-backend-file           nbd-umemd serve --source nbd://10.200.0.1 --gated
      share=on on /dev/shm/RAMFILE            scripts/attach -> block device
    nbd-umemd serve --file RAMFILE            QEMU -incoming, RAM = memory-backend-file on the device
      --readonly (+ nbdkit delay proxy)

  x-ignore-shared on both QEMUs, so the migration stream carries device state only; the destination
  daemon pulls nothing until the source QEMU reports STOP (its RAM is still changing until then),
  then its gate opens. After the destination daemon reports every page local, the device is read
  once into the page cache (the guest's first touches of the remaining pages then need no I/O) and
  the source QEMU and export are shut down; the VM keeps running on the destination for --keep
  seconds (default 10), the daemon's NBD writes since completion are read from its status, the
  destination's page cache is dropped and all guest RAM re-read (no source left to ask). The VM
  keeps depending on the daemon, its device and store for as long as it runs.

swap (default): post-copy through swap; at the end the VM depends on nothing
  The same source. On the destination: `nbd-umemd serve --source URI --swap-size MEM+64M --gated
  --swap` (a swap export whose slots map to source pages; its memory locked), attached with
  `scripts/attach --swap`, mkswap and swapon -p 32767 (system-wide swap while it is on); then
  `nbd-umemd stage --ram /dev/shm/RAMFILE-dst` creates the destination's RAM file on tmpfs and stages
  every non-zero page of it as already swapped out, to a slot the daemon maps to the source page.
  The destination QEMU (stock, no wrapper) maps that tmpfs file (memory-backend-file share=on) and
  starts with -S (as libvirt starts a destination); x-ignore-shared on both sides. On the source's
  STOP the gate opens while the device state goes over (pages that turned non-zero since staging
  are copied straight into the RAM file: the reply's late_pages); once both are done, `cont` starts
  the destination. If the gate does not open, the source gets the VM back (migrate_cancel, or
  `cont` once its side has completed) and the destination never ran. The guest's first touch of
  a page is a swap-in that the daemon serves from the source; its background pull brings the rest.
  swapoff starts once the daemon expects the pull to end within 1 s (it reads the slots still
  swapped out, from the local store once they are there); once every slot is local the source is
  shut down, and when swapoff ends the device is detached, the daemon stopped and the store
  removed. What is left behind: only the destination QEMU with its RAM in /dev/shm (no daemon,
  device, store or swap entry; migrate-vm checks and reports that). The VM then runs on for --keep
  seconds.

precopy, postcopy: the same VM migrated the way QEMU does on its own, for comparison (scripts/bench
  --suite migrate): no nbd-umemd; the destination's RAM is a file in /dev/shm and the RAM pages go
  through the migration stream, with QEMU's auto-converge (precopy) or postcopy-ram switched on at
  once (userfaultfd on the destination). max-bandwidth is raised to 10 GB/s in both, so only the link
  limits them.

The report is one `REPORT {json}` line (also in DIR/report.json): downtime (QEMU's, and the guest's:
the destination's RESUME minus the source's STOP, both as QEMU stamped them), destination resume, first
progress on the destination, all RAM local, source gone, bytes and packets on the link, demand misses,
the guest's rate before/during/after and over time, data errors; and for the nbd-umemd modes the NBD
writes the destination daemon served after completion; for swap mode also staging_ms (and its
phases), late_pages, swapoff_ms, independent_ms (from `migrate` until nothing but the destination
QEMU is left) and leftovers_after_independent.

Every step checks its result. A failure before the switch-over leaves the source VM running and
removes what was set up on the destination (swap mode: swapoff, detach, daemon stopped, RAM file and
store removed); then the source side is stopped too, at exit. Every exit path (errors, SIGINT,
SIGTERM) turns off a swap device this run turned on.

  --mode MODE          swap (default), file (umemd is an alias), precopy or postcopy
  --mem MIB            guest RAM (default 256)          --work MIB   working set (default MEM/2)
  --run-before S       seconds on the source first (3)  --keep S     seconds on the destination (10;
                       swap mode: counted from independence)
  --link-rate RATE     tc tbf rate on the veth pair (e.g. 200mbit); default unlimited
  --link-delay MS      add MS ms per read between the destination daemon and the source export
                       (an nbdkit --filter=delay proxy; this kernel has no netem)
  --prefetch MODE      the destination's background pull: adaptive (default), sequential, off
  --read-ahead KB      file mode: the destination device's read_ahead_kb (default 64: a guest page
                       fault reads at most 64 KiB of what is absent; the background pull brings the
                       rest). Swap mode: swap-in read-ahead is vm.page-cluster's
  --thp                file mode: let the destination QEMU mark its RAM MADV_HUGEPAGE (by default it
                       runs under scripts/no-hugepage.c: with huge pages every fault reads 4 MiB)
  --dest-args "ARGS"   more arguments for the destination's `nbd-umemd serve` (e.g. "--max-rate 10M")
  --source-outage S[@AFTER]  file and swap modes: kill the source export AFTER s (default 0.5) after
                       the switch-over, restart it S s later: the guest stalls on missing pages, then
                       continues
  --fail-dest          make the destination QEMU fail to start (tests the undo path)
  --fail-gate          swap mode: make the gate open at the switch-over fail (the harness's own
                       control socket refuses it after 0.5 s; tests giving the VM back to a source
                       that has already sent everything)
  --tls                file and swap modes: the NBD link runs over TLS with a pre-shared key made for
                       this migration (DIR/keys.psk, identity "umemd", 256 bits): the source export
                       requires TLS (--tls require --tls-psk), the destination daemon pulls from
                       nbds://umemd@SOURCE/ (--source-tls-psk). Before migrating, a client with
                       another key and a plain client are checked to be refused (report: tls)
  --ungated            (tests only, file mode) no pull gate: the destination pulls while the source
                       VM still runs, which is what the gate exists to prevent (expect data errors)
  --dir DIR            working directory (default: a new one under /tmp, removed unless --keep-dir)
  --keep-dir           keep the working directory (consoles, logs, report.json)
Needs root, qemu-system-x86, nbdkit, nbd-client tools (installed if missing); swap mode needs zswap
off and a memory cgroup controller (the stager checks).
"""


class Options:
    mode, mem, work, dest_args, read_ahead, thp, run_before, keep = "swap", "256", "", "", "64", False, "3", "10"
    link_rate, link_delay, prefetch, outage, fail_dest, ungated, dir, keep_dir = "", "", "adaptive", "", False, False, "", False
    fail_gate = False
    tls = False


VALUED = {"--mode": "mode", "--mem": "mem", "--work": "work", "--run-before": "run_before", "--keep": "keep",
          "--link-rate": "link_rate", "--link-delay": "link_delay", "--prefetch": "prefetch", "--dest-args": "dest_args",
          "--read-ahead": "read_ahead", "--source-outage": "outage", "--dir": "dir"}
FLAGS = {"--thp": "thp", "--fail-dest": "fail_dest", "--fail-gate": "fail_gate", "--ungated": "ungated",
         "--keep-dir": "keep_dir", "--tls": "tls"}


def parse(argv):
    o = Options()
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        elif a in VALUED:
            # (every value must be non-empty, except --dest-args)
            if not args or (args[0] == "" and a != "--dest-args"):
                die("%s needs a value" % a)
            setattr(o, VALUED[a], args.pop(0))
        elif a in FLAGS:
            setattr(o, FLAGS[a], True)
        else:
            die("unknown option %s (see --help)" % a)
    if os.getuid() != 0:
        die("needs root (network namespaces, loop devices, QEMU)")
    if not (re.fullmatch(r"[0-9]+", o.mem) and int(o.mem) >= 64):
        die("--mem wants MiB, at least 64")
    o.mem = int(o.mem)
    o.work = o.work or str(o.mem // 2)
    if not (re.fullmatch(r"[0-9]+", o.work) and int(o.work) < o.mem):
        die("--work wants MiB, less than --mem")
    o.work = int(o.work)
    if o.mode == "umemd":       # the file mode's old name
        o.mode = "file"
    if o.mode in ("precopy", "postcopy"):
        if o.link_delay or o.outage or o.ungated:
            die("--link-delay, --source-outage and --ungated apply to --mode file and swap only")
    elif o.mode == "swap":
        if o.ungated:
            die("--ungated applies to --mode file only")
    elif o.mode != "file":
        die("--mode must be file (or umemd), swap, precopy or postcopy")
    if o.tls and o.mode not in ("file", "swap"):
        die("--tls applies to --mode file and swap (the NBD link)")
    if o.tls and o.link_delay:
        die("--tls and --link-delay cannot be used together (the delay proxy speaks plain NBD)")
    if o.fail_gate and o.mode != "swap":
        die("--fail-gate applies to --mode swap only")
    if o.prefetch not in ("adaptive", "sequential", "off"):
        die("--prefetch must be adaptive, sequential or off")
    if o.link_delay and not re.fullmatch(r"[0-9]+", o.link_delay):
        die("--link-delay wants whole milliseconds")
    o.outage_s, o.outage_at = "", 0.5
    if o.outage:
        o.outage_s, at, after = o.outage.partition("@")
        if at:
            o.outage_at = float(after)
        if not re.fullmatch(r"[0-9]+", o.outage_s):
            die("--source-outage wants whole seconds (S or S@AFTER)")
    return o


def main(argv):
    o = parse(argv)
    ensure_packages("iproute2", "fuse3", "python3")
    umemd = umemd_binary()
    if not os.access(umemd, os.X_OK):
        umemd = build_release()
    kernel = vm.guest_kit()
    no_hugepage = build_no_hugepage()
    if o.dir:
        os.makedirs(o.dir, exist_ok=True)
        directory = os.path.abspath(o.dir)
    else:
        directory = tempfile.mkdtemp(prefix="migrate-vm.", dir="/tmp")
    os.environ["NBD_UMEMD_STATE_DIR"] = os.path.join(directory, "state")
    m = migration.Migration(o, umemd, kernel, directory)
    m.no_hugepage = no_hugepage
    rc = 1
    try:
        m.run()
        rc = 0
    except Fatal as e:
        log("error: %s" % e)
    except migration.FailedBeforeSwitch:
        pass
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        m.close()
        if not o.keep_dir and rc == 0:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            log("working directory kept: %s" % directory)
    return rc


def entry():
    set_prog("migrate-vm")
    import signal
    sys.exit(run_main(main, sys.argv[1:], signals={signal.SIGINT: 130, signal.SIGTERM: 130}))
