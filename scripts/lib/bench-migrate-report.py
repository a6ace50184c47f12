#!/usr/bin/python3
"""Report of scripts/bench's migrate suite: medians over the rounds, ratios, and the rate plot.

    bench-migrate-report.py DIR ROUNDS MARKDOWN(0|1) CHECK(0|1) PLOT.png

DIR holds MODE-ROUND.json, the REPORT line of each scripts/migrate-vm run. Exits 3 when CHECK is 1
and an acceptance criterion is not met.
"""
import json
import os
import statistics
import sys

MODES = ["precopy", "postcopy", "umemd"]
LABELS = {"precopy": "QEMU precopy", "postcopy": "QEMU postcopy-ram", "umemd": "nbd-umemd"}


def main():
    d, rounds, markdown, check, plot = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5]
    runs = {m: [json.load(open(os.path.join(d, "%s-%d.json" % (m, r)))) for r in range(1, rounds + 1)] for m in MODES}

    done = {m: [r for r in runs[m] if r.get("status") == "completed"] for m in MODES}

    def med(m, key):
        vals = [r[key] for r in done[m] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def each(m, key):
        return ", ".join("failed" if r.get("status") != "completed" else "-" if r.get(key) is None else fmt(r[key])
                         for r in runs[m])

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float) and not v.is_integer():
            return "%.1f" % v
        return "%d" % v

    rows = [
        ("downtime (QMP), ms", "downtime_ms"),
        ("`migrate` to guest progress on the destination, ms", "first_progress_on_destination_ms"),
        ("`migrate` to all RAM on the destination, ms", "all_ram_local_ms"),
        ("bytes sent by the source host (link, all TCP)", "link_bytes"),
        ("bytes in QEMU's stream", "migration_stream_bytes"),
        ("bytes pulled by nbd-umemd (logical)", "pulled_bytes"),
        ("longest pause in guest progress, ms", "max_progress_gap_ms"),
        ("guest rate before `migrate`, ops/s", "rate_before_ops"),
        ("guest rate until all RAM is on the destination, ops/s", "rate_during_ops"),
        ("guest rate after the source is gone, ops/s", "rate_after_ops"),
        ("TCP retransmissions on the link", "tcp_retransmits"),
        ("data errors seen by the guest", "data_errors"),
    ]
    env = os.environ
    head = "Migration of one VM (%s), medians of %d rounds" % (env.get("BENCH_ENV_PARAMS", ""), rounds)
    if markdown:
        print("### " + head)
        print()
        print("| | " + " | ".join(LABELS[m] for m in MODES) + " | nbd-umemd / postcopy |")
        print("| --- | " + " | ".join("---:" for _ in MODES) + " | ---: |")
    else:
        print(head)
        print("%-58s %16s %18s %16s %10s" % ("", *[LABELS[m] for m in MODES], "umemd/post"))
    for label, key in rows:
        vals = [med(m, key) for m in MODES]
        ratio = ""
        if vals[1] and vals[2] is not None:
            ratio = "%.3f" % (vals[2] / vals[1])
        if key == "data_errors":  # a sum, not a median: every error counts
            vals = [sum(r.get(key) or 0 for r in done[m]) for m in MODES]
            label += " (sum)"
            ratio = ""
        if markdown:
            print("| %s | %s | %s |" % (label, " | ".join(fmt(v) for v in vals), ratio))
        else:
            print("%-58s %16s %18s %16s %10s" % (label, *[fmt(v) for v in vals], ratio))
    failed = [len(runs[m]) - len(done[m]) for m in MODES]
    label = "runs that failed (medians are over the others)"
    if markdown:
        print("| %s | %s | |" % (label, " | ".join(str(f) for f in failed)))
    else:
        print("%-58s %16s %18s %16s" % (label, *failed))
    for m in MODES:
        for r in runs[m]:
            if r.get("status") != "completed":
                print("%s%s failed: %s" % ("- " if markdown else "", LABELS[m], r.get("error", "?")))
    print()
    if markdown:
        print("Every round (in run order within a round the modes rotate):")
        print()
        for label, key in rows:
            print("- %s: %s" % (label, "; ".join("%s %s" % (LABELS[m], each(m, key)) for m in MODES)))
    else:
        for label, key in rows:
            print("%-58s %s" % (label, " | ".join("%s: %s" % (m, each(m, key)) for m in MODES)))
    print()
    print("environment: %s, %s CPUs (%s), %s; %s" % (env.get("BENCH_ENV_KERNEL", "?"), env.get("BENCH_ENV_NPROC", "?"),
                                                    env.get("BENCH_ENV_CPU", "?"), env.get("BENCH_ENV_UMEMD", "?"),
                                                    env.get("BENCH_ENV_DATE", "?")))
    print("command per run: %s" % env.get("BENCH_ENV_ARGS", "?"))
    print()

    criteria = []
    for text, key, limit in [("nbd-umemd downtime <= QEMU postcopy-ram's", "downtime_ms", 1.0),
                             ("nbd-umemd time to all RAM local <= 1.1x QEMU postcopy-ram's", "all_ram_local_ms", 1.1),
                             ("nbd-umemd bytes sent (link) <= QEMU postcopy-ram's", "link_bytes", 1.0)]:
        u, p = med("umemd", key), med("postcopy", key)
        ratio = u / p if p else float("inf")
        criteria.append((text, ratio <= limit, ratio))
    errors = sum(r.get("data_errors") or 0 for r in runs["umemd"])
    criteria.append(("nbd-umemd: no data errors in any round", errors == 0, errors))
    if not done["postcopy"]:
        criteria.append(("QEMU postcopy-ram completed at least once (nothing to compare with)", False, 0))
    for text, ok, r in criteria:
        print("%-9s %s (%s)" % ("met:" if ok else "NOT MET:", text, "%.3f" % r if isinstance(r, float) else r))

    draw(done, med, plot)
    if check and not all(ok for _, ok, _ in criteria):
        sys.exit(3)


def draw(done, med, path):
    """The guest's workload rate over time, one line per mode (its median round by all-RAM-local time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        sys.exit("bench-migrate-report: matplotlib is missing (%s): install python3-matplotlib" % e)
    colors = {"precopy": "tab:gray", "postcopy": "tab:orange", "umemd": "tab:blue"}
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5))
    for ax, (lo, hi), log in [(axes[0], (-3, None), False), (axes[1], (-1, 15), True)]:
        for m in MODES:
            if not done[m]:
                continue
            target = med(m, "all_ram_local_ms")
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
                    % (LABELS[m], run["all_ram_local_ms"] / 1000.0))
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
            ax.set_title("guest progress during and after live migration (%s)" % os.environ.get("BENCH_ENV_PARAMS", ""))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print("plot: %s" % path)


if __name__ == "__main__":
    main()
