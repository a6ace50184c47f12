"""The benchmark reports: medians, ratios, acceptance criteria, text and Markdown tables, the plot.

Each suite hands its results (plain lists and dicts) and an Env to one function here, which prints
the report on stdout and returns False when an acceptance criterion is not met.
"""
import os
import platform
import statistics
import subprocess
import time

med = statistics.median


def first_line(cmd, lines=1):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=5).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return " ".join(out.splitlines()[:lines])


class Env:
    """What the reports say about the machine and the programs (collected when the report is made)."""

    def __init__(self, umemd=None, label_a="nbd-umemd"):
        u = os.uname()
        self.label_a = label_a
        self.date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.kernel = "%s %s %s" % (u.sysname, u.release, u.machine)
        self.nproc = str(os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0)))
        cpu = ""
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        self.cpu = cpu or platform.processor() or "unknown"
        self.fio = first_line(["fio", "--version"])
        self.nbdkit = first_line(["nbdkit", "--version"])
        if umemd:
            self.umemd = "%s (%s)" % (first_line([umemd, "--version"]) or "unknown", umemd)
        else:
            self.umemd = "not used (--aa: nbdkit-2 is a second nbdkit file plugin instance)"

    def rows(self, *extra, nbdcopy=None):
        """(name, value) lines of the report's header: these, then EXTRA."""
        return ([("date", self.date), ("kernel", self.kernel), ("nproc", self.nproc), ("cpu", self.cpu),
                 ("fio", self.fio), ("nbdkit", self.nbdkit)] + ([("nbdcopy", nbdcopy)] if nbdcopy is not None else [])
                + [("nbd-umemd", self.umemd)] + list(extra))


def md_table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(align) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def txt_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header).rstrip())
    print(line.format(*["-" * w for w in widths]))
    for r in rows:
        print(line.format(*r).rstrip())


def print_env(env_rows, markdown, code=()):
    for k, v in env_rows:
        if markdown:
            print("- %s: `%s`" % (k, v) if k in code else "- %s: %s" % (k, v))
        else:
            print("%-12s %s" % (k + ":", v))


def print_criteria(criteria, markdown, fmt=lambda r: "%.3f" % r):
    for text, ok, r in criteria:
        if markdown:
            print("- %s: %s (%s)" % (text, "**met**" if ok else "**not met**", fmt(r)))
        else:
            print("%-9s %s (%s)" % ("met:" if ok else "NOT MET:", text, fmt(r)))
    return all(ok for _, ok, _ in criteria)


# ---- core ------------------------------------------------------------------------------------------
# (workload, metric key, label, unit, higher is better, format)
CORE_METRICS = [
    ("qd1", "iops", "4K randread QD1", "IOPS", True, "{:.0f}"),
    ("qd1", "mean", "4K randread QD1", "mean clat (µs)", False, "{:.1f}"),
    ("qd1", "p50", "4K randread QD1", "p50 clat (µs)", False, "{:.1f}"),
    ("rr16", "iops", "4K randread QD16", "IOPS", True, "{:.0f}"),
    ("rw16", "iops", "4K randwrite QD16", "IOPS", True, "{:.0f}"),
    ("seq8", "gib", "1M seqread QD8", "GiB/s", True, "{:.2f}"),
]


