"""Two "hosts" on one machine: network namespaces joined by a veth pair, the link shaped with tc tbf
(this kernel has no netem: latency comes from an nbdkit --filter=delay proxy instead).

    hosts = HostPair(tag, "10.200.0.1", "10.200.0.2", rate="200mbit")
    hosts.setup()                 # fatal on failure; close() undoes whatever was created
    hosts.src.cmd(["qemu-system-x86_64", ...])     # argv that runs inside the source namespace
    hosts.tx_bytes()              # bytes the source host has sent on the link so far
    hosts.close()

Only the namespaces' own 10.200.0.0/24 addresses (and loopback) are ever targets of test traffic.
"""
import subprocess

from .common import die


def _run(argv):
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


class Host:
    def __init__(self, ns, ip, dev):
        self.ns, self.ip, self.dev = ns, ip, dev

    def cmd(self, argv):
        """ARGV run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns] + list(argv)

    def read(self, path):
        """A file as this namespace sees it (/sys/class/net, /proc/net)."""
        return subprocess.run(self.cmd(["cat", path]), stdout=subprocess.PIPE, check=True).stdout.decode()


class HostPair:
    def __init__(self, tag, src_ip, dst_ip, rate=None):
        self.src = Host("umemd-src-%s" % tag, src_ip, "ums%s" % tag)
        self.dst = Host("umemd-dst-%s" % tag, dst_ip, "umd%s" % tag)
        self.rate = rate
        self.created = []

    def setup(self):
        for h in (self.src, self.dst):
            if not _run(["ip", "netns", "add", h.ns]):
                die("cannot create network namespaces")
            self.created.append(h.ns)
        if not _run(["ip", "link", "add", self.src.dev, "type", "veth", "peer", "name", self.dst.dev]):
            die("cannot create the veth pair")
        for h in (self.src, self.dst):
            ok = (_run(["ip", "link", "set", h.dev, "netns", h.ns])
                  and _run(["ip", "-n", h.ns, "addr", "add", h.ip + "/24", "dev", h.dev])
                  and _run(["ip", "-n", h.ns, "link", "set", h.dev, "up"])
                  and _run(["ip", "-n", h.ns, "link", "set", "lo", "up"]))
            if not ok:
                die("cannot set up %s in %s" % (h.dev, h.ns))
        # Both hosts, every mode: a connection that idled (QEMU's migration stream between setup and
        # STOP, an NBD connection between misses) keeps its congestion window, and starts with a
        # send buffer that takes the device state at STOP without blocking (BENCHMARKS.md).
        for h in (self.src, self.dst):
            _run(h.cmd(["sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"]))
            _run(h.cmd(["sysctl", "-q", "-w", "net.ipv4.tcp_wmem=4096 1048576 4194304"]))
        if self.rate:
            for h in (self.src, self.dst):
                if not _run(h.cmd(["tc", "qdisc", "add", "dev", h.dev, "root", "tbf", "rate", self.rate, "burst", "256kb",
                                   "latency", "50ms"])):
                    die("tc tbf rate %s failed" % self.rate)
        if not _run(["ip", "-n", self.dst.ns, "route", "get", self.src.ip]):
            die("the destination namespace has no route to %s" % self.src.ip)

    def tx_bytes(self):
        return int(self.src.read("/sys/class/net/%s/statistics/tx_bytes" % self.src.dev))

    def tx_packets(self):
        return int(self.src.read("/sys/class/net/%s/statistics/tx_packets" % self.src.dev))

    def tcp_retransmits(self):
        """TCP segments the source host has sent again so far."""
        lines = [l.split() for l in self.src.read("/proc/net/snmp").splitlines() if l.startswith("Tcp:")]
        return int(lines[1][lines[0].index("RetransSegs")])

    def close(self):
        """Deletes the namespaces (the veth pair and its qdiscs go with them)."""
        while self.created:
            _run(["ip", "netns", "del", self.created.pop()])
