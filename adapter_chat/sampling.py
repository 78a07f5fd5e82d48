"""What a request's sampling fields become in llama.cpp: native sampler chains, grammars, logprobs.

Owns:

- :class:`SamplingParams`, the engine's per-request sampling settings;
- building a sequence's llama.cpp sampler chain from them (:func:`build_chain`): logit bias,
  penalties, top-k, top-p, min-p, temperature, then greedy or a seeded draw;
- sampling under a grammar (:func:`build_grammar`, :class:`GrammarSampling`): the drawn token is
  checked against the grammar, and the grammar runs over the whole vocabulary only when it rejects
  that token, as llama-server does;
- grammars: a JSON schema turned into GBNF with the converter llama-cpp-python ships
  (``llama_cpp.llama_grammar.json_schema_to_gbnf``), OpenAI's ``json_object`` mode as its JSON
  grammar, and :func:`check_grammar`, which compiles a grammar once against the vocabulary so a
  bad one is refused before any token is generated;
- per-token logprobs (:func:`token_logprobs`): a log-softmax of the logits the sampler saw, in
  numpy (no Python loop over the vocabulary).

A binding module: with ``adapter_chat/llama_vocab.py`` and ``adapter_chat/engine.py`` the only modules
that import ``llama_cpp``.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np
from llama_cpp import llama_grammar

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed
PENALTY_LAST_N = 64
MAX_TOP_LOGPROBS = 20
JSON_OBJECT_GRAMMAR = llama_grammar.JSON_GBNF
"""OpenAI's ``response_format: {"type": "json_object"}``: any JSON object."""


class GrammarError(ValueError):
    """A grammar (or the JSON schema it came from) that llama.cpp cannot compile."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    """GBNF text constraining the output (root rule ``root``); None: unconstrained."""
    logprobs: int | None = None
    """None: no logprobs; 0..20: the sampled token's logprob and that many top alternatives."""
    prompt_logprobs: int | None = None
    """Also the logprob of every prompt token after the first (text completions' ``echo``), with
    that many top alternatives; such a request never reuses cached KV (its logits are needed)."""


UNENFORCED_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties",
    "maxProperties", "uniqueItems", "not", "if", "then", "else", "contains", "minContains",
    "maxContains", "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames",
    "unevaluatedProperties", "unevaluatedItems",
})  # fmt: skip
"""JSON-schema keywords llama-cpp-python's ``json_schema_to_gbnf`` (0.3.36) ignores: an answer
could break them, so a schema using one is refused instead of silently not enforced."""
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")


def unenforced_keywords(schema: Any, path: str = "") -> list[str]:
    """``keyword at path`` for every keyword of :data:`UNENFORCED_KEYWORDS` in ``schema``."""
    if not isinstance(schema, dict):
        return []
    here = path or "(root)"
    found = [f"{k!r} at {here}" for k in schema if k in UNENFORCED_KEYWORDS]
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            found += unenforced_keywords(sub, f"{path}.{key}.{name}".lstrip("."))
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []) if isinstance(schema.get(key), list) else ():
            found += unenforced_keywords(sub, f"{path}.{key}[{i}]".lstrip("."))
    for key in _SCHEMA_ONE:
        found += unenforced_keywords(schema.get(key), f"{path}.{key}".lstrip("."))
    return found