def core(results, env, params, fio_args, markdown):
    """results: {(workload, server): [(round, {"iops", "mean", "p50", "gib"})]}."""
    A = env.label_a          # server under test: nbd-umemd (or nbdkit-2 with --aa)
    short = "umemd" if A == "nbd-umemd" else A

    def values(wl, server, key):
        return [v[key] for _, v in sorted(results.get((wl, server), []), key=lambda t: t[0])]

    table, ratios = [], {}
    for wl, key, label, unit, higher, fmt in CORE_METRICS:
        u, k = values(wl, A, key), values(wl, "nbdkit", key)
        mu, mk = med(u), med(k)
        ratio = mu / mk if mk else float("nan")
        ratios[(wl, key)] = ratio
        table.append([label, unit, "higher" if higher else "lower", fmt.format(mu), fmt.format(mk),
                      "{:.3f}".format(ratio), " ".join(fmt.format(x) for x in u), " ".join(fmt.format(x) for x in k)])
    header = ["workload", "metric", "better", A + " median", "nbdkit median", "ratio %s/nbdkit" % short,
              A + " rounds", "nbdkit rounds"]
    criteria = [
        ("4K randread QD16 IOPS: %s >= 1.00x nbdkit" % A, ratios[("rr16", "iops")] >= 1.0, ratios[("rr16", "iops")]),
        ("1M seqread QD8 GiB/s: %s >= 1.00x nbdkit" % A, ratios[("seq8", "gib")] >= 1.0, ratios[("seq8", "gib")]),
        ("4K randread QD1 mean clat: %s <= 1.10x nbdkit" % A, ratios[("qd1", "mean")] <= 1.1, ratios[("qd1", "mean")]),
        ("4K randread QD1 p50 clat: %s <= 1.10x nbdkit" % A, ratios[("qd1", "p50")] <= 1.1, ratios[("qd1", "p50")]),
    ]
    print_env(env.rows(("parameters", params), ("fio command", fio_args)), markdown, code={"fio command"})
    print()
    if markdown:
        md_table(header, table, ["---"] * 3 + ["---:"] * 3 + ["---"] * 2)
        print()
        print("Ratio = median(%s) / median(nbdkit); for IOPS and GiB/s above 1 favours %s, "
              "for latency below 1 favours %s." % (A, A, A))
    else:
        txt_table(header, table)
        print()
        print("ratio = median(%s) / median(nbdkit): for IOPS and GiB/s > 1 favours %s, "
              "for latency < 1 favours %s" % (A, A, A))
    print()
    return print_criteria(criteria, markdown)


# ---- lazy and prefetch -----------------------------------------------------------------------------
CONTENDERS = {
    "umemd-4k": "nbd-umemd lazy, --fetch-size 4K",
    "umemd": "nbd-umemd lazy, default fetch size (64K)",
    "proxy": "nbdkit cow proxy (cow-on-read=true)",
    "direct": "delayed source, read directly",
    "off": "nbd-umemd, --prefetch off",
    "on": "nbd-umemd, background pull on (adaptive)",
    "scan": "nbdkit scan + cow proxy (scan running)",
}


