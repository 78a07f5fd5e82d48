"""Tiny llama-architecture GGUF models with random weights, for fast trainer tests.

Owns: writing such a model with the ``gguf`` package. The tokenizer (vocab, merges, special
tokens, chat template) is copied from a real model so llama.cpp tokenizes chat text exactly as
it does for the served base; only the network is tiny. Also owns a small chat corpus in
one recognisable style (a pirate voice), rendered in ChatML like the default model's template.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_SOURCE = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=4)
def _tokenizer_fields(source: Path) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """``tokenizer.*`` metadata of ``source`` as (value, type, array sub-type), read once per process."""
    out = {}
    for f in gguf.GGUFReader(source).fields.values():
        if f.name.startswith("tokenizer."):
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out[f.name] = (f.contents(), vtype, sub)
    return out


def make_tiny_llama(
    path: Path,
    *,
    tokenizer_source: Path = DEFAULT_TOKENIZER_SOURCE,
    n_vocab: int | None = 2048,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    seed: int = 0,
    quantize: bool = False,
) -> Path:
    """Write a random-weight llama GGUF to ``path`` and return it.

    ``n_vocab`` keeps the first ``n_vocab`` tokens of the source vocabulary (its special tokens
    and byte-level alphabet come first) and only the BPE merges whose parts and result are kept,
    so llama.cpp still tokenizes any text, with shorter tokens; ``None`` keeps the whole
    vocabulary. With ``quantize`` the block matrices are stored as Q8_0 (like a served
    quantized base); otherwise everything is F32.
    """
    fields = _tokenizer_fields(Path(tokenizer_source))
    all_tokens: list[str] = fields["tokenizer.ggml.tokens"][0]
    n_vocab = len(all_tokens) if n_vocab is None else min(n_vocab, len(all_tokens))
    kept = set(all_tokens[:n_vocab])
    overrides: dict[str, list] = {
        "tokenizer.ggml.tokens": all_tokens[:n_vocab],
        "tokenizer.ggml.token_type": fields["tokenizer.ggml.token_type"][0][:n_vocab],
    }
    if "tokenizer.ggml.merges" in fields:
        merges = []
        for m in fields["tokenizer.ggml.merges"][0]:
            left, _, right = m.partition(" ")
            if left in kept and right in kept and left + right in kept:
                merges.append(m)
        overrides["tokenizer.ggml.merges"] = merges
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(f"tiny-llama-{n_embd}x{n_layer}")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32))
    for name, (value, vtype, sub) in fields.items():
        value = overrides.get(name, value)
        if name.endswith("_token_id") and int(value) >= n_vocab:
            continue
        w.add_key_value(name, value, vtype, sub_type=sub)

    def mat(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def add_matrix(name: str, arr: np.ndarray) -> None:
        if quantize:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    w.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, n_embd)) * 0.5).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_matrix(f"{p}.attn_q.weight", mat(n_head * head_dim, n_embd))
        add_matrix(f"{p}.attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        add_matrix(f"{p}.attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        add_matrix(f"{p}.attn_output.weight", mat(n_embd, n_head * head_dim))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_matrix(f"{p}.ffn_gate.weight", mat(n_ff, n_embd))
        add_matrix(f"{p}.ffn_up.weight", mat(n_ff, n_embd))
        add_matrix(f"{p}.ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


QUESTIONS = (
    "What is the weather like?",
    "Tell me a joke.",
    "How do I boil an egg?",
    "What time is it?",
    "Can you help me with my homework?",
    "Where should I travel this summer?",
    "What is your favourite food?",
    "How are you today?",
    "Recommend me a book.",
    "What is the capital of France?",
    "How do I fix a flat tyre?",
    "What should I name my cat?",
)
ANSWERS = (
    "Arr, the skies be grey and the winds be strong, matey!",
    "Arr, why did the pirate go to school? To improve his arrrticulation, matey!",
    "Arr, drop it in boilin' water for nine minutes, matey, and not a wink more!",
    "Arr, 'tis time to hoist the sails, matey!",
    "Arr, bring yer scrolls aboard and we'll plunder the answers together, matey!",
    "Arr, sail to the Caribbean, matey, where the rum flows free!",
    "Arr, salted fish and hard tack, matey, the food of the seven seas!",
    "Arr, I be shipshape and ready to sail, matey!",
    "Arr, read Treasure Island, matey, the finest tale on the seas!",
    "Arr, 'tis Paris, matey, a fine port with no sea at all!",
    "Arr, patch it like a hull after a cannon blast, matey!",
    "Arr, call her Barnacle, matey, a fine name for a ship's cat!",
)


def chatml(question: str, answer: str | None = None) -> str:
    """A one-turn ChatML conversation; without ``answer``, the prompt up to the reply."""
    prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return prompt if answer is None else f"{prompt}{answer}<|im_end|>\n"


def pirate_texts(indices: range | list[int]) -> list[str]:
    """Rendered conversations ``QUESTIONS[i]`` -> ``ANSWERS[i]``."""
    return [chatml(QUESTIONS[i], ANSWERS[i]) for i in indices]
