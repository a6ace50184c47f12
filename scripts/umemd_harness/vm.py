"""The test VM and QEMU: the guest kit and initramfs (scripts/lib/guest.sh), QEMU's arguments, its
serial console stamped with the host time line by line, and QMP (scripts/lib/qmp.py).

The guest is Debian's kernel with a busybox initramfs; its /init (written by the caller) runs the
workload and prints lines on the serial console.
"""
import sys
import threading
import time

from .common import LIB, shell_lib

sys.path.insert(0, LIB)
import qmp  # noqa: E402  (scripts/lib/qmp.py)


def guest_kit():
    """Packages and the Debian kernel (downloaded once); returns the path of its vmlinuz."""
    return shell_lib('guest_kit >&2; printf %s "$GUEST_KERNEL"', libs=("common.sh", "guest.sh"))


def guest_initramfs(out, init):
    """OUT: the cached base initramfs plus INIT as /init and the nbd-mmap tool (guest.sh)."""
    shell_lib('guest_kit >&2 && guest_initramfs "$1" "$2"', out, init, libs=("common.sh", "guest.sh"))


def qemu_args(kernel, initrd, console, mem_mib, mem_path, append_extra=""):
    """qemu-system-x86_64 arguments for the guest under TCG with MEM_MIB of RAM in a shared
    memory-backend-file on MEM_PATH, its serial console written to CONSOLE (emptied here), the
    monitor nowhere (same as guest.sh's guest_qemu_args), no display adapter (its 16 MiB of video
    RAM would be migrated in every mode)."""
    open(console, "w").close()
    return ["-m", "%dM" % mem_mib,
            "-object", "memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on" % (mem_mib, mem_path),
            "-machine", "memory-backend=ram0",
            "-accel", "tcg", "-cpu", "max", "-nographic", "-vga", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 %s" % append_extra,
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-serial", "file:" + console, "-monitor", "none"]


class ConsoleStamper(threading.Thread):
    """Copies the lines of a console file (which QEMU writes) to OUT as they arrive, each prefixed
    with the host time ("%.6f LINE"): the time to progress and the rate over time come from it."""

    def __init__(self, console, out):
        super().__init__(daemon=True)
        open(console, "w").close()
        self.console, self.out = console, out
        self.done = threading.Event()

    def run(self):
        with open(self.console, "rb") as src, open(self.out, "w") as out:
            part = b""
            while not self.done.is_set():
                chunk = src.read(65536)
                if not chunk:
                    time.sleep(0.005)
                    continue
                now = time.time()
                part += chunk
                *done, part = part.split(b"\n")
                for line in done:
                    out.write("%.6f %s\n" % (now, line.decode("utf-8", "replace").replace("\r", "")))
                out.flush()

    def stop(self):
        self.done.set()
        self.join(2)


def qmp_cmd(sock, name, timeout=5, **args):
    """One QMP command; its return value (RuntimeError or OSError on failure)."""
    return qmp.QMP(sock, timeout=timeout).cmd(name, **args)


def console_has(path, needle):
    try:
        with open(path, "rb") as f:
            return any(line.startswith(needle) for line in f)
    except OSError:
        return False