def lazy(miss, copy, env, size, size_bytes, extra_env, nbdcopy, markdown):
    """miss: {kind: [(round, p50, p99, ios)]}; copy: {kind: [(round, seconds, VmHWM KiB)]}."""
    for d in (miss, copy):
        for v in d.values():
            v.sort()

    def mcol(kind, idx):
        return [r[idx] for r in miss[kind]]

    miss_header = ["contender", "p50 median (µs)", "p99 median (µs)", "p50 rounds", "p99 rounds", "reads/run (median)"]
    miss_table = []
    for kind in ("umemd-4k", "umemd", "proxy", "direct"):
        p50, p99, ios = mcol(kind, 1), mcol(kind, 2), mcol(kind, 3)
        miss_table.append([CONTENDERS[kind], "%.0f" % med(p50), "%.0f" % med(p99),
                           " ".join("%.0f" % x for x in p50), " ".join("%.0f" % x for x in p99), "%.0f" % med(ios)])

    def ratio(a, b, idx):
        mb = med(mcol(b, idx))
        return med(mcol(a, idx)) / mb if mb else float("nan")
    ratio_header = ["ratio", "p50", "p99"]
    ratio_rows = [["%s / %s" % (a, b), "%.3f" % ratio(a, b, 1), "%.3f" % ratio(a, b, 2)]
                  for a, b in (("umemd-4k", "direct"), ("umemd-4k", "proxy"), ("umemd", "direct"), ("umemd", "proxy"),
                               ("proxy", "direct"))]

    copy_header = ["contender", "median (s)", "median GiB/s", "rounds (s)", "peak RSS VmHWM median (MiB)", "VmHWM rounds (MiB)"]
    copy_table = []
    for kind in ("umemd", "proxy"):
        secs = [r[1] for r in copy[kind]]
        hwm = [r[2] / 1024.0 for r in copy[kind]]
        copy_table.append([CONTENDERS[kind], "%.2f" % med(secs), "%.2f" % (size_bytes / 2.0**30 / float("%.2f" % med(secs))),
                           " ".join("%.2f" % x for x in secs), "%.1f" % med(hwm), " ".join("%.1f" % x for x in hwm)])
    copy_speedup = med([r[1] for r in copy["proxy"]]) / med([r[1] for r in copy["umemd"]])

    r50, r99 = ratio("umemd-4k", "direct", 1), ratio("umemd-4k", "direct", 2)
    criteria = [
        ("demand-miss p50: nbd-umemd (--fetch-size 4K) <= 1.10x direct source", r50 <= 1.1, r50),
        ("demand-miss p99: nbd-umemd (--fetch-size 4K) <= 1.20x direct source", r99 <= 1.2, r99),
        ("cold copy: nbd-umemd >= 2.00x as fast as the nbdkit cow proxy (median proxy s / median umemd s)",
         copy_speedup >= 2.0, copy_speedup),
    ]
    print_env(env.rows(*extra_env, nbdcopy=nbdcopy), markdown, code={"servers", "fio command"})
    print()
    if markdown:
        print("Demand-miss latency, 4K random read QD1 over the whole export (all pages absent at the start), "
              "source delayed by 1 ms per read:")
        print()
        md_table(miss_header, miss_table, ["---", "---:", "---:", "---", "---", "---:"])
        print()
        md_table(ratio_header, ratio_rows, ["---", "---:", "---:"])
        print()
        print("Cold copy, `nbdcopy URI null:` of the whole %s export (random data, nothing sparse), undelayed source:" % size)
        print()
        md_table(copy_header, copy_table, ["---", "---:", "---:", "---", "---:", "---"])
        print()
        print("Speed-up nbd-umemd vs proxy (median proxy s / median nbd-umemd s): %.2fx" % copy_speedup)
    else:
        print("demand-miss latency: 4K randread QD1 over the whole export (all absent), source delay-read=1ms")
        txt_table(miss_header, miss_table)
        print()
        txt_table(ratio_header, ratio_rows)
        print()
        print("cold copy: nbdcopy URI null: of the whole export (random data), undelayed source")
        txt_table(copy_header, copy_table)
        print()
        print("speed-up nbd-umemd vs proxy (median proxy s / median nbd-umemd s): %.2fx" % copy_speedup)
    print()
    return print_criteria(criteria, markdown)


