"""python -m benchmarks --preset model [--device cpu|cuda] [--quick] [--dtype ...] [--contexts ...]: what a user feels.

A Llama-shaped transformers model built from a LlamaConfig (random weights, nothing downloaded) runs a prompt of
512, 4k and 16k tokens (batch 1) and then greedy decode steps over its dynamic KV cache, with
attn_implementation "pyattn" (pyattn.integrations.transformers), "sdpa" and "eager" switched on the same model
(set_attn_implementation: the same weights, so equal work). Two shapes: D=64 (hidden 1024, 8 layers, 16:4 heads)
and D=128 (hidden 2048, 4 layers, 16:4 heads). The loop is written out (prefill with logits_to_keep=1, then one
token per forward call, argmax) rather than model.generate, so that each step is timed alone; its work is
generate's minus the logits processors. A round runs every impl once (the prefill and its decode steps), every
other round in reverse order, so that the host's drift over a run moves all impls alike. Prefill: median over
the rounds; decode: median step over all rounds. The first round's greedy tokens and last-token logits of each
impl are compared with sdpa's.

Points that would not fit (eager's dense L x L scores) or whose predicted time exceeds the run's budget are
recorded as skipped with the reason. Before the model, the per-call cost: a tiny call (B=1, H=8, L=S=16, D=64)
and one decode layer's call (16:4 heads, L=1, S=512), pyattn.scaled_dot_product_attention against torch's.
"""
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import pyattn

from . import measure
from .sweep import DTYPES
from .table import fmt_bytes, markdown_table, status_cell, write_records

IMPLS = ("pyattn", "sdpa", "eager")
VOCAB = 32000
MODELS = {  # name -> LlamaConfig fields
    "llama-d64": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64),
    "llama-d128": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128),
}
QUICK_LAYERS = 2
CONTEXTS, QUICK_CONTEXTS = [512, 4096, 16384], [512]
DECODE_STEPS, QUICK_DECODE_STEPS = 8, 4
# (name, Hq, Hkv, L, S, D) of the per-call records
CALLS = [("tiny", 8, 8, 16, 16, 64), ("decode layer", 16, 4, 1, 512, 64)]
CALLS_A_STEP = 100


def llama_config(name, layers=None):
    from transformers import LlamaConfig

    fields = dict(MODELS[name])
    if layers:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32768, attention_dropout=0.0, **fields)


def build_model(config, dtype, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def matmul_params(config):
    """Weights every token multiplies by (the layers' projections and MLP; not the embedding or lm_head)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return config.num_hidden_layers * (attn + 3 * h * i)


def prefill_flops(config, L):
    """2 per weight per token, the lm_head for the last token, and causal attention (4 * Hq * D per pair)."""
    pairs = L * (L + 1) // 2
    attention = 4 * config.num_attention_heads * config.head_dim * pairs * config.num_hidden_layers
    return 2 * matmul_params(config) * L + 2 * config.hidden_size * VOCAB + attention


def eager_bytes(config, L, dtype):
    """eager's largest live tensors in one layer: the (Hq, L, L) scores, their float32 softmax and its cast back,
    and the dense (L, L) mask."""
    elt = measure.BYTES[dtype]
    return config.num_attention_heads * L * L * (elt + 4 + elt) + L * L * elt


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(fn()'s result, its seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def generate(model, ids, steps, device):
    """Prefill ids (1, L), then steps greedy decode steps over a DynamicCache.
    -> (prefill seconds, [step seconds], [tokens], last-token logits of the prefill (vocab,) float32)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out, prefill_s = timed(lambda: model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1), device)
        logits = out.logits[0, -1].float()
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens, step_s = [token.item()], []
        for _ in range(steps):
            out, s = timed(lambda: model(token, past_key_values=cache, use_cache=True), device)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token.item())
            step_s.append(s)
    return prefill_s, step_s, tokens, logits


def _record(model_name, config, dtype, L, impl, device):
    return dict(kind="model", impl=impl, attn_implementation=impl, device=device, model=model_name, dtype=dtype,
                context=L, B=1, hidden=config.hidden_size, layers=config.num_hidden_layers,
                H=config.num_attention_heads, Hkv=config.num_key_value_heads, D=config.head_dim, prefill_ms=None, prefill_ms_min=None,
                prefill_gflops=None, roof_fraction=None, decode_ms=None, decode_steps=0, rounds=0, tokens=None,
                same_tokens_as_sdpa=None, logits_max_diff_vs_sdpa=None, x_sdpa_prefill=None, x_sdpa_decode=None,
                status="ok", note="")