def json_schema_grammar(schema: Any) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter); GrammarError naming the problem,
    including a keyword the converter would silently not enforce."""
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    unenforced = unenforced_keywords(schema)
    if unenforced:
        raise GrammarError(
            f"the JSON schema uses {', '.join(unenforced[:5])}, which the grammar converter cannot enforce "
            "(supported: type, properties, required, additionalProperties, items, prefixItems, minItems, "
            "maxItems, minLength, maxLength, pattern, format, enum, const, anyOf, oneOf, allOf, $ref); remove it"
        )
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises ValueError, KeyError, RecursionError, ...
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {type(e).__name__}: {e}") from None
    return "\n".join(_JSON_CHAR_FIXED if ln.startswith(_JSON_CHAR_SHIPPED) else ln for ln in gbnf.splitlines())


_JSON_CHAR_SHIPPED = 'char ::= [^"\\\\] |'
_JSON_CHAR_FIXED = (
    'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
)
"""llama-cpp-python 0.3.36's converter lets a JSON string hold any character but ``"`` and the backslash,
raw newlines and other control characters included, which no JSON parser accepts (a greedy answer
here wrote a newline inside a string). llama.cpp's own converter (``json_schema_to_grammar.py``)
excludes U+0000-U+001F and U+007F, as JSON requires; its rule replaces the shipped one."""


def _init_grammar(vocab: Any, grammar: str) -> Any:
    return C.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")


def check_grammar(vocab: Any, grammar: str) -> None:
    """Compile ``grammar`` against ``vocab`` and free it; GrammarError when llama.cpp refuses it
    (a syntax error, an undefined rule, no ``root`` rule, left recursion)."""
    if "\x00" in grammar:
        raise GrammarError("the grammar contains a NUL character")
    sampler = _init_grammar(vocab, grammar)
    if not sampler:
        raise GrammarError(
            "llama.cpp could not compile the grammar (GBNF with a 'root' rule is expected; check its "
            "syntax, that every rule it uses is defined, and that no rule is left-recursive)"
        )
    C.llama_sampler_free(sampler)


def build_chain(vocab: Any, n_vocab: int, p: SamplingParams) -> Any:
    """A new llama.cpp sampler chain for one sequence (the caller frees it with
    ``llama_sampler_free``). Order: logit bias, penalties, then greedy (temperature 0) or top-k,
    top-p, min-p, temperature and a seeded draw. A grammar is not in the chain: see
    :func:`build_grammar` and :class:`GrammarSampling`."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())

    def add(s: Any) -> None:
        C.llama_sampler_chain_add(chain, s)

    if p.logit_bias:
        arr = (C.llama_logit_bias * len(p.logit_bias))(*[C.llama_logit_bias(t, b) for t, b in p.logit_bias])
        add(C.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
    if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        add(C.llama_sampler_init_penalties(PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
    if p.temperature <= 0.0:
        add(C.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(C.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        add(C.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        add(C.llama_sampler_init_min_p(p.min_p, 1))
    add(C.llama_sampler_init_temp(p.temperature))
    add(C.llama_sampler_init_dist(DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF))
    return chain


def build_grammar(vocab: Any, p: SamplingParams) -> Any:
    """llama.cpp's grammar sampler for ``p.grammar`` (the caller frees it), or None."""
    if p.grammar is None:
        return None
    g = _init_grammar(vocab, p.grammar)
    if not g:  # checked when the request came in; only a changed vocabulary gets here
        raise GrammarError("llama.cpp could not compile the grammar")
    return g


def _logits(ctx: Any, idx: int, n_vocab: int) -> np.ndarray:
    """The raw logits at batch output ``idx`` of ``ctx``: a view, valid until the next decode."""
    ptr = C.llama_get_logits_ith(ctx, idx)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


class GrammarSampling:
    """Sampling under a grammar the way llama-server's common sampler does it: draw from the chain
    first and check only the drawn token against the grammar; run the grammar over the whole
    vocabulary (the expensive part: every candidate's text against the grammar's stacks) only when
    that token is rejected, then draw again. Greedy picks the same token as grammar-first; a seeded
    draw from an untruncated distribution has the same distribution too (an allowed token t comes
    first with p(t), after a rejection with (1 - Z) p(t) / Z: p(t) / Z in all).

    One instance per engine, used on its scheduler thread: it owns a reusable candidates buffer."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (C.llama_token_data * 1)()
        self.full_passes = 0  # how often the grammar had to run over the whole vocabulary

    def _candidates(self, ctx: Any, idx: int) -> Any:
        logits = _logits(ctx, idx, self.n_vocab)
        self._data["id"] = self._ids
        self._data["logit"] = logits
        self._data["p"] = 0.0
        ptr = self._data.ctypes.data_as(C.llama_token_data_p)
        return C.llama_token_data_array(ptr, self.n_vocab, -1, False)

    @staticmethod
    def _selected(arr: Any) -> int:
        return int(arr.data[arr.selected].id)

    def sample(self, chain: Any, grammar: Any, ctx: Any, idx: int) -> int:
        """The next token of a sequence whose logits are at batch index ``idx``; accepted by
        both the chain and the grammar."""
        arr = self._candidates(ctx, idx)
        C.llama_sampler_apply(chain, ctypes.byref(arr))
        tok = self._selected(arr)
        self._one[0] = C.llama_token_data(tok, 0.0, 0.0)
        one = C.llama_token_data_array(self._one, 1, -1, False)
        C.llama_sampler_apply(grammar, ctypes.byref(one))
        if not np.isfinite(self._one[0].logit):  # rejected: constrain the whole vocabulary, draw again
            self.full_passes += 1
            arr = self._candidates(ctx, idx)
            C.llama_sampler_apply(grammar, ctypes.byref(arr))
            C.llama_sampler_apply(chain, ctypes.byref(arr))
            tok = self._selected(arr)
        C.llama_sampler_accept(grammar, tok)
        C.llama_sampler_accept(chain, tok)
        return tok


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's logprob and its top alternatives, as OpenAI's ``logprobs.content[]``."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()

    def to_openai(self) -> dict[str, Any]:
        def entry(piece: bytes, lp: float) -> dict[str, Any]:
            return {"token": piece.decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece)}

        out = entry(self.token, self.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in self.top]
        return out


def log_normaliser(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) of a row of logits: the exponentials in float32, their sum in float64.
    A logprob is then ``logits[t] - log_normaliser(logits)``; no full log-softmax row is built."""
    m = float(logits.max())
    return m + float(np.log(np.exp(logits - np.float32(m)).sum(dtype=np.float64)))


def token_logprobs(
    ctx: Any, idx: int, n_vocab: int, token: int, top_n: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """The logprob of ``token`` at batch output ``idx`` of ``ctx`` and the ``top_n`` most likely
    tokens there, from the raw logits llama.cpp computed: before logit bias, grammar, penalties
    and temperature (OpenAI reports the model's distribution the same way)."""
    logits = _logits(ctx, idx, n_vocab)
    lse = log_normaliser(logits)
    top: Sequence[tuple[bytes, float]] = ()
    if top_n > 0:  # the order of the logits is the order of the logprobs
        best = np.argpartition(logits, -top_n)[-top_n:]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((piece(int(t)), float(logits[t]) - lse) for t in best)
    return TokenLogprob(piece(token), float(logits[token]) - lse, tuple(top))


__all__ = [
    "DEFAULT_SEED",
    "JSON_OBJECT_GRAMMAR",
    "MAX_TOP_LOGPROBS",
    "GrammarError",
    "GrammarSampling",
    "SamplingParams",
    "TokenLogprob",
    "build_chain",
    "build_grammar",
    "check_grammar",
    "json_schema_grammar",
    "log_normaliser",
    "token_logprobs",
]