# ---- prefetch --------------------------------------------------------------------------------------
def prefetch(miss, local, nonzero, rate_bits, env, extra_env, markdown):
    """miss: {kind: [(round, fio p50, fio p99, ios, daemon p50, daemon p99, misses, progress)]} (None
    where the contender has no status); local: {kind: [(seconds, source bytes)]}."""
    def col(kind, idx):
        return [r[idx] for r in miss.get(kind, []) if r[idx] is not None]

    def fmt(xs, spec="%.0f"):
        return " ".join(spec % x for x in xs) if xs else "-"

    miss_header = ["contender", "fio p50 (µs)", "fio p99 (µs)", "daemon miss p50 (µs)", "daemon miss p99 (µs)",
                   "misses/run", "local at end of run", "fio p99 rounds", "daemon p99 rounds"]
    miss_rows = []
    for kind in ("off", "on", "scan"):
        if kind not in miss:
            continue
        f50, f99, d50, d99, n, prog = col(kind, 1), col(kind, 2), col(kind, 4), col(kind, 5), col(kind, 6), col(kind, 7)
        miss_rows.append([CONTENDERS[kind], "%.0f" % med(f50), "%.0f" % med(f99),
                          "%.0f" % med(d50) if d50 else "-", "%.0f" % med(d99) if d99 else "-",
                          "%.0f" % med(n) if n else "-", "%.0f%%" % (100 * med(prog)) if prog else "-",
                          fmt(f99), fmt(d99)])

    rate_bytes = rate_bits / 8.0
    ideal = nonzero / rate_bytes
    burst_floor = max(0.0, (nonzero - 2.0 * rate_bytes) / rate_bytes)
    local_header = ["contender", "median (s)", "x ideal", "rounds (s)", "source bytes (median)"]
    local_rows = []
    for kind in ("on", "scan"):
        if kind not in local:
            continue
        secs = [r[0] for r in local[kind]]
        got = [r[1] for r in local[kind]]
        local_rows.append([CONTENDERS[kind], "%.2f" % med(secs), "%.2f" % (med(secs) / ideal), fmt(secs, "%.2f"),
                           "%d" % med(got)])

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
    notes = [
        "fio p50/p99 cover every read, including those that found their page already pulled; the daemon's "
        "p50/p99 (its status) cover only reads that waited for the source",
        "fio's p99 ratio on/off: %.3f" % fio_ratio,
        "ideal = %d non-zero bytes / %.0f bytes/s = %.2f s; nbdkit's rate filter lets 2 s of traffic through "
        "at once after idling (burstiness=2), so the floor on this source is %.2f s" % (nonzero, rate_bytes, ideal, burst_floor),
    ]
    print_env(env.rows(*extra_env), markdown, code={"servers", "fio command"})
    print()
    if markdown:
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
    else:
        print("demand misses while pulling in the background (4K randread QD1)")
        txt_table(miss_header, miss_rows)
        print()
        print("time until every page is local, no client")
        txt_table(local_header, local_rows)
        print()
        for n in notes:
            print("note: " + n)
    print()
    return print_criteria(criteria, markdown)


# ---- migrate ---------------------------------------------------------------------------------------
MIG_MODES = ["precopy", "postcopy", "file", "swap", "file-tls", "swap-tls"]
MIG_LABELS = {"precopy": "QEMU precopy", "postcopy": "QEMU postcopy-ram", "file": "nbd-umemd file",
              "swap": "nbd-umemd swap", "file-tls": "nbd-umemd file, TLS", "swap-tls": "nbd-umemd swap, TLS"}
MIG_ROWS = [
    ("downtime (QMP), ms", "downtime_ms"),
    ("guest downtime (STOP to RESUME, QEMU's stamps), ms", "guest_downtime_ms"),
    ("`migrate` to guest progress on the destination, ms", "first_progress_on_destination_ms"),
    ("`migrate` to all RAM on the destination, ms", "all_ram_local_ms"),
    ("`migrate` to the VM depending on nothing, ms", "independent_ms"),
    ("bytes sent by the source host (link, all TCP)", "link_bytes"),
    ("bytes in QEMU's stream", "migration_stream_bytes"),
    ("bytes pulled by nbd-umemd (logical)", "pulled_bytes"),
    ("staging before `migrate` (swap), ms", "staging_ms"),
    ("pages turned non-zero since staging (swap, gate open)", "late_pages"),
    ("swapoff after all RAM is local (swap), ms", "swapoff_ms"),
    ("NBD writes to the daemon after completion", "writes_after_complete"),
    ("bytes written to the daemon after completion", "bytes_written_after_complete"),
    ("things left after independence (swap)", "leftovers_after_independent"),
    ("longest pause in guest progress, ms", "max_progress_gap_ms"),
    ("guest rate before `migrate`, ops/s", "rate_before_ops"),
    ("guest rate until all RAM is on the destination, ops/s", "rate_during_ops"),
    ("guest rate after the source is gone, ops/s", "rate_after_ops"),
    ("TCP retransmissions on the link", "tcp_retransmits"),
    ("data errors seen by the guest", "data_errors"),
]
SUMS = ("data_errors", "leftovers_after_independent")   # every one counts: sums, not medians
AFTER_COMPLETE_S = 30     # the acceptance looks at the writes in this many seconds after completion


