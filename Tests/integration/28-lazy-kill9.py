"""Helper of 28-lazy-kill9.sh (run with lib.sh's py). Subcommands:

  phase1 URI IMG SRCLOG STATEDIR   reads of absent pages, writes + flush, FUA writes; writes the model
  writer URI STATEDIR              background: unflushed writes and FUA writes (logs plan/done lines)
  reader URI IMG STATEDIR          background: reads of absent pages, checked against the image
  check  URI IMG SRCLOG STATEDIR MARK   after kill -9 and restart: the crash-consistency checks

Layout of the 8 MiB image (2048 pages of 4 KiB, 64 KiB fetch windows = 16 pages):
  pages    0..511   phase 1 reads (one page per window: every window pulled)
  pages  512..767   phase 1 writes followed by FLUSH
  pages  768..895   phase 1 FUA writes (after the flush)
  pages  896..1535  writer: unflushed writes and some FUA writes, each page written at most once
  pages 1536..2047  reader: reads of absent pages
"""
import json
import os
import random
import sys
import time

import nbd
from nbdtest import *

P = 4096


def page_ranges(off, length):
    return range(off // P, (off + length + P - 1) // P)


def apply(model, off, data):
    model[off:off + len(data)] = data


def phase1(uri, img_path, srclog, sd):
    img = open(img_path, "rb").read()
    h = connect(uri)
    model = bytearray(img)
    rnd = random.Random(2801)
    read_ok = []
    # reads of absent pages, one in each of the 32 first windows
    for w in range(32):
        p = w * 16 + rnd.randrange(16)
        d = h.pread(P, p * P)
        check_data(img[p * P:(p + 1) * P], d, "phase 1: read of absent page %d" % p)
        if d == img[p * P:(p + 1) * P]:
            read_ok.append(p)
    # writes, then FLUSH: whole pages, a partial page, an unaligned multi-page write
    writes = [((520) * P, P), ((530) * P, 3 * P), (600 * P + 100, 1000), (650 * P + 2000, 2 * P + 500),
              (700 * P, P), (767 * P + 4000, 96)]
    for i, (off, ln) in enumerate(writes):
        data = pattern(ln, 100 + i)
        h.pwrite(data, off)
        apply(model, off, data)
    h.flush()
    # mark: every source read logged so far was a pull that completed before the flush returned
    mark = log_mark(srclog)
    present = sorted({p for (o, c) in source_reads(srclog) for p in page_ranges(o, c)})
    # FUA writes after the flush (no flush after them): whole page, partial page on an absent window
    fua = [(770 * P, P), (800 * P + 300, 700), (850 * P, 2 * P)]
    for i, (off, ln) in enumerate(fua):
        data = pattern(ln, 200 + i)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA)
        apply(model, off, data)
    for off, ln in writes + fua:
        check_data(model[off:off + ln], h.pread(ln, off), "phase 1: re-read of the write at %#x+%d" % (off, ln))
    written = sorted({p for off, ln in writes + fua for p in page_ranges(off, ln)})
    with open(os.path.join(sd, "model.img"), "wb") as f:
        f.write(model)
    with open(os.path.join(sd, "phase1.json"), "w") as f:
        json.dump({"present": present, "written": written, "read_ok": read_ok, "mark": mark}, f)
    note("phase 1: %d pages present at the flush, %d pages written durably" % (len(present), len(written)))
    h.shutdown()


def writer(uri, sd):
    h = connect(uri)
    rnd = random.Random(2802)
    pages = list(range(896, 1536))
    rnd.shuffle(pages)
    t0 = time.time()
    with open(os.path.join(sd, "writer.log"), "w", buffering=1) as log:
        for i, p in enumerate(pages):
            if time.time() - t0 > 20:
                break
            fua = rnd.random() < 0.2
            if rnd.random() < 0.5:
                off, ln = p * P, P
            else:
                a = rnd.randrange(P - 1)
                off, ln = p * P + a, rnd.randrange(1, P - a + 1)
            seed = 10000 + i
            log.write("plan %d %d %d %d\n" % (off, ln, seed, fua))
            try:
                h.pwrite(pattern(ln, seed), off, nbd.CMD_FLAG_FUA if fua else 0)
            except nbd.Error as e:
                log.write("error %d %s\n" % (p, e.string))
                break
            log.write("done %d %d %d %d\n" % (off, ln, seed, fua))
            time.sleep(0.005)


