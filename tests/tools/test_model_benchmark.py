"""--preset model: a Llama-shaped transformers model per attn_implementation, at tiny sizes.

The CLI run checks the records and that pyattn, sdpa and eager generate the same greedy tokens in fp32 (so the
timings compare equal work); the in-process ones check which points are skipped and why.
"""
import json

import pytest
import torch
from test_benchmarks import run_benchmarks

pytest.importorskip("transformers")
from benchmarks import measure, model  # noqa: E402


@pytest.mark.subprocess
def test_model_preset_writes_records_whose_impls_generate_the_same_tokens(tmp_path):
    run_benchmarks("--device", "cpu", "--preset", "model", "--quick", "--contexts", "24", "--dtype", "fp32", "--out",
                   str(tmp_path))
    data = json.loads((tmp_path / "model.json").read_text())
    meta = data["meta"]
    assert meta["peaks"]["fp32"] > 0 and meta["peaks"]["copy_gbps"] > 0
    assert meta["cpu_model"] and meta["cpu_capability"]
    runs = [r for r in data["records"] if r["kind"] == "model"]
    assert {(r["model"], r["impl"]) for r in runs} == {(m, i) for m in model.MODELS for i in model.IMPLS}
    for r in runs:
        assert r["status"] == "ok", r
        assert r["context"] == 24 and r["layers"] == model.QUICK_LAYERS
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["prefill_gflops"] > 0 and r["roof_fraction"] > 0
        assert r["decode_steps"] == r["rounds"] * model.QUICK_DECODE_STEPS
        assert len(r["tokens"]) == model.QUICK_DECODE_STEPS + 1
        assert r["same_tokens_as_sdpa"] is True, r
        assert r["logits_max_diff_vs_sdpa"] < 1e-3
    calls = [r for r in data["records"] if r["kind"] == "call"]
    assert {(r["call"], r["impl"]) for r in calls} == {(c[0], i) for c in model.CALLS for i in ("pyattn", "sdpa")}
    assert all(r["us"] > 0 for r in calls)
    table = (tmp_path / "model.md").read_text()
    assert "| llama-d128 | fp32 | 24 | pyattn |" in table and "| tiny | fp32 | 8:8 | 16 | 16 | 64 | pyattn |" in table


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=model.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def measure_tiny(contexts, budget, dtype="fp32"):
    import pyattn.integrations.transformers as pyattn_hf

    pyattn_hf.register()
    return model.measure_model("tiny", tiny_config(), [dtype], contexts, model.IMPLS, 3, budget, "cpu",
                               {dtype: 1.0}, quick=True, log=lambda line: None)


def test_eager_is_skipped_where_its_scores_do_not_fit(monkeypatch):
    """Eager's (Hq, L, L) scores at the second context do not fit in the memory allowed; the fused impls run."""
    config = tiny_config()
    monkeypatch.setattr(measure, "available_bytes",
                        lambda device: model.eager_bytes(config, 48, torch.float32) / 0.7)
    records = measure_tiny([32, 64], model.Budget(600, 60))
    by = {(r["context"], r["impl"]): r for r in records}
    assert by[(64, "eager")]["status"] == "skipped" and "do not fit" in by[(64, "eager")]["note"]
    assert all(by[(L, i)]["status"] == "ok" for L in (32, 64) for i in ("pyattn", "sdpa"))
    assert by[(32, "eager")]["status"] == "ok" and by[(32, "eager")]["tokens"] == by[(32, "sdpa")]["tokens"]


def test_a_point_past_the_time_budget_is_skipped_with_its_prediction():
    """The first context runs; the next one's prefill, extrapolated by FLOPs, exceeds the per-call limit."""
    budget = model.Budget(600, max_call_s=1e-9)
    records = measure_tiny([16, 4096], budget)
    assert all(r["status"] == "ok" for r in records if r["context"] == 16)
    late = [r for r in records if r["context"] == 4096]
    assert len(late) == 3 and all(r["status"] == "skipped" and "per prefill call" in r["note"] for r in late)