def _mig_fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return "%.1f" % v
    return "%d" % v


def migrate(runs, env, params, args, markdown, plot):
    """runs: {mode: [migrate-vm report of each round]} (a failed run: {"status": "failed", ...}), for
    the modes that ran (a subset of MIG_MODES; "umemd" is the file mode's old name)."""
    runs = {("file" if m == "umemd" else m): v for m, v in runs.items()}
    modes = [m for m in MIG_MODES if m in runs]
    done = {m: [r for r in runs[m] if r.get("status") == "completed"] for m in modes}
    rounds = max(len(v) for v in runs.values()) if runs else 0
    # ratio columns: each nbd-umemd mode against QEMU postcopy-ram
    ratio_modes = [m for m in ("file", "swap") if m in modes and "postcopy" in modes]

    def mmed(m, key):
        vals = [r[key] for r in done.get(m, []) if r.get(key) is not None]
        return med(vals) if vals else None

    def each(m, key):
        return ", ".join("failed" if r.get("status") != "completed" else "-" if r.get(key) is None else _mig_fmt(r[key])
                         for r in runs[m])

    head = "Migration of one VM (%s), medians of %d rounds" % (params, rounds)
    ratio_labels = ["%s / postcopy" % m for m in ratio_modes]
    if markdown:
        print("### " + head)
        print()
        print("| | " + " | ".join(MIG_LABELS[m] for m in modes) + "".join(" | %s" % l for l in ratio_labels) + " |")
        print("| --- | " + " | ".join("---:" for _ in modes + ratio_modes) + " |")
    else:
        print(head)
        print(("%-58s" + " %18s" * len(modes) + " %15s" * len(ratio_modes))
              % ("", *[MIG_LABELS[m] for m in modes], *ratio_labels))
    for label, key in MIG_ROWS:
        vals = [mmed(m, key) for m in modes]
        if all(v is None for v in vals):
            continue
        ratios = []
        for m in ratio_modes:
            u, p = mmed(m, key), mmed("postcopy", key)
            ratios.append("%.3f" % (u / p) if u is not None and p else "")
        if key in SUMS:
            vals = [sum(r.get(key) or 0 for r in done[m]) if any(r.get(key) is not None for r in done[m]) else None
                    for m in modes]
            label += " (sum)"
            ratios = [""] * len(ratio_modes)
        if markdown:
            print("| %s | %s |" % (label, " | ".join([_mig_fmt(v) for v in vals] + ratios)))
        else:
            print(("%-58s" + " %18s" * len(modes) + " %15s" * len(ratio_modes)) % (label, *[_mig_fmt(v) for v in vals], *ratios))
    failed = [len(runs[m]) - len(done[m]) for m in modes]
    label = "runs that failed (medians are over the others)"
    if markdown:
        print("| %s | %s |" % (label, " | ".join([str(f) for f in failed] + [""] * len(ratio_modes))))
    else:
        print(("%-58s" + " %18s" * len(modes)) % (label, *failed))
    for m in modes:
        for r in runs[m]:
            if r.get("status") != "completed":
                print("%s%s failed: %s" % ("- " if markdown else "", MIG_LABELS[m], r.get("error", "?")))
    print()
    if "swap" in modes and done["swap"]:
        phases = {}
        for r in done["swap"]:
            for k, v in (r.get("staging_phases_ms") or {}).items():
                phases.setdefault(k, []).append(v)
        if phases:
            text = "swap mode staging phases (medians, ms): %s" % ", ".join("%s %s" % (k, _mig_fmt(med(v)))
                                                                          for k, v in phases.items())
            print(("- " if markdown else "") + text)
    if "file" in modes and done["file"]:
        w, bw = mmed("file", "writes_after_complete"), mmed("file", "bytes_written_after_complete")
        win = mmed("file", "writes_after_complete_window_s")
        text = ("file mode: %s NBD writes (%s bytes) to the destination daemon in the %s s after completion (medians; "
                "the guest's RAM stays on the daemon's device)" % (_mig_fmt(w), _mig_fmt(bw), _mig_fmt(win)))
        print(("- " if markdown else "") + text)
    print()
    if markdown:
        print("Every round (in run order within a round the modes rotate):")
        print()
        for label, key in MIG_ROWS:
            if all(r.get(key) is None for m in modes for r in runs[m]):
                continue
            print("- %s: %s" % (label, "; ".join("%s %s" % (MIG_LABELS[m], each(m, key)) for m in modes)))
    else:
        for label, key in MIG_ROWS:
            if all(r.get(key) is None for m in modes for r in runs[m]):
                continue
            print("%-58s %s" % (label, " | ".join("%s: %s" % (m, each(m, key)) for m in modes)))
    print()
    print("environment: %s, %s CPUs (%s), %s; %s" % (env.kernel, env.nproc, env.cpu, env.umemd, env.date))
    print("command per run: %s" % args)
    print()

    criteria = []

    def against_postcopy(m, text, key, limit):
        u, p = mmed(m, key), mmed("postcopy", key)
        ratio = u / p if u is not None and p else float("inf")
        criteria.append((text, ratio <= limit, ratio))

    if "file" in modes and "postcopy" in modes:
        for text, key, limit in [("nbd-umemd file: downtime <= QEMU postcopy-ram's", "downtime_ms", 1.0),
                                 ("nbd-umemd file: time to all RAM local <= 1.1x QEMU postcopy-ram's", "all_ram_local_ms", 1.1),
                                 ("nbd-umemd file: bytes sent (link) <= QEMU postcopy-ram's", "link_bytes", 1.0)]:
            against_postcopy("file", text, key, limit)
    if "file" in modes:
        errors = sum(r.get("data_errors") or 0 for r in runs["file"])
        criteria.append(("nbd-umemd file: no data errors in any round", errors == 0, errors))
    if "swap" in modes and "postcopy" in modes:
        for text, key, limit in [
                ("nbd-umemd swap: downtime <= QEMU postcopy-ram's", "downtime_ms", 1.0),
                ("nbd-umemd swap: `migrate` to first guest progress on the destination <= QEMU postcopy-ram's",
                 "first_progress_on_destination_ms", 1.0),
                ("nbd-umemd swap: time to all RAM local <= 1.1x QEMU postcopy-ram's", "all_ram_local_ms", 1.1),
                ("nbd-umemd swap: bytes sent (link) <= QEMU postcopy-ram's", "link_bytes", 1.0)]:
            against_postcopy("swap", text, key, limit)
        u, p = mmed("swap", "rate_after_ops"), mmed("postcopy", "rate_after_ops")
        ratio = u / p if u is not None and p else 0.0
        criteria.append(("nbd-umemd swap: guest page-ops/s after completion within 5 % of QEMU postcopy-ram's "
                         "(or above): swap/postcopy >= 0.95", ratio >= 0.95, ratio))
    if "swap" in modes:
        ind, loc = mmed("swap", "independent_ms"), mmed("swap", "all_ram_local_ms")
        ratio = ind / loc if ind is not None and loc else float("inf")
        criteria.append(("nbd-umemd swap: independent (nothing left but QEMU) <= 1.25x its all-RAM-local time",
                         ratio <= 1.25, ratio))
        bad = [r for r in runs["swap"] if r.get("status") != "completed" or r.get("writes_after_complete") != 0
               or r.get("bytes_written_after_complete") != 0 or r.get("leftovers_after_independent") != 0]
        windows = [r.get("writes_after_complete_window_s") or 0 for r in done["swap"]]
        short = min(windows) if windows else 0
        criteria.append(("nbd-umemd swap: zero NBD and store writes in the %d s after completion, daemon, device, store "
                         "and swap entry gone (every round; shortest window seen %s s)" % (AFTER_COMPLETE_S, _mig_fmt(short)),
                         not bad and short >= AFTER_COMPLETE_S, len(bad)))
        missing = [r for r in runs["swap"] if r.get("staging_ms") is None]
        criteria.append(("nbd-umemd swap: staging time reported in every round (median %s ms)"
                         % _mig_fmt(mmed("swap", "staging_ms")), not missing, len(missing)))
        errors = sum(r.get("data_errors") or 0 for r in runs["swap"])
        criteria.append(("nbd-umemd swap: no data errors in any round", errors == 0, errors))
    for m in ("file-tls", "swap-tls"):
        if m not in modes:
            continue
        base = m[:-len("-tls")]
        if base in modes:
            t, p = mmed(m, "all_ram_local_ms"), mmed(base, "all_ram_local_ms")
            ratio = t / p if t is not None and p else float("inf")
            criteria.append(("%s: time to all RAM local within 5 %% of the plain link's: %s/%s <= 1.05" % (MIG_LABELS[m], m, base),
                             ratio <= 1.05, ratio))
        errors = sum(r.get("data_errors") or 0 for r in runs[m])
        failed = sum(1 for r in runs[m] if r.get("status") != "completed")
        criteria.append(("%s: no data errors and no failed run" % MIG_LABELS[m], errors == 0 and failed == 0, errors + failed))
    if ("file" in modes or "swap" in modes) and "postcopy" in modes and not done["postcopy"]:
        criteria.append(("QEMU postcopy-ram completed at least once (nothing to compare with)", False, 0))
    ok = print_criteria(criteria, markdown, fmt=lambda r: "%.3f" % r if isinstance(r, float) else r)
    guest = ["%s %s" % (MIG_LABELS[m], _mig_fmt(mmed(m, "guest_downtime_ms"))) for m in modes
             if mmed(m, "guest_downtime_ms") is not None]
    if guest:
        print("%sinfo: guest downtime (the destination's RESUME minus the source's STOP, QEMU's stamps; QMP's downtime "
              "ends when the source has sent the last byte), medians in ms: %s" % ("- " if markdown else "",
                                                                                    ", ".join(guest)))
    draw_rates(done, mmed, plot, params)
    return ok


