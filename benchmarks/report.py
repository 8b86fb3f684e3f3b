"""Records -> markdown table and a short speedup summary."""
from collections import defaultdict

from .table import fmt_bytes, markdown_table, status_cell

COLUMNS = ["impl", "dtype", "B×H (kv)", "L", "S", "D", "causal", "pass", "ms", "GFLOP/s", "GB/s", "peak mem", "status"]


def _key(r):
    return (r["D"], r["dtype"], r["causal"], r["pass"], r["B"], r["H"], r.get("Hkv", r["H"]), r["L"], r["S"])


def _metric(r):
    """GB/s of KV cache read for decode points (L == 1), GFLOP/s otherwise."""
    return r["gbps"] if r["L"] == 1 else r["tflops"] * 1e3


def records_table(records):
    """The sweep's and the decode preset's table: a row a record, grouped by shape."""
    return markdown_table(COLUMNS, [
        [r["impl"], r["dtype"], f"{r['B']}×{r['H']} ({r.get('Hkv', r['H'])})", str(r["L"]), str(r["S"]), str(r["D"]),
         "yes" if r["causal"] else "no", r["pass"], f"{r['ms']:.2f}" if r["ms"] is not None else "",
         f"{r['tflops'] * 1e3:.0f}" if r["tflops"] is not None else "", f"{r['gbps']:.1f}" if r.get("gbps") else "",
         fmt_bytes(r["peak_mem_bytes"]), status_cell(r)]
        for r in sorted(records, key=lambda r: (_key(r), r["impl"]))])


def summary(records):
    """Per shape: each impl's GFLOP/s (GB/s for decode) and pyattn's speedup over the fastest peer."""
    by_shape = defaultdict(dict)
    for r in records:
        if r["status"] == "ok":
            by_shape[_key(r)][r["impl"]] = _metric(r)
    lines = ["shape (D dtype causal pass B H Hkv L S)                   " + "  ".join(f"{n:>14}" for n in _impls(records))
             + "   pyattn/best-peer"]
    for key in sorted(by_shape):
        got = by_shape[key]
        peers = [v for n, v in got.items() if not n.startswith("pyattn")]
        ours = [v for n, v in got.items() if n.startswith("pyattn")]
        ratio = f"{max(ours) / max(peers):.2f}x" if ours and peers else "-"
        cells = "  ".join(f"{got[n]:>14.0f}" if n in got else f"{'-':>14}" for n in _impls(records))
        lines.append(f"{str(key):<58}{cells}   {ratio}")
    return "\n".join(lines)


def _impls(records):
    return sorted({r["impl"] for r in records})
