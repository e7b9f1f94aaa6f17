"""Inference: the compressed KV cache, prefill and incremental decoding, sampling and generation.

    from dsv4.inference import generate
    generate(model, tokenizer, ["Once upon a time"], max_new_tokens=50).texts

Imports the model and ops; nothing in the model or training imports it. `python -m dsv4.generate` is its command.
"""

from dsv4.inference.cache import ModelCache
from dsv4.inference.generate import Generation, GenerationStats, generate, generate_ids, prefill, sample
from dsv4.inference.step import forward_step

__all__ = ["Generation", "GenerationStats", "ModelCache", "forward_step", "generate", "generate_ids", "prefill",
           "sample"]
