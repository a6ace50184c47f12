"""What every harness module shares: the project root, logging, fatal errors, packages, the binary.

Packages, the release build and the small C helpers come from scripts/lib/common.sh (and guest.sh),
run through `shell_lib`, so the shell scripts and the harness share one implementation of each.
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.path.join(ROOT, "scripts", "lib")
PYTHON = "/usr/bin/python3"

# The program name the messages carry ("[bench] ...", "[migrate-vm] ..."): set by the entry point.
PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "harness"


class Fatal(Exception):
    """A failure that ends the run: the entry point prints `[PROG] error: MESSAGE` and exits 1."""


def set_prog(name):
    global PROG
    PROG = name


def log(msg):
    sys.stderr.write("[%s] %s\n" % (PROG, msg))
    sys.stderr.flush()


def die(msg):
    raise Fatal(msg)


def run_main(main, argv, signals=None):
    """Runs main(argv) with `die` and signals turned into exit statuses (SIGINT 130, SIGTERM 143 or
    what `signals` maps them to): cleanup code in `finally` blocks and context managers runs."""
    import signal

    def handler(signum, _frame):
        raise SystemExit((signals or {}).get(signum, 128 + signum))

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        return main(argv)
    except Fatal as e:
        log("error: %s" % e)
        return 1


def shell_lib(script, *args, libs=("common.sh",), capture=True):
    """Runs bash `script` with scripts/lib/LIBS sourced (its $0 is PROG, so its log lines carry the
    same name); returns its stdout. A non-zero exit is fatal."""
    src = "".join('. "%s/%s"\n' % (LIB, lib) for lib in libs) + script
    res = subprocess.run(["bash", "-c", src, PROG] + list(args), stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        raise Fatal("%s failed (status %d)" % (script.split()[0], res.returncode))
    return res.stdout.decode() if capture else ""


def ensure_packages(*pkgs):
    """Installs the Debian packages that are missing (common.sh's ensure_packages)."""
    shell_lib('ensure_packages "${BASE_PACKAGES[@]}" "$@" >&2', *pkgs, capture=False)


def build_release():
    """Builds nbd-umemd in release mode; returns (and exports) its path."""
    path = shell_lib('build_release >&2; printf %s "$NBD_UMEMD"')
    os.environ["NBD_UMEMD"] = path
    return path


def umemd_binary():
    """$NBD_UMEMD, or .build/release/nbd-umemd, exported for the scripts the harness runs."""
    path = os.environ.get("NBD_UMEMD") or os.path.join(ROOT, ".build", "release", "nbd-umemd")
    os.environ["NBD_UMEMD"] = path
    return path


def build_no_hugepage():
    """.build/no-hugepage (scripts/no-hugepage.c), built when missing or older than its source."""
    return shell_lib('build_no_hugepage; printf %s "$NBD_NO_HUGEPAGE"')


def wait_for_file(path, seconds=20, alive=None):
    """Waits until PATH exists and is not empty; False after SECONDS or once alive() is False."""
    deadline = time.time() + seconds
    while True:
        try:
            if os.path.getsize(path) > 0:
                return True
        except OSError:
            pass
        if time.time() > deadline or (alive is not None and not alive()):
            return False
        time.sleep(0.05)


def read_text(path, default=""):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return default


def tail(path, n):
    """The last N lines of a file, joined by newlines (empty if it cannot be read)."""
    return "\n".join(read_text(path).splitlines()[-n:])
