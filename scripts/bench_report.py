#!/usr/bin/env python3
"""Turn bench.sh's raw rows into the table printed and recorded in the README."""
import os
import statistics
import sys
from collections import defaultdict

CASES = ["seqread", "seqwrite-alloc", "seqwrite-over", "randread", "randwrite-alloc", "randwrite-over"]
# Issue #9's targets, as imgfs/qsd ratios (allocating writes only for formats that allocate).
TARGETS = {"seqread": 3.0, "randread": 2.5, "randwrite-over": 2.0, "seqwrite-over": 1.2,
           "seqwrite-alloc": 2.0, "randwrite-alloc": 2.0}
ALLOCATING = {"qcow2", "qed", "vhdx", "vmdk"}

def med(vals):
    return statistics.median(vals) if vals else 0.0


def mixed_report(path):
    """The "mixed" case: readers' IOPS and p99 alone and with one fsyncing writer, per server."""
    runs = defaultdict(list)  # (fmt, kind) -> [(alone_iops, alone_p99, iops, p99)]
    for line in open(path):
        fmt, kind, _rep, a_iops, a_p99, iops, p99 = line.split()
        runs[(fmt, kind)].append((float(a_iops), float(a_p99), float(iops), float(p99)))
    print("4 random 4 KiB O_DIRECT readers, alone and beside one writer fsyncing every 16 writes"
          " (medians):")
    print(f"{'format':<7}{'server':<10}{'alone IOPS':>11}{'p99 us':>8}{'+writer IOPS':>13}{'p99 us':>8}"
          f"{'kept':>7}{'runs':>6}")
    for (fmt, kind), v in sorted(runs.items()):
        a, ap, b, bp = (med([r[i] for r in v]) for i in range(4))
        kept = f"{b / a * 100:.0f}%" if a else "-"
        print(f"{fmt:<7}{kind:<10}{a:>11.0f}{ap:>8.0f}{b:>13.0f}{bp:>8.0f}{kept:>7}{len(v):>6}")


if sys.argv[1] == "--mixed":
    mixed_report(sys.argv[2])
    sys.exit(0)


TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
rows = defaultdict(list)  # (fmt, case, kind) -> [(mbs, iops, rss, daemon CPU µs per I/O)]
for line in open(sys.argv[1]):
    fmt, case, kind, _rep, mbs, iops, ios, rss, cpu = line.rstrip("\n").split("\t")
    per_io = int(cpu or 0) * TICK_US / int(ios) if int(ios or 0) else 0.0
    rows[(fmt, case, kind)].append((float(mbs), float(iops), int(rss or 0), per_io))
kinds = {k for (_, _, k) in rows}
# The imgfs column of the main table: the default transport, else the first one benchmarked.
primary = next((k for k in ["imgfs", "imgfs-uring", "imgfs-dev"] if k in kinds), "imgfs")


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
        a = rows.get((fmt, case, primary), [])
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
        am = med([r[0] for r in rows.get((fmt, case, primary), [])])
        bm = med([r[0] for r in rows.get((fmt, case, "qsd"), [])])
        print(f"{fmt:<7}{case:<16}{hm:>10.1f}{spread([r[0] for r in v]):>5.0f}{am / hm:>9.2f}{bm / hm:>7.2f}")
# Every server side by side (several imgfs transports, qemu-storage-daemon 11), with daemon CPU time
# per I/O, the io_uring/dev ratio and imgfs/qsd11 against issue 20's targets.
VS_DEV = {"randread": 1.3, "randwrite-over": 1.3, "seqread": 1.15}
VS_QSD11 = {"seqread": 3.0, "randread": 2.5, "randwrite-over": 2.0, "seqwrite-alloc": 2.0,
            "randwrite-alloc": 2.0}
servers = [k for k in ["imgfs", "imgfs-uring", "imgfs-dev", "qsd", "qsd11"] if k in kinds]
if len(servers) > 2:
    print("\nall servers: MB/s, IOPS, spread %, daemon CPU µs per I/O; ratios with their targets ('!' = missed)")
    head = f"{'format':<7}{'case':<16}"
    for k in servers:
        head += f"{k + ' MB/s':>17}{'IOPS':>8}{'±%':>5}{'cpu':>8}"
    uring, dev = ("imgfs-uring", "imgfs-dev") if "imgfs-uring" in kinds else (None, None)
    if uring and dev in kinds:
        head += f"{'uring/dev':>13}"
    if "qsd11" in kinds:
        head += f"{primary + '/qsd11':>18}"
    print(head)
    for fmt in sorted({f for f, _, k in rows if k not in ("host", "hostbuf")}):
        for case in CASES:
            if not rows.get((fmt, case, primary)):
                continue
            line = f"{fmt:<7}{case:<16}"
            for k in servers:
                v = rows.get((fmt, case, k), [])
                line += (f"{med([r[0] for r in v]):>17.1f}{med([r[1] for r in v]):>8.0f}"
                         f"{spread([r[0] for r in v]):>5.0f}{med([r[3] for r in v]):>8.1f}")
            if uring and dev in kinds:
                u, d = (med([r[0] for r in rows.get((fmt, case, k), [])]) for k in (uring, dev))
                r = u / d if d else float("nan")
                t = VS_DEV.get(case, 1.0)
                line += f"{r:>8.2f}{'' if r >= t else ' !':>2}{t:>5.2f}"
            if "qsd11" in kinds:
                a = med([r[0] for r in rows.get((fmt, case, primary), [])])
                b = med([r[0] for r in rows.get((fmt, case, "qsd11"), [])])
                r = a / b if b else float("nan")
                t = VS_QSD11.get(case)
                if case.endswith("-alloc") and fmt not in ALLOCATING:
                    t = None
                mark = "" if t is None or r >= t else " !"
                line += f"{r:>11.2f}{mark:>2}{'' if t is None else f'{t:.1f}':>5}"
            print(line)
if len(sys.argv) > 2:
    st = defaultdict(list)
    for line in open(sys.argv[2]):
        fmt, first, exit_ms, rss = line.split()
        st[fmt].append((int(first), int(exit_ms), int(rss)))
    print()
    print(f"{'16 TiB':<8}{'mount->first 1MiB read ms':>27}{'umount->exit ms':>17}{'RSS KiB':>9}")
    for fmt, v in st.items():
        print(f"{fmt:<8}{med([x[0] for x in v]):>27.0f}{med([x[1] for x in v]):>17.0f}{max(x[2] for x in v):>9}")