def reader(uri, img_path, sd):
    img = open(img_path, "rb").read()
    h = connect(uri)
    rnd = random.Random(2803)
    pages = list(range(1536, 2048))
    rnd.shuffle(pages)
    t0 = time.time()
    bad = 0
    with open(os.path.join(sd, "reader.log"), "w", buffering=1) as log:
        for p in pages:
            if time.time() - t0 > 20:
                break
            try:
                d = h.pread(P, p * P)
            except nbd.Error as e:
                log.write("error %d %s\n" % (p, e.string))
                break
            if d == img[p * P:(p + 1) * P]:
                log.write("ok %d\n" % p)
            else:
                bad += 1
                log.write("bad %d\n" % p)
            time.sleep(0.01)
    if bad:
        print("reader: %d pages read wrong BEFORE the kill" % bad, file=sys.stderr)
        sys.exit(1)


def check_after(uri, img_path, srclog, sd, mark):
    img = open(img_path, "rb").read()
    model = bytearray(open(os.path.join(sd, "model.img"), "rb").read())
    p1 = json.load(open(os.path.join(sd, "phase1.json")))
    alt = {}            # page -> the other allowed content (an unflushed or unfinished write)
    fua_done = 0
    unflushed = 0
    for line in open(os.path.join(sd, "writer.log")):
        w = line.split()
        if w[0] != "done" or w[4] != "1":
            continue
        off, ln, seed = int(w[1]), int(w[2]), int(w[3])
        apply(model, off, pattern(ln, seed))
        fua_done += 1
    done = {tuple(l.split()[1:]) for l in open(os.path.join(sd, "writer.log")) if l.startswith("done ")}
    for line in open(os.path.join(sd, "writer.log")):
        w = line.split()
        if w[0] != "plan":
            continue
        off, ln, seed, fua = int(w[1]), int(w[2]), int(w[3]), w[4] == "1"
        if fua and tuple(w[1:]) in done:
            continue
        p = off // P
        page = bytearray(model[p * P:(p + 1) * P])
        page[off - p * P:off - p * P + ln] = pattern(ln, seed)
        alt[p] = bytes(page)
        unflushed += 1
    reader_ok = [int(l.split()[1]) for l in open(os.path.join(sd, "reader.log")) if l.startswith("ok ")]
    note("after restart: %d FUA writes completed by the writer, %d unflushed/unfinished writes, "
         "%d pages read OK by the reader before the kill" % (fua_done, unflushed, len(reader_ok)))
    check(len(reader_ok) > 0 and unflushed > 0, "the background load did nothing before the kill "
           "(reader %d pages, writer %d unflushed writes)" % (len(reader_ok), unflushed))

    h = connect(uri)
    # 1. pages present at the last flush, and the durably written pages: right data, no source read
    for p in p1["present"]:
        check_data(model[p * P:(p + 1) * P], h.pread(P, p * P), "page %d (present at the last flush)" % p)
    pulled = [r for r in source_reads(srclog, mark)]
    bad = sorted({p for (o, c) in pulled for p in page_ranges(o, c)} & set(p1["present"]))
    check(not bad, "pages present before the last flush were pulled from the source again after the "
           "restart: %d pages, e.g. %r (source reads %r)" % (len(bad), bad[:10], pulled[:10]))
    mark2 = log_mark(srclog)
    for p in p1["written"]:
        check_data(model[p * P:(p + 1) * P], h.pread(P, p * P), "page %d (flushed or FUA write)" % p)
    pulled = source_reads(srclog, mark2)
    check(not pulled, "reading the pages written before the last flush/FUA pulled from the source: %r" % pulled[:10])

    # 2. every page: the model's content, or (for a page with an unflushed write) the other version
    garbage = []
    for base in range(0, len(img), 64 * P):
        d = h.pread(64 * P, base)
        for i in range(64):
            p = base // P + i
            got = d[i * P:(i + 1) * P]
            if got == model[p * P:(p + 1) * P]:
                continue
            if p in alt and got == alt[p]:
                continue
            garbage.append(p)
    for p in garbage[:10]:
        why = "matches the source image" if img[p * P:(p + 1) * P] == h.pread(P, p * P) else \
            hexdiff(bytes(model[p * P:(p + 1) * P]), h.pread(P, p * P), p * P)
        kind = ("flushed/FUA write" if p in p1["written"] else "present at flush" if p in p1["present"]
                else "read OK before the kill" if p in reader_ok else "unflushed write" if p in alt else "untouched")
        fail("page %d (%s) after kill -9 + restart is neither its expected content nor an allowed "
             "alternative: %s" % (p, kind, why))
    check(not garbage, "%d page(s) wrong after kill -9 + restart" % len(garbage))
    note("all %d pages checked" % (len(img) // P))
    h.shutdown()


if __name__ == "__main__":
    cmd = sys.argv[1]
    a = sys.argv[2:]
    if cmd == "phase1":
        phase1(*a)
    elif cmd == "writer":
        writer(*a)
    elif cmd == "reader":
        reader(*a)
    elif cmd == "check":
        check_after(a[0], a[1], a[2], a[3], int(a[4]))
    else:
        sys.exit("unknown subcommand " + cmd)
    done()