def draw_rates(done, mmed, path, params):
    """The guest's workload rate over time, one line per mode (its median round by all-RAM-local time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("bench-migrate-report: matplotlib is missing (%s): install python3-matplotlib" % e)
    colors = {"precopy": "tab:gray", "postcopy": "tab:orange", "file": "tab:blue", "swap": "tab:green",
              "file-tls": "tab:cyan", "swap-tls": "tab:olive"}
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5))
    for ax, (lo, hi), log in [(axes[0], (-3, None), False), (axes[1], (-1, 15), True)]:
        for m in MIG_MODES:
            if not done.get(m):
                continue
            target = mmed(m, "all_ram_local_ms")
            run = min(done[m], key=lambda r: abs(r["all_ram_local_ms"] - target))
            xs, ys = [], []
            last = None
            for t, rate in run.get("rates", []):
                if last is not None and t - last > 0.6:
                    # no progress line for a while: the guest was stalled
                    xs += [last + 0.25, t - 0.25]
                    ys += [0.5 if log else 0, 0.5 if log else 0]
                xs.append(t)
                ys.append(max(rate, 0.5) if log else rate)
                last = t
            ax.step(xs, [y / 1000.0 for y in ys], where="post", color=colors[m], label="%s (all RAM local at %.1f s)"
                    % (MIG_LABELS[m], run["all_ram_local_ms"] / 1000.0))
            ax.axvline(run["all_ram_local_ms"] / 1000.0, color=colors[m], linestyle=":", linewidth=1)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("seconds since `migrate`")
        ax.set_ylabel("guest workload, k page-ops/s" + (" (log)" if log else ""))
        if log:
            ax.set_yscale("log")
            ax.set_ylim(0.0005, None)
            ax.set_title("first 15 s, log scale (stalls drawn at the bottom)")
        else:
            ax.set_title("guest progress during and after live migration (%s)" % params)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print("plot: %s" % path)
