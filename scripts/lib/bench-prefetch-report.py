"""Report of scripts/bench --suite prefetch: reads the results TSV, prints text or Markdown."""
import os
import statistics
import sys

path, markdown, check = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
miss, local = {}, {}
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if f[0] == "miss":
        # kind round fio_p50 fio_p99 ios daemon_p50 daemon_p99 misses progress
        miss.setdefault(f[1], []).append(f[2:])
    elif f[0] == "local":
        local.setdefault(f[1], []).append((float(f[3]), int(f[4])))

med = statistics.median


def num(x):
    return None if x in ("-", "None") else float(x)


def col(kind, idx):
    return [num(r[idx]) for r in miss.get(kind, []) if num(r[idx]) is not None]


def fmt(xs, spec="%.0f"):
    return " ".join(spec % x for x in xs) if xs else "-"


LABELS = {
    "off": "nbd-umemd, --prefetch off",
    "on": "nbd-umemd, background pull on (adaptive)",
    "scan": "nbdkit scan + cow proxy (scan running)",
}
miss_header = ["contender", "fio p50 (µs)", "fio p99 (µs)", "daemon miss p50 (µs)", "daemon miss p99 (µs)",
               "misses/run", "local at end of run", "fio p99 rounds", "daemon p99 rounds"]
miss_rows = []
for kind in ("off", "on", "scan"):
    if kind not in miss:
        continue
    f50, f99, d50, d99, n, prog = col(kind, 1), col(kind, 2), col(kind, 4), col(kind, 5), col(kind, 6), col(kind, 7)
    miss_rows.append([LABELS[kind], "%.0f" % med(f50), "%.0f" % med(f99),
                      "%.0f" % med(d50) if d50 else "-", "%.0f" % med(d99) if d99 else "-",
                      "%.0f" % med(n) if n else "-", "%.0f%%" % (100 * med(prog)) if prog else "-",
                      fmt(f99), fmt(d99)])

nonzero = int(os.environ["PF_NONZERO"])
rate_bytes = int(os.environ["PF_RATE_BITS"]) / 8.0
ideal = nonzero / rate_bytes
burst_floor = max(0.0, (nonzero - 2.0 * rate_bytes) / rate_bytes)
local_header = ["contender", "median (s)", "x ideal", "rounds (s)", "source bytes (median)"]
local_rows = []
for kind in ("on", "scan"):
    if kind not in local:
        continue
    secs = [r[0] for r in local[kind]]
    got = [r[1] for r in local[kind]]
    local_rows.append([LABELS[kind], "%.2f" % med(secs), "%.2f" % (med(secs) / ideal), fmt(secs, "%.2f"), "%d" % med(got)])

d_on, d_off = col("on", 5), col("off", 5)
p99_ratio = med(d_on) / med(d_off) if d_on and d_off else float("nan")
f_on, f_off = col("on", 2), col("off", 2)
fio_ratio = med(f_on) / med(f_off) if f_on and f_off else float("nan")
t_on = med([r[0] for r in local["on"]]) if "on" in local else float("nan")
t_scan = med([r[0] for r in local["scan"]]) if "scan" in local else float("nan")
criteria = [
    ("demand-miss p99 with the background pull running <= 1.3x with --prefetch off (daemon's miss histogram)",
     p99_ratio <= 1.3, p99_ratio),
    ("time to fully local <= 1.15x ideal (non-zero bytes / link rate = %.2f s)" % ideal, t_on / ideal <= 1.15, t_on / ideal),
    ("time to fully local faster than the nbdkit scan proxy (umemd s / scan s)", t_on < t_scan, t_on / t_scan),
]

env = [(k, os.environ.get(v, "")) for k, v in (
    ("date", "BENCH_ENV_DATE"), ("kernel", "BENCH_ENV_KERNEL"), ("nproc", "BENCH_ENV_NPROC"), ("cpu", "BENCH_ENV_CPU"),
    ("fio", "BENCH_ENV_FIO"), ("nbdkit", "BENCH_ENV_NBDKIT"), ("nbd-umemd", "BENCH_ENV_UMEMD"),
    ("parameters", "BENCH_ENV_PF_PARAMS"), ("servers", "BENCH_ENV_PF_CMDS"), ("fio command", "BENCH_ENV_PF_FIO"),
    ("server log errors/warnings", "BENCH_ENV_LOGPROBLEMS"))]
CODE = {"servers", "fio command"}
notes = [
    "fio p50/p99 cover every read, including those that found their page already pulled; the daemon's "
    "p50/p99 (its status) cover only reads that waited for the source",
    "fio's p99 ratio on/off: %.3f" % fio_ratio,
    "ideal = %d non-zero bytes / %.0f bytes/s = %.2f s; nbdkit's rate filter lets 2 s of traffic through "
    "at once after idling (burstiness=2), so the floor on this source is %.2f s" % (nonzero, rate_bytes, ideal, burst_floor),
]


def md_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def txt_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header).rstrip())
    print(line.format(*["-" * w for w in widths]))
    for r in rows:
        print(line.format(*r).rstrip())


if markdown:
    for k, v in env:
        print("- %s: `%s`" % (k, v) if k in CODE else "- %s: %s" % (k, v))
    print()
    print("Demand misses while pulling in the background (4K random read QD1, fio started as soon as the contender listens):")
    print()
    md_table(miss_header, miss_rows)
    print()
    print("Time until every page is local, no client (the scan proxy with an idle client connected):")
    print()
    md_table(local_header, local_rows)
    print()
    for n in notes:
        print("- " + n)
    print()
    for text, ok, r in criteria:
        print("- %s: %s (%.3f)" % (text, "**met**" if ok else "**not met**", r))
else:
    for k, v in env:
        print("%-12s %s" % (k + ":", v))
    print()
    print("demand misses while pulling in the background (4K randread QD1)")
    txt_table(miss_header, miss_rows)
    print()
    print("time until every page is local, no client")
    txt_table(local_header, local_rows)
    print()
    for n in notes:
        print("note: " + n)
    print()
    for text, ok, r in criteria:
        print("%-9s %s (%.3f)" % ("met:" if ok else "NOT MET:", text, r))

if check and not all(ok for _, ok, _ in criteria):
    sys.exit(3)
