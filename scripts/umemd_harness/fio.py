"""fio's nbd engine as the benchmark client: one run, and the figures of its JSON result."""
import json
import subprocess
import sys

from .common import die, log, read_text, tail


class FioError(Exception):
    pass


def _job(path):
    text = read_text(path)
    start = text.find("{")          # fio may print "fio: ..." lines into the output file
    if start < 0:
        raise FioError("no JSON in fio output")
    job = json.loads(text[start:])["jobs"][0]
    if job.get("error", 0) != 0:
        raise FioError("fio job error %s" % job["error"])
    return job


def iops_latency(path):
    """(iops, clat mean µs, clat p50 µs, GiB/s) of the job's write side if it wrote, else its read side."""
    job = _job(path)
    side = job["write"] if job["write"]["total_ios"] > 0 else job["read"]
    if side["total_ios"] <= 0:
        raise FioError("fio completed no I/O")
    clat = side["clat_ns"]
    p50 = clat.get("percentile", {}).get("50.000000", float("nan"))
    return (round(side["iops"], 3), round(clat["mean"] / 1000.0, 3), round(p50 / 1000.0, 3),
            round(side["bw_bytes"] / 2.0**30, 6))


def read_percentiles(path):
    """(p50 µs, p99 µs, reads) of the read side (a run with --percentile_list=50:99)."""
    side = _job(path)["read"]
    if side["total_ios"] <= 0:
        raise FioError("fio completed no I/O")
    pct = side["clat_ns"].get("percentile", {})
    if "50.000000" not in pct or "99.000000" not in pct:
        raise FioError("fio reported no p50/p99 (percentiles: %s)" % sorted(pct))
    return (round(pct["50.000000"] / 1000.0, 3), round(pct["99.000000"] / 1000.0, 3), side["total_ios"])


def run(name, sock, args, out, timeout, against, what, parse, server=None, scheme="nbd+unix"):
    """fio --name=NAME --ioengine=nbd --uri=SCHEME:///?socket=SOCK ARGS --output=OUT within TIMEOUT s
    (SCHEME nbds+unix: TLS, x509 credentials from libnbd's default directory); returns parse(OUT).
    Fatal (with fio's output and, after checking SERVER is alive, the end of its log) if fio fails."""
    cmd = ["fio", "--name=" + name, "--ioengine=nbd", "--uri=%s:///?socket=%s" % (scheme, sock)] + list(args) + ["--output=" + out]
    err = out[:-len(".json")] + ".err" if out.endswith(".json") else out + ".err"
    with open(err, "wb") as e:
        try:
            rc = subprocess.run(cmd, stdout=e, stderr=e, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    if rc != 0:
        log("fio failed against %s: %s" % (against, " ".join(cmd)))
        sys.stderr.write(read_text(err) + read_text(out))
        if server is not None:
            server.check_alive()
            log("last lines of %s's log (%s):" % (against, server.log_path))
            sys.stderr.write(tail(server.log_path, 30) + "\n")
        die("fio failed against %s (%s)" % (against, what))
    try:
        return parse(out)
    except (FioError, ValueError, KeyError, IndexError) as e:
        log("bad fio result against %s: %s" % (against, " ".join(cmd)))
        sys.stderr.write(read_text(err) + read_text(out))
        die("fio result unusable for %s (%s): %s" % (against, what, e))
