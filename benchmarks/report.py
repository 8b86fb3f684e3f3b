"""Records -> markdown table and a short speedup summary."""
from collections import defaultdict

from .sweep import fmt_bytes


def _key(r):
    return (r["D"], r["dtype"], r["causal"], r["pass"], r["B"], r["H"], r.get("Hkv", r["H"]), r["L"], r["S"])


def _metric(r):
    """GB/s of KV cache read for decode points (L == 1), GFLOP/s otherwise."""
    return r["gbps"] if r["L"] == 1 else r["tflops"] * 1e3


def markdown_table(records):
    rows = ["| impl | dtype | B×H (kv) | L | S | D | causal | pass | ms | GFLOP/s | GB/s | peak mem | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (_key(r), r["impl"])):
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else ""
        gf = f"{r['tflops'] * 1e3:.0f}" if r["tflops"] is not None else ""
        bw = f"{r['gbps']:.1f}" if r.get("gbps") else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        rows.append(f"| {r['impl']} | {r['dtype']} | {r['B']}×{r['H']} ({r.get('Hkv', r['H'])}) | {r['L']} | "
                    f"{r['S']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['pass']} | {ms} | {gf} | {bw} | "
                    f"{fmt_bytes(r['peak_mem_bytes'])} | {status} |")
    return "\n".join(rows)


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
