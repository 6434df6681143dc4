#!/usr/bin/env python3
"""Turn bench.sh's raw rows into the table printed and recorded in the README."""
import statistics
import sys
from collections import defaultdict

CASES = ["seqread", "seqwrite-alloc", "seqwrite-over", "randread", "randwrite-alloc", "randwrite-over"]
# Issue #9's targets, as imgfs/qsd ratios (allocating writes only for formats that allocate).
TARGETS = {"seqread": 3.0, "randread": 2.5, "randwrite-over": 2.0, "seqwrite-over": 1.2,
           "seqwrite-alloc": 2.0, "randwrite-alloc": 2.0}
ALLOCATING = {"qcow2", "qed", "vhdx", "vmdk"}

rows = defaultdict(list)  # (fmt, case, kind) -> [(mbs, iops, rss)]
for line in open(sys.argv[1]):
    fmt, case, kind, _rep, mbs, iops, rss = line.rstrip("\n").split("\t")
    rows[(fmt, case, kind)].append((float(mbs), float(iops), int(rss or 0)))


def med(vals):
    return statistics.median(vals) if vals else 0.0


def spread(vals):
    return (max(vals) - min(vals)) / med(vals) * 100 if vals and med(vals) else 0.0


def target(fmt, case):
    if case.endswith("-alloc") and fmt not in ALLOCATING:
        return None
    return TARGETS[case]


host = {case: med([r[0] for r in v]) for (f, case, k), v in rows.items() if k == "host"}
# Sequential writes were also run buffered on a plain host file, interleaved with the servers (per
# format): both servers write into the host page cache, so that is their ceiling.
hostbuf = {(f, case): v for (f, case, k), v in rows.items() if k == "hostbuf"}
print(f"{'format':<7}{'case':<16}{'imgfs MB/s':>11}{'IOPS':>8}{'±%':>5}{'qsd MB/s':>10}{'IOPS':>8}{'±%':>5}"
      f"{'ratio':>7}{'target':>8}{'host MB/s':>10}{'/host':>6}{'RSS KiB':>8}{'qsd RSS':>8}")
met = total = 0
for fmt in sorted({f for f, _, k in rows if k not in ("host", "hostbuf")}):
    for case in CASES:
        a = rows.get((fmt, case, "imgfs"), [])
        b = rows.get((fmt, case, "qsd"), [])
        if not a:
            continue
        am, bm = med([r[0] for r in a]), med([r[0] for r in b])
        ratio = am / bm if bm else float("nan")
        t = target(fmt, case)
        if t is None:
            tcol = "-"
        else:
            total += 1
            ok = ratio >= t
            met += ok
            tcol = f"{t:.1f}{'' if ok else ' !'}"
        hm = host.get(case, 0)
        vs_host = f"{am / hm:.2f}" if hm else "-"
        print(f"{fmt:<7}{case:<16}{am:>11.1f}{med([r[1] for r in a]):>8.0f}{spread([r[0] for r in a]):>5.0f}"
              f"{bm:>10.1f}{med([r[1] for r in b]):>8.0f}{spread([r[0] for r in b]):>5.0f}{ratio:>7.2f}"
              f"{tcol:>8}{hm:>10.1f}{vs_host:>6}{max(r[2] for r in a):>8}{max((r[2] for r in b), default=0):>8}")
print(f"\nratio targets met: {met} of {total} ('!' marks a miss)")
if hostbuf:
    print("\nbuffered writes to a plain host file, run between the servers' runs (the page-cache ceiling"
          " both servers write under):")
    print(f"{'format':<7}{'case':<16}{'host MB/s':>10}{'±%':>5}{'imgfs/it':>9}{'qsd/it':>7}")
    for (fmt, case), v in sorted(hostbuf.items()):
        hm = med([r[0] for r in v])
        am = med([r[0] for r in rows.get((fmt, case, "imgfs"), [])])
        bm = med([r[0] for r in rows.get((fmt, case, "qsd"), [])])
        print(f"{fmt:<7}{case:<16}{hm:>10.1f}{spread([r[0] for r in v]):>5.0f}{am / hm:>9.2f}{bm / hm:>7.2f}")
if len(sys.argv) > 2:
    st = defaultdict(list)
    for line in open(sys.argv[2]):
        fmt, first, exit_ms, rss = line.split()
        st[fmt].append((int(first), int(exit_ms), int(rss)))
    print()
    print(f"{'16 TiB':<8}{'mount->first 1MiB read ms':>27}{'umount->exit ms':>17}{'RSS KiB':>9}")
    for fmt, v in st.items():
        print(f"{fmt:<8}{med([x[0] for x in v]):>27.0f}{med([x[1] for x in v]):>17.0f}{max(x[2] for x in v):>9}")
