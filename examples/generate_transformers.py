"""A Hugging Face transformers model generating with pyattn's attention (attn_implementation="pyattn").

    python examples/generate_transformers.py              # a tiny random Llama, built and saved locally
    python examples/generate_transformers.py MODEL_DIR    # a model (and tokenizer) you already have

Greedy decoding with a KV cache, checked against transformers' eager attention.
"""
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import pyattn.integrations.transformers

PROMPTS = ["Attention is all you", "The capital of France is"]


def tiny_llama(folder):
    """A random-weight Llama with grouped-query attention (8 query heads, 2 key/value heads), saved to folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def generate(folder, impl, inputs):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=torch.float32).eval()
    return model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pyattn.integrations.transformers.register()  # makes attn_implementation="pyattn" known
    with tempfile.TemporaryDirectory() as tmp:
        folder = argv[0] if argv else tiny_llama(tmp)
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left") if argv else None
        if tokenizer is not None:
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            inputs = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
        else:  # token ids of two left-padded prompts
            ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            inputs = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)
        ours, eager = (generate(folder, impl, inputs) for impl in ("pyattn", "eager"))
    for row in ours:
        print(tokenizer.decode(row, skip_special_tokens=True) if tokenizer else row.tolist())
    print("same tokens as eager attention:", torch.equal(ours, eager))
    return 0 if torch.equal(ours, eager) else 1


if __name__ == "__main__":
    sys.exit(main())