@dataclass
class Runs:
    """One impl's results over the rounds of a point."""
    prefill_s: list = field(default_factory=list)  # one a round
    step_s: list = field(default_factory=list)  # every decode step of every round
    tokens: list = None  # the first round's greedy tokens
    logits: torch.Tensor = None  # (vocab,) float32: the first round's last-token logits of the prefill


def run_rounds(model, impls, L, steps, rounds, device):
    """-> {impl: Runs} of a random prompt of L tokens."""
    ids = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(L)).to(device)
    got = {impl: Runs() for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            model.set_attn_implementation(impl)
            prefill_s, step_s, tokens, logits = generate(model, ids, steps, device)
            runs = got[impl]
            runs.prefill_s.append(prefill_s)
            runs.step_s += step_s
            if runs.tokens is None:
                runs.tokens, runs.logits = tokens, logits
    return got


def measured_records(base, got, config, L, peak):
    """Records of one point's impls (base: {impl: record}) from run_rounds' results; comparisons against sdpa's."""
    def ms(seconds):
        return statistics.median(seconds) * 1e3 if seconds else None

    sdpa = got.get("sdpa")
    out = []
    for impl, runs in got.items():
        prefill_ms, decode_ms, roof = ms(runs.prefill_s), ms(runs.step_s), peak.get(base[impl]["dtype"])
        gflops = prefill_flops(config, L) / prefill_ms / 1e6
        rec = {**base[impl], "prefill_ms": prefill_ms, "prefill_ms_min": min(runs.prefill_s) * 1e3,
               "prefill_gflops": gflops, "roof_fraction": gflops / roof if roof else None, "decode_ms": decode_ms,
               "decode_steps": len(runs.step_s), "rounds": len(runs.prefill_s), "tokens": runs.tokens}
        if sdpa is not None:
            rec.update(same_tokens_as_sdpa=runs.tokens == sdpa.tokens,
                       logits_max_diff_vs_sdpa=(runs.logits - sdpa.logits).abs().max().item(),
                       x_sdpa_prefill=ms(sdpa.prefill_s) / prefill_ms,
                       x_sdpa_decode=ms(sdpa.step_s) / decode_ms if decode_ms else None)
        out.append(rec)
    return out


class Budget:
    """Predicts a point's seconds from the last point its (model, dtype, impl) ran, scaled by prefill FLOPs (the
    decode steps in proportion to the context, an upper bound: they also read the weights), and says why a
    point is skipped."""

    def __init__(self, time_limit, max_call_s):
        self.start, self.time_limit, self.max_call_s = time.time(), time_limit, max_call_s
        self.last = {}  # (model, dtype, impl) -> (context, prefill s, decode step s)

    def predicted_call_s(self, series, config, L):
        """(prefill s, decode step s), or (0, 0) for a series with nothing measured yet."""
        if series not in self.last:
            return 0.0, 0.0
        L0, prefill_s, step_s = self.last[series]
        return prefill_s * prefill_flops(config, L) / prefill_flops(config, L0), step_s * max(1.0, L / L0)

    def round_s(self, series_of, config, L, steps):
        calls = [self.predicted_call_s(s, config, L) for s in series_of]
        return sum(p + steps * d for p, d in calls), max((p for p, _ in calls), default=0.0)

    def skip_note(self, series_of, config, L, steps, rounds):
        left = self.time_limit - (time.time() - self.start)
        round_s, longest = self.round_s(series_of, config, L, steps)
        if left <= 0:
            return f"run time limit {self.time_limit:.0f} s reached"
        if longest > self.max_call_s:
            return f"time budget: predicted {longest:.0f} s per prefill call (limit {self.max_call_s:.0f} s)"
        if rounds * round_s > left:
            return f"time budget: predicted {rounds * round_s:.0f} s for {rounds} rounds, {left:.0f} s left"
        return None

    def ran(self, series, L, prefill_s, step_s):
        self.last[series] = (L, prefill_s, step_s)


def rounds_for(round_s, quick):
    """3 rounds, 2 where one round takes over a minute (a median of 2 is their mean); quick: 2."""
    return 2 if quick or round_s > 60 else 3


def memory_note(impl, config, L, dtype, device):
    """Why impl's point would not fit in memory, or None: only eager materialises the scores."""
    need = eager_bytes(config, L, DTYPES[dtype]) if impl == "eager" else 0
    if need <= 0.7 * measure.available_bytes(device):
        return None
    return f"dense scores and mask of {fmt_bytes(need)} per layer do not fit"


def measure_model(model_name, config, dtypes, contexts, impls, steps, budget, device, peak, quick, log=print):
    """Records of one model shape: per dtype (one model, its impls switched), per context, every impl."""
    records = []
    for dtype in dtypes:
        model = build_model(config, DTYPES[dtype], device)
        for impl in impls:  # first-use setup (thread pools, kernel selection) outside the timed rounds
            model.set_attn_implementation(impl)
            generate(model, torch.zeros(1, 16, dtype=torch.long, device=device), 1, device)
        for L in contexts:
            base = {impl: _record(model_name, config, dtype, L, impl, device) for impl in impls}
            running = []
            for impl in impls:
                note = memory_note(impl, config, L, dtype, device)
                if note:
                    records.append({**base[impl], "status": "skipped", "note": note})
                else:
                    running.append(impl)
            series = [(model_name, dtype, impl) for impl in running]
            rounds = rounds_for(budget.round_s(series, config, L, steps)[0], quick)
            note = budget.skip_note(series, config, L, steps, rounds)
            if note:
                records.extend({**base[impl], "status": "skipped", "note": note} for impl in running)
                log(f"{model_name} {dtype} L={L}: skipped, {note}")
                continue
            got = run_rounds(model, running, L, steps, rounds, device)
            for rec in measured_records(base, got, config, L, peak):
                budget.ran((model_name, dtype, rec["impl"]), L, rec["prefill_ms"] / 1e3, rec["decode_ms"] / 1e3)
                log(_line(rec))
                records.append(rec)
        del model
    return records


def _repeated(fn, n):
    """A step of n calls of fn: one call is too short for the timer."""
    def step():
        for _ in range(n):
            fn()
    return step


def call_records(dtypes, device):
    """Per-call microseconds of pyattn.scaled_dot_product_attention and torch's at CALLS' shapes, interleaved
    (on CUDA each alone): what every layer of every decode step pays."""
    out = []
    for dtype in dtypes:
        for name, hq, hkv, L, S, D in CALLS:
            torch.manual_seed(0)
            q = torch.randn(1, hq, L, D, dtype=DTYPES[dtype], device=device)
            k, v = (torch.randn(1, hkv, S, D, dtype=DTYPES[dtype], device=device) for _ in range(2))
            gqa = hq != hkv
            fns = {"pyattn": lambda: pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
                   "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)}
            with torch.no_grad():
                steps = {impl: _repeated(fn, CALLS_A_STEP) for impl, fn in fns.items()}
                for step in steps.values():
                    step()
                ms = ({impl: measure.time_ms(step, device, warm=True) for impl, step in steps.items()}
                      if device == "cuda" else measure.time_interleaved(steps, min_time=0.5))
            for impl, t in ms.items():
                out.append(dict(kind="call", impl=impl, call=name, device=device, dtype=dtype, B=1, H=hq, Hkv=hkv, L=L,
                                S=S, D=D, us=t * 1e3 / CALLS_A_STEP, x_sdpa=ms["sdpa"] / t))
    return out


def _line(r):
    if r["status"] != "ok":
        return f"{r['model']:<10} {r['dtype']:<4} L={r['context']:<6} {r['impl']:<7} {status_cell(r)}"
    return (f"{r['model']:<10} {r['dtype']:<4} L={r['context']:<6} {r['impl']:<7} prefill {r['prefill_ms']:9.1f} ms"
            f"  decode step {r['decode_ms']:7.2f} ms  same tokens as sdpa: {r['same_tokens_as_sdpa']}")


def _x(v):
    return f"{v:.2f}x" if v is not None else ""


MODEL_COLUMNS = ["model", "dtype", "context", "impl", "prefill ms", "x sdpa", "GFLOP/s", "of matmul roof",
                 "decode step ms", "x sdpa", "tokens = sdpa's", "status"]
CALL_COLUMNS = ["call", "dtype", "Hq:Hkv", "L", "S", "D", "impl", "µs per call", "x sdpa"]


def model_table(records):
    """A row a record; "x sdpa" is sdpa's time over this impl's, measured in the same rounds."""
    order = {impl: i for i, impl in enumerate(IMPLS)}
    rows = []
    for r in sorted(records, key=lambda r: (r["D"], r["dtype"] != "fp32", r["dtype"], r["context"], order[r["impl"]])):
        cells = [""] * 7
        if r["status"] == "ok":
            same = "" if r["same_tokens_as_sdpa"] is None else ("yes" if r["same_tokens_as_sdpa"] else "no")
            cells = [f"{r['prefill_ms']:.1f}", _x(r["x_sdpa_prefill"]), f"{r['prefill_gflops']:.0f}",
                     f"{r['roof_fraction']:.0%}" if r["roof_fraction"] else "", f"{r['decode_ms']:.2f}",
                     _x(r["x_sdpa_decode"]), same]
        rows.append([r["model"], r["dtype"], str(r["context"]), r["impl"], *cells, status_cell(r)])
    return markdown_table(MODEL_COLUMNS, rows)


def call_table(records):
    return markdown_table(CALL_COLUMNS, [
        [r["call"], r["dtype"], f"{r['H']}:{r['Hkv']}", str(r["L"]), str(r["S"]), str(r["D"]), r["impl"],
         f"{r['us']:.1f}", _x(r["x_sdpa"])] for r in records])


def run(args, out_dir, meta):
    import pyattn.integrations.transformers as pyattn_hf

    pyattn_hf.register()
    device, quick = args.device, bool(args.quick)
    impls = tuple(args.impl or IMPLS)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impl {sorted(unknown)} for the model preset; available: {list(IMPLS)}")
    dtypes = args.dtype or ["fp32", "bf16"]
    contexts = args.contexts or (QUICK_CONTEXTS if quick else CONTEXTS)
    steps = QUICK_DECODE_STEPS if quick else DECODE_STEPS
    time_limit = args.time_limit or (90 if quick else 540)
    budget = Budget(time_limit, args.max_call_seconds or 60.0)
    load_before = os.getloadavg()
    peak = measure.peaks(device, DTYPES)
    calls = call_records(dtypes, device)
    print(call_table(calls))
    records = []
    for name in MODELS:
        config = llama_config(name, QUICK_LAYERS if quick else None)
        records += measure_model(name, config, dtypes, contexts, impls, steps, budget, device, peak, quick)
    meta = {**meta, "peaks": peak, "quick": quick, "decode_steps": steps, "time_limit_seconds": time_limit,
            "max_call_seconds": budget.max_call_s, "vocab": VOCAB, "seconds": round(time.time() - budget.start),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "method": "manual greedy loop over a DynamicCache (prefill logits_to_keep=1, then one token per call); "
                      "impls switched with set_attn_implementation on one model; interleaved rounds"}
    on = (f"{meta['gpu']}, CUDA {meta['cuda']}" if device == "cuda" else
          f"{meta['cpu_model']}, pyattn CPU capability {meta['cpu_capability']}, {meta['threads']} threads")
    roof = ", ".join(f"{k} matmul {peak[k]:.0f} GFLOP/s" for k in dtypes if k in peak)
    markdown = (f"# model{' (--quick)' if quick else ''} on {device} ({on}, torch {meta['torch']}); {roof}, copy "
                f"{peak['copy_gbps']:.1f} GB/s; load average {load_before[0]:.2f} before, "
                f"{meta['loadavg_after'][0]:.2f} after\n\n"
                f"Llama-shaped transformers models with random weights (vocab {VOCAB}): "
                + "; ".join(f"{n}: hidden {c['hidden_size']}, {QUICK_LAYERS if quick else c['num_hidden_layers']} "
                            f"layers, {c['num_attention_heads']}:{c['num_key_value_heads']} heads, D={c['head_dim']}"
                            for n, c in MODELS.items())
                + f". Batch 1; prefill of the context, then {steps} greedy decode steps over a DynamicCache "
                  "(a manual loop: prefill with logits_to_keep=1, one token per forward call). The impls run on the "
                  "same model in interleaved rounds (every other round reversed); prefill: median over rounds, "
                  "decode: median step. \"x sdpa\": sdpa's time over this impl's, same rounds. GFLOP/s: the layers' "
                  "matmuls, the last token's lm_head and causal attention, against the run's matmul roof.\n\n"
                + model_table(records) + "\n\n## Per call\n\npyattn.scaled_dot_product_attention against torch's "
                f"F.scaled_dot_product_attention, {CALLS_A_STEP} calls a step, interleaved rounds; µs per call.\n\n"
                + call_table(calls) + "\n")
    write_records(out_dir, "model", meta, records + calls, markdown)
    print(f"\nwrote {out_dir}/model.json and model.md")

