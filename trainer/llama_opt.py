"""In-process bindings to llama.cpp for the trainer (training, scoring, greedy generation).

Owns: every ctypes call the trainer makes into llama.cpp / ggml. No other trainer module
imports ``llama_cpp`` or ``ctypes``. Two classes:

- :class:`TrainSession` owns one training run's model, its training context, the ggml-opt
  optimizer state, a one-window ``ggml_opt_dataset`` reused for every step, and the
  ``ggml_opt_optimizer_params`` struct the optimizer reads before each step (so the caller can
  change the learning rate between steps). Two modes: **LoRA** (``lora=`` an initial adapter
  GGUF: its A and B tensors are the only parameters, the base, quantized or F32, stays frozen)
  and **full** (the F32 model's target matrices train in place).
- :class:`InferenceSession` owns a model + context used to score token windows (per-token
  negative log-likelihood from llama.cpp logits) and to generate greedily, optionally with a
  LoRA adapter attached through ``llama_adapter_lora_init`` / ``llama_set_adapters_lora``.

Facts about llama-cpp-python 0.3.36 (and the llama.cpp it vendors) that this module relies on:

- its ``llama_opt_params`` binding lacks the trailing ``optimizer_type`` field, so the struct
  and the ``llama_opt_init`` prototype are declared here from ``include/llama.h``;
- a ctypes callback cannot return a struct, so the optimizer-params callback is llama.cpp's own
  ``ggml_opt_get_constant_optimizer_params`` pointed at a struct we own;
- trained tensors must be F32 (see ``llama_set_param`` in ``src/llama-context.cpp``), and for a
  full finetune the weights writable (``load_mode = LLAMA_LOAD_MODE_NONE``);
- five fixes to the vendored llama.cpp are needed (``patches/``, built into the wheel by the
  Makefile): gradients reset at every optimizer step, a negative label is an ignore index (no
  loss, no gradient) with the exact cross-entropy gradient for it, ``llama_opt_init`` offers
  the context's LoRA tensors to the parameter filter, and ``llama_opt_set_seq_ids`` makes each
  item packed into a window its own sequence (no attention across items, positions from 0);
  a sixth adds unlikelihood targets (``llama_opt_set_negatives``: the loss adds
  ``-w * log(1 - p(token))`` at chosen positions); a third patch makes the steps faster:
  llamafile's sgemm switchable at run time (``ggml_cpu_set_llamafile``, off when the library
  loads; :meth:`TrainSession.step` switches it on for its ``llama_opt_epoch`` call only), the
  backward through frozen F32 matrices as a ``mul_mat`` sgemm can take, and logits only at
  labelled positions (``llama_opt_set_labelled_outputs``);
- the wheel holds each libggml*.so three times as copies, not symlinks: ggml symbols are
  resolved from the SONAME-named copy (``libggml-cpu.so.0``) that libllama.so loads;
- ``n_ubatch`` must equal ``n_ctx`` or the K and V projections get no gradient, and llama.cpp
  pads ``n_ctx`` to a multiple of 256, so training windows are multiples of 256 tokens;
- one ``llama_opt_epoch`` call per window (a one-datapoint dataset): Python regains control
  after every step for callbacks, learning-rate changes and a cooperative stop;
- ``llama_opt_epoch`` does not set the CPU backend's thread count (``llama_decode`` does), so
  a one-token warm-up decode runs first, as ``llama-finetune``'s common init does.

Over the ~400-line guide on purpose: it is the whole ctypes surface of llama.cpp's training API
(the import contract allows ctypes only in binding modules), kept in one place so the ctypes
signatures and the C structs they describe are read side by side.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import llama_cpp.llama_cpp as llc
import numpy as np

from adapter_chat.llama_model import ModelLoadError, load_model, model_params
from adapter_chat.llama_vocab import LlamaVocab
from trainer.frozen import shift_name

GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
LLAMA_LOAD_MODE_NONE = 0
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
OPTIMIZERS: dict[str, int] = {"adamw": 0, "sgd": 1}  # enum ggml_opt_optimizer_type
MAX_PACKED_SEQS = 64
"""Sequences (packed items plus padding) one training window may hold (the context's n_seq_max)."""

from adapter_chat.registry import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS  # noqa: E402


class LlamaError(RuntimeError):
    """llama.cpp refused a request (model or adapter failed to load, decode failed, ...)."""


class GgmlOptOptimizerParams(ctypes.Structure):
    """``struct ggml_opt_optimizer_params`` (ggml/include/ggml-opt.h): two nested structs of floats."""

    _fields_ = [
        ("adamw_alpha", ctypes.c_float),
        ("adamw_beta1", ctypes.c_float),
        ("adamw_beta2", ctypes.c_float),
        ("adamw_eps", ctypes.c_float),
        ("adamw_wd", ctypes.c_float),
        ("sgd_alpha", ctypes.c_float),
        ("sgd_wd", ctypes.c_float),
    ]


class LlamaOptParams(ctypes.Structure):
    """``struct llama_opt_params`` as in include/llama.h, including ``optimizer_type``."""

    _fields_ = [
        ("n_ctx_train", ctypes.c_uint32),
        ("param_filter", ctypes.c_void_p),
        ("param_filter_ud", ctypes.c_void_p),
        ("get_opt_pars", ctypes.c_void_p),
        ("get_opt_pars_ud", ctypes.c_void_p),
        ("optimizer_type", ctypes.c_int),
    ]


_PARAM_FILTER = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)


class _Ggml:
    """The ggml / ggml-opt symbols we need, resolved from the libggml*.so next to libllama.so.

    From the files libllama.so itself loads, named by their SONAME (``libggml-cpu.so.0``): the
    wheel holds ``libggml-cpu.so``, ``.so.0`` and ``.so.0.25.3`` as three copies, not symlinks,
    and each copy loaded is a library of its own, with its own globals. A switch such as
    ``ggml_cpu_set_llamafile`` set through another copy never reaches llama.cpp's graphs."""

    def __init__(self) -> None:
        lib_dir = Path(llc.__file__).parent / "lib"
        paths = sorted(lib_dir.glob("libggml*.so*"))
        sonamed = [p for p in paths if re.fullmatch(r"libggml[\w-]*\.so\.\d+", p.name)]
        libs = [ctypes.CDLL(str(p)) for p in (sonamed or paths)]

        def sym(name: str, restype: object, argtypes: list[object]) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
            for lib in libs:
                if hasattr(lib, name):
                    proto = ctypes.CFUNCTYPE(restype, *argtypes)  # type: ignore[arg-type]
                    return proto((name, lib))
            raise LlamaError(f"symbol {name} not found in {lib_dir}/libggml*.so")

        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        self.dataset_init = sym("ggml_opt_dataset_init", vp, [ctypes.c_int, ctypes.c_int, i64, i64, i64, i64])
        self.dataset_free = sym("ggml_opt_dataset_free", None, [vp])
        self.dataset_data = sym("ggml_opt_dataset_data", vp, [vp])
        self.dataset_labels = sym("ggml_opt_dataset_labels", vp, [vp])
        self.result_init = sym("ggml_opt_result_init", vp, [])
        self.result_free = sym("ggml_opt_result_free", None, [vp])
        self.result_reset = sym("ggml_opt_result_reset", None, [vp])
        self.result_loss = sym(
            "ggml_opt_result_loss", None, [vp, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
        )
        # patches/llama-cpp-python-0.3.36-3-train-speed.patch; absent from a wheel built without it.
        try:
            self.cpu_set_llamafile = sym("ggml_cpu_set_llamafile", None, [ctypes.c_bool])
            self.cpu_get_llamafile = sym("ggml_cpu_get_llamafile", ctypes.c_bool, [])
        except LlamaError:
            self.cpu_set_llamafile = self.cpu_get_llamafile = None
        self.get_data = sym("ggml_get_data", vp, [vp])
        self.get_name = sym("ggml_get_name", ctypes.c_char_p, [vp])
        self.nbytes = sym("ggml_nbytes", ctypes.c_size_t, [vp])
        # Passed to llama.cpp as a function pointer, never called from Python.
        self.constant_optimizer_params = self._address(libs, "ggml_opt_get_constant_optimizer_params")

    @staticmethod
    def _address(libs: list[ctypes.CDLL], name: str) -> int:
        for lib in libs:
            if hasattr(lib, name):
                return int(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0)
        raise LlamaError(f"symbol {name} not found")


_GGML: _Ggml | None = None
_BACKEND_READY = False
_LOG_CB: object = None


def _ggml() -> _Ggml:
    global _GGML
    if _GGML is None:
        _GGML = _Ggml()
    return _GGML


def llamafile_available() -> bool:
    """Whether this wheel has llamafile's sgemm behind the run-time switch of
    ``patches/llama-cpp-python-0.3.36-3-train-speed.patch`` (off unless switched on)."""
    g = _ggml()
    if g.cpu_set_llamafile is None or g.cpu_get_llamafile is None:
        return False
    return "LLAMAFILE = 1" in llc.llama_print_system_info().decode()


def llamafile_on() -> bool:
    """Whether llamafile's sgemm is switched on now, process-wide (False without the switch)."""
    g = _ggml()
    return bool(g.cpu_get_llamafile()) if g.cpu_get_llamafile is not None else False


def _backend(verbose: bool) -> None:
    """Initialise the llama.cpp backend once; silence its logging unless ``verbose``."""
    global _BACKEND_READY, _LOG_CB
    if not _BACKEND_READY:
        llc.llama_backend_init()
        _BACKEND_READY = True
    if not verbose and _LOG_CB is None:

        @llc.llama_log_callback
        def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                import sys

                sys.stderr.write(text.decode("utf-8", "replace"))

        _LOG_CB = _quiet
        llc.llama_log_set(_quiet, ctypes.c_void_p(0))


_opt_init = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, LlamaOptParams)(("llama_opt_init", llc._lib))
_opt_set_seq_ids = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ("llama_opt_set_seq_ids", llc._lib)
)
_opt_set_negatives = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
)(("llama_opt_set_negatives", llc._lib))
try:  # patches/llama-cpp-python-0.3.36-3-train-speed.patch; absent from a wheel built without it
    _opt_set_labelled_outputs = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_bool)(
        ("llama_opt_set_labelled_outputs", llc._lib)
    )
except AttributeError:
    _opt_set_labelled_outputs = None
try:  # patches/llama-cpp-python-0.3.36-4-train-inputs.patch; absent from a wheel built without it
    _opt_set_embd = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        ("llama_opt_set_embd", llc._lib)
    )
except AttributeError:
    _opt_set_embd = None
_opt_epoch = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
)(("llama_opt_epoch", llc._lib))


def _model_params(n_gpu_layers: int, *, writable: bool) -> llc.llama_model_params:
    """The shared model params (GPU offload, adapter_chat.llama_model); ``writable`` loads the weights
    into memory the optimizer may change, not a read-only mmap."""
    mparams = model_params(n_gpu_layers)
    if writable:
        mparams.load_mode = LLAMA_LOAD_MODE_NONE
    return mparams


def _load_model(path: Path, *, writable: bool, n_gpu_layers: int = 0) -> ctypes.c_void_p:
    try:
        return load_model(path, _model_params(n_gpu_layers, writable=writable))
    except ModelLoadError as e:
        raise LlamaError(str(e)) from None


def _new_context(model: ctypes.c_void_p, *, n_ctx: int, n_batch: int, threads: int, f32_cache: bool,
                 cb_eval: object = None) -> ctypes.c_void_p:  # fmt: skip
    cparams = llc.llama_context_default_params()
    if cb_eval is not None:  # a ggml_backend_sched_eval_callback, kept alive by the caller
        cparams.cb_eval = cb_eval
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = MAX_PACKED_SEQS if f32_cache else 1
    # training: the items packed into a window are sequences of one unified cache of n_ctx cells
    cparams.kv_unified = f32_cache
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = True
    # No flash attention, for training (no backward pass for it) and for evaluation alike: the server
    # runs without it (its CPU kernel depends on the batch size; adapter_chat/engine.py), so what is scored
    # here is computed as it is served.
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
    if f32_cache:
        # OUT_PROD has no F16 backward; llama-finetune forces the same.
        cparams.type_k = GGML_TYPE_F32
        cparams.type_v = GGML_TYPE_F32
    ctx = llc.llama_init_from_model(model, cparams)
    if not ctx:
        raise LlamaError("llama.cpp could not create a context")
    return ctx


def _piece(vocab: ctypes.c_void_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


class VocabOnly:
    """A model's vocabulary loaded alone (no weights: fast), as the ``chat_template.Vocab`` the
    one tokenization needs; ``eos`` is the padding id packing uses. Close it (or use ``with``)."""

    def __init__(self, model_path: Path, *, verbose: bool = False) -> None:
        _backend(verbose)
        mparams = llc.llama_model_default_params()
        mparams.vocab_only = True
        try:
            self.model = load_model(model_path, mparams, what="vocabulary of")
        except ModelLoadError as e:
            raise LlamaError(str(e)) from None
        self._vocab = LlamaVocab(llc.llama_model_get_vocab(self.model))
        self.add_bos = self._vocab.add_bos
        eos = int(llc.llama_vocab_eos(self._vocab.vocab))
        self.eos = eos if eos >= 0 else 0

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def is_eog(self, token: int) -> bool:
        return self._vocab.is_eog(token)

    def piece(self, token: int) -> str:
        """The text of one token (special tokens as written), for ``packing.repeat_negatives``."""
        return _piece(self._vocab.vocab, token).decode("utf-8", "replace")

    def close(self) -> None:
        if getattr(self, "model", None):
            llc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> VocabOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class VocabTokenizer(VocabOnly):
    """Counts tokens with a model's own vocabulary (special tokens parsed, nothing added), for
    the dataset report."""

    def __call__(self, text: str) -> int:
        return len(self.tokenize(text, add_special=False, parse_special=True))


class _ModelHandle:
    """Owns a loaded llama_model, its vocab, and one llama_context; frees both on close()."""

    def __init__(
        self, path: Path, *, n_ctx: int, n_batch: int, threads: int, writable: bool, verbose: bool,
        training: bool | None = None, n_gpu_layers: int = 0, cb_eval: object = None,
    ) -> None:
        _backend(verbose)
        self.path = Path(path)
        self.model = _load_model(self.path, writable=writable, n_gpu_layers=n_gpu_layers)
        self.vocab = llc.llama_model_get_vocab(self.model)
        self.n_vocab = int(llc.llama_vocab_n_tokens(self.vocab))
        self.text = LlamaVocab(self.vocab)
        training = writable if training is None else training
        try:
            self.ctx = _new_context(self.model, n_ctx=n_ctx, n_batch=n_batch, threads=threads, f32_cache=training,
                                    cb_eval=cb_eval)  # fmt: skip
        except Exception:
            llc.llama_model_free(self.model)
            raise
        self.n_ctx = int(llc.llama_n_ctx(self.ctx))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids for ``text``; special tokens (``<|im_start|>``...) are parsed by default."""
        return self.text.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(_piece(self.vocab, t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llc.llama_vocab_is_eog(self.vocab, token))

    def clear_memory(self) -> None:
        llc.llama_memory_clear(llc.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llc.llama_model_free(self.model)
            self.model = None


def _ggml_ne(tensor: int) -> tuple[int, ...]:
    """``ggml_tensor.ne`` (4 dims): in ggml.h the struct opens with ``enum ggml_type type`` and
    ``struct ggml_backend_buffer * buffer``, so on 64-bit targets ``ne`` sits at offset 16."""
    return tuple(int(d) for d in (ctypes.c_int64 * 4).from_address(tensor + 16))


IGNORE_INDEX = -1
"""A label with this value (any negative one) adds no loss and no gradient (patched llama.cpp)."""


class TrainSession:
    """Owns one training run's llama.cpp state: the model, the training context, the optimizer
    (ggml-opt), the optimizer-params struct read before every step, and a one-window dataset
    reused for every step.

    ``lora`` (a LoRA GGUF for this base, e.g. A random and B = 0): the adapter is attached to the
    context and its A/B tensors are the only parameters; the base model stays frozen and may be
    quantized. Without it, the F32 model's ``targets`` matrices train in place (full finetune).

    One :meth:`step` = one window: ``n_ctx`` input tokens and ``n_ctx`` labels (the next token,
    or :data:`IGNORE_INDEX`), one forward + backward + optimizer step, returning the mean
    cross-entropy over the labelled positions only.

    ``labelled_outputs`` (default on, where the wheel has it): the output layer and the loss run
    only at labelled positions (``llama_opt_set_labelled_outputs``), and a step's gradient is that
    of the mean over them. Off computes them everywhere: the same loss and the same SGD update up
    to rounding, but AdamW then sees each window's gradient scaled by its labelled share.

    ``block_offset`` k: the model file holds only the base's blocks from k up, renumbered from 0
    (``trainer.frozen``), and each :meth:`step` gets the frozen blocks' output as ``embd``; the
    adapter is attached as given (its names the file's) and :meth:`lora_pairs` names it as the
    base's.

    ``llamafile`` (default on): the step's matmuls use llamafile's sgemm where the wheel has it
    (:func:`llamafile_available`): 1.77x ggml's own kernels on the example's LoRA step
    (``bench/train_speed.py``). It is switched
    on for the step only and off again after it: serving and evaluation keep ggml's
    batch-invariant kernels (README "Determinism"); training needs no batch invariance.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 256,
        threads: int = 2,
        optimizer: str = "sgd",
        targets: Sequence[str] = DEFAULT_TARGETS,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        lora: Path | None = None,
        verbose: bool = False,
        n_gpu_layers: int = 0,
        llamafile: bool = True,
        labelled_outputs: bool = True,
        block_offset: int = 0,
    ) -> None:
        if n_ctx <= 0 or n_ctx % 256:
            raise ValueError(f"n_ctx must be a positive multiple of 256 (llama.cpp pads contexts to 256), got {n_ctx}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self._ggml = _ggml()
        self.llamafile = llamafile and llamafile_available()
        self.optimizer = optimizer
        self.targets = tuple(targets)
        self.lora_path = Path(lora) if lora is not None else None
        self.trainable: list[str] = []
        self._tensors: dict[str, int] = {}
        self._adapter = None
        self._h = _ModelHandle(
            model_path, n_ctx=n_ctx, n_batch=n_ctx, threads=threads, writable=lora is None, verbose=verbose,
            training=True, n_gpu_layers=n_gpu_layers,
        )
        if self._h.n_ctx != n_ctx:
            self.close()
            raise LlamaError(f"llama.cpp made a context of {self._h.n_ctx} tokens, asked for {n_ctx}")
        self.n_ctx = n_ctx
        self.n_embd = int(llc.llama_model_n_embd(self._h.model))
        self.block_offset = block_offset
        self.lr = lr
        try:
            if self.lora_path is not None:
                self._attach(self.lora_path)
            self._warm_up()
        except Exception:
            self.close()
            raise

        self._opt_pars = GgmlOptOptimizerParams(
            adamw_alpha=lr, adamw_beta1=0.9, adamw_beta2=0.999, adamw_eps=1e-8, adamw_wd=weight_decay,
            sgd_alpha=lr, sgd_wd=weight_decay,
        )  # fmt: skip
        suffixes = tuple(f".{t}.weight" for t in self.targets)
        lora_mode = self.lora_path is not None

        def keep(tensor: int, _ud: int) -> bool:
            name = (self._ggml.get_name(tensor) or b"").decode()
            if lora_mode:
                chosen = name.startswith("blk.") and name.endswith((".lora_a", ".lora_b"))
            else:
                chosen = name.startswith("blk.") and name.endswith(suffixes)
            if chosen:
                self.trainable.append(name)
                self._tensors[name] = int(tensor)
            return chosen

        self._filter = _PARAM_FILTER(keep)  # must outlive llama_opt_init
        params = LlamaOptParams(
            n_ctx_train=0,
            param_filter=ctypes.cast(self._filter, ctypes.c_void_p).value,
            param_filter_ud=None,
            get_opt_pars=self._ggml.constant_optimizer_params,
            get_opt_pars_ud=ctypes.addressof(self._opt_pars),
            optimizer_type=OPTIMIZERS[optimizer],
        )
        _opt_init(self._h.ctx, self._h.model, params)
        # Logits (output layer, loss, gradient) only at labelled positions: the prompt, the chat
        # markup and the padding need none. The loss llama.cpp reports is then already the mean
        # over the labelled positions.
        self.labelled_outputs = labelled_outputs and _opt_set_labelled_outputs is not None
        if self.labelled_outputs:
            _opt_set_labelled_outputs(self._h.ctx, True)
        if not self.trainable:
            what = f"LoRA tensors of {self.lora_path}" if lora_mode else f"F32 tensor of {model_path} matched targets {self.targets}"
            self.close()
            raise LlamaError(
                f"no {what} became trainable"
                + (" (is the llama-cpp-python wheel built with patches/? run `make setup`)" if lora_mode else "")
            )

        self._dataset = self._ggml.dataset_init(GGML_TYPE_I32, GGML_TYPE_I32, n_ctx, n_ctx, 1, 1)
        self._result = self._ggml.result_init()
        self._data = self._ggml.get_data(self._ggml.dataset_data(self._dataset))
        self._labels = self._ggml.get_data(self._ggml.dataset_labels(self._dataset))

    def _attach(self, path: Path) -> None:
        self._adapter = llc.llama_adapter_lora_init(self._h.model, str(path).encode())
        if not self._adapter:
            raise LlamaError(f"llama_adapter_lora_init refused {path} for base {self._h.path}")
        arr = (llc.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llc.llama_set_adapters_lora(self._h.ctx, arr, 1, scales) != 0:
            raise LlamaError(f"llama_set_adapters_lora failed for {path}")

    def _warm_up(self) -> None:
        """One-token decode: sets the CPU backend's thread count, which llama_opt_epoch does not."""
        tok = (llc.llama_token * 1)(max(0, int(llc.llama_vocab_bos(self._h.vocab))))
        if llc.llama_decode(self._h.ctx, llc.llama_batch_get_one(tok, 1)) != 0:
            raise LlamaError("warm-up decode failed")
        self._h.clear_memory()

    @property
    def n_vocab(self) -> int:
        return self._h.n_vocab

    @property
    def vocab(self) -> LlamaVocab:
        """The model's vocabulary for ``adapter_chat.chat_template.tokenize_conversation``."""
        return self._h.text

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        return self._h.tokenize(text, add_special=add_special, parse_special=parse_special)

    def set_lr(self, lr: float, weight_decay: float | None = None) -> None:
        """Learning rate (and optionally weight decay) used by the next optimizer step."""
        self.lr = lr
        self._opt_pars.adamw_alpha = self._opt_pars.sgd_alpha = lr
        if weight_decay is not None:
            self._opt_pars.adamw_wd = self._opt_pars.sgd_wd = weight_decay

    def step(
        self,
        inputs: Sequence[int],
        labels: Sequence[int] | None = None,
        seq_ids: Sequence[int] | None = None,
        negatives: Sequence[tuple[int, int]] = (),
        unlikelihood: float = 0.0,
        embd: np.ndarray | None = None,
    ) -> float:
        """One optimizer step on one window; returns the mean cross-entropy of the labelled
        positions. ``labels=None``: ``inputs`` holds ``n_ctx + 1`` tokens and every next token
        is a label (the unmasked case). ``seq_ids`` (one per position, non-decreasing, below
        ``MAX_PACKED_SEQS``): each run of equal ids is its own sequence, from position 0, that
        attends only to itself, as a conversation does when served; ``None``: the window is one
        sequence. ``embd`` ((n_ctx, n_embd) F32): the model's input at each position, in place of
        ``inputs``' token embeddings (``llama_opt_set_embd``): the output of the base's frozen lower
        blocks when this session's model holds only the upper ones (``trainer.frozen``); the
        tokens still count for the checks. ``negatives`` ((position, token) pairs at labelled positions) with
        ``unlikelihood`` = w > 0: the loss also adds ``-w * log(1 - p(token))`` at each (Welleck et
        al.'s unlikelihood; the returned loss then includes those terms).

        llama.cpp computes logits only at the labelled positions, and its loss (and so its
        gradient) is their mean. On a wheel without ``llama_opt_set_labelled_outputs`` every
        position has logits and the loss is the sum over labelled positions divided by ``n_ctx``:
        the reported loss is then rescaled, and for SGD the step's learning rate by ``n_ctx /
        labelled``, so that an update is the gradient of the mean over labelled tokens (AdamW is
        invariant to that scale).
        """
        if labels is None:
            if len(inputs) != self.n_ctx + 1:
                raise ValueError(f"a window holds n_ctx + 1 = {self.n_ctx + 1} tokens, got {len(inputs)}")
            labels = inputs[1:]
            inputs = inputs[:-1]
        x = np.asarray(inputs, dtype=np.int32)
        y = np.asarray(labels, dtype=np.int32)
        if len(x) != self.n_ctx or len(y) != self.n_ctx:
            raise ValueError(f"inputs and labels must hold n_ctx = {self.n_ctx} tokens, got {len(x)} and {len(y)}")
        if x.min() < 0 or x.max() >= self.n_vocab or y.max() >= self.n_vocab:
            raise ValueError("token id out of range for this vocabulary")
        y = np.where(y < 0, IGNORE_INDEX, y).astype(np.int32)
        n_labelled = int((y >= 0).sum())
        if n_labelled == 0:
            raise ValueError("a window with no labelled position trains nothing")
        scale = 1.0 if self.labelled_outputs else self.n_ctx / n_labelled
        if self.optimizer == "sgd":
            self._opt_pars.sgd_alpha = self.lr * scale
        if seq_ids is None:
            _opt_set_seq_ids(self._h.ctx, None, 0)
        else:
            seq = np.asarray(seq_ids, dtype=np.int32)
            if len(seq) != self.n_ctx:
                raise ValueError(f"seq_ids must hold n_ctx = {self.n_ctx} ids, got {len(seq)}")
            if seq.min() < 0 or seq.max() >= MAX_PACKED_SEQS or (np.diff(seq) < 0).any():
                raise ValueError(f"seq_ids must be non-decreasing ids in [0, {MAX_PACKED_SEQS})")
            _opt_set_seq_ids(self._h.ctx, seq.ctypes.data, self.n_ctx)
        if unlikelihood < 0:
            raise ValueError(f"unlikelihood must be >= 0, got {unlikelihood}")
        if negatives and unlikelihood > 0:
            neg = np.asarray(negatives, dtype=np.int32).reshape(-1, 2)
            if neg[:, 0].min() < 0 or neg[:, 0].max() >= self.n_ctx or neg[:, 1].min() < 0 or neg[:, 1].max() >= self.n_vocab:
                raise ValueError("a negative's position or token is out of range")
            pos, tok = np.ascontiguousarray(neg[:, 0]), np.ascontiguousarray(neg[:, 1])
            _opt_set_negatives(self._h.ctx, pos.ctypes.data, tok.ctypes.data, len(neg), unlikelihood)
        else:
            _opt_set_negatives(self._h.ctx, None, None, 0, 0.0)
        if embd is not None:
            if _opt_set_embd is None:
                raise LlamaError("this llama-cpp-python wheel has no llama_opt_set_embd (patches/*-4-train-inputs.patch): run `make setup`")
            e = np.ascontiguousarray(embd, dtype=np.float32)
            if e.shape != (self.n_ctx, self.n_embd):
                raise ValueError(f"embd must be (n_ctx, n_embd) = {(self.n_ctx, self.n_embd)}, got {e.shape}")
            _opt_set_embd(self._h.ctx, e.ctypes.data, self.n_ctx)
        elif _opt_set_embd is not None:
            _opt_set_embd(self._h.ctx, None, 0)
        n = self.n_ctx * 4
        ctypes.memmove(self._data, x.ctypes.data, n)
        ctypes.memmove(self._labels, y.ctypes.data, n)
        self._ggml.result_reset(self._result)
        if self.llamafile:
            self._ggml.cpu_set_llamafile(True)
        try:
            _opt_epoch(self._h.ctx, self._dataset, self._result, None, 1, None, None)
        finally:
            if self.llamafile:
                self._ggml.cpu_set_llamafile(False)
        loss = ctypes.c_double()
        self._ggml.result_loss(self._result, ctypes.byref(loss), None)
        return float(loss.value) * scale

    def tensor(self, name: str) -> np.ndarray:
        """A copy of the current values of trainable tensor ``name``, as an F32 array of ggml's
        shape reversed (numpy order: a LoRA A is (rank, n_in), B is (n_out, rank))."""
        ptr = self._tensors[name]
        ne = _ggml_ne(ptr)
        if ne[2:] != (1, 1):
            raise LlamaError(f"{name} is not a matrix (ne {ne})")
        count = ne[0] * ne[1]
        if count * 4 != int(self._ggml.nbytes(ptr)):
            raise LlamaError(f"{name}: {ne} F32 elements do not match ggml_nbytes {self._ggml.nbytes(ptr)}")
        buf = (ctypes.c_float * count).from_address(self._ggml.get_data(ptr))
        return np.ctypeslib.as_array(buf).reshape(ne[1], ne[0]).copy()

    def lora_pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The trained LoRA: base tensor name -> (A, B), as ``adapter_chat.registry.write_lora_gguf`` takes.
        With ``block_offset`` k (a model of the base's blocks from k up), block i is named ``blk.{i + k}``."""
        if self.lora_path is None:
            raise LlamaError("lora_pairs() needs a LoRA session (lora=...)")
        names = sorted({n.rsplit(".", 1)[0] for n in self._tensors})
        return {shift_name(n, self.block_offset): (self.tensor(f"{n}.lora_a"), self.tensor(f"{n}.lora_b")) for n in names}

    def save(self, path: Path) -> Path:
        """Write the model with its current (trained) weights as a GGUF (llama_model_save_to_file).

        llama_opt_init sets the model's ``n_ctx_train`` to the training window, so the file's
        ``<arch>.context_length`` is ``n_ctx``: it is meant for extraction and evaluation."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        llc.llama_model_save_to_file(self._h.model, str(path).encode())
        if not path.exists():
            raise LlamaError(f"llama_model_save_to_file did not write {path}")
        return path

    def close(self) -> None:
        g = self._ggml
        if getattr(self, "_dataset", None):
            g.dataset_free(self._dataset)
            self._dataset = None
        if getattr(self, "_result", None):
            g.result_free(self._result)
            self._result = None
        if getattr(self, "_adapter", None):
            if getattr(self._h, "ctx", None):
                llc.llama_set_adapters_lora(self._h.ctx, None, 0, None)
            llc.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        self._h.close()

    def __enter__(self) -> TrainSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockOutputs:
    """The output of one block of a model for a token sequence, from position 0: the residual
    stream a model of the blocks above it takes as its input (``trainer.frozen``).

    Owns a read-only model and a context whose eval callback (llama.cpp's ``cb_eval``, as
    llama-imatrix and llama-eval-callback use it) copies the tensor ``l_out-<block>`` and then
    cancels the rest of the graph (the callback returning false), so the blocks above and the
    output layer are never computed. The computation is the training step's forward pass: the F32
    K/V cache of a training context, and llamafile's sgemm on around the decode where the wheel
    has it (as :meth:`TrainSession.step` has it), off after it.
    """

    def __init__(self, model_path: Path, *, block: int, n_ctx: int = 512, threads: int = 2, verbose: bool = False,
                 llamafile: bool = True) -> None:  # fmt: skip
        self._ggml = _ggml()
        self.block = block
        self._name = f"l_out-{block}".encode()
        self._out: np.ndarray | None = None
        self.llamafile = llamafile and llamafile_available()

        def cb(tensor: int, ask: bool, _ud: int) -> bool:
            if self._ggml.get_name(tensor) != self._name:
                return bool(not ask)  # ask: not wanted; observe: keep computing
            if ask:
                return True
            ne = _ggml_ne(tensor)
            count = ne[0] * ne[1]
            if ne[2:] != (1, 1) or count * 4 != int(self._ggml.nbytes(tensor)):
                raise LlamaError(f"l_out-{block} is not an F32 matrix (ne {ne})")
            buf = (ctypes.c_float * count).from_address(self._ggml.get_data(tensor))
            self._out = np.ctypeslib.as_array(buf).reshape(ne[1], ne[0]).copy()
            return False  # the rest of the graph is not needed: cancel it

        self._cb = llc.ggml_backend_sched_eval_callback(cb)  # must outlive the context
        self._h = _ModelHandle(model_path, n_ctx=n_ctx, n_batch=n_ctx, threads=threads, writable=False,
                               verbose=verbose, training=True, cb_eval=self._cb)  # fmt: skip
        n_layer = int(llc.llama_model_n_layer(self._h.model))
        if not 0 <= block < n_layer - 1:
            self.close()
            raise ValueError(f"block must be in [0, {n_layer - 1}) for a model of {n_layer} blocks, got {block}")
        self.n_ctx = self._h.n_ctx
        self.n_embd = int(llc.llama_model_n_embd(self._h.model))

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), n_embd) F32: block ``block``'s output at each position of ``tokens``,
        decoded alone as one sequence from position 0."""
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"a sequence of 1..{self.n_ctx} tokens, got {n}")
        self._h.clear_memory()
        self._out = None
        batch = llc.llama_batch_init(n, 0, 1)
        if self.llamafile:
            self._ggml.cpu_set_llamafile(True)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i] = int(t)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == n - 1 else 0
            rc = llc.llama_decode(self._h.ctx, batch)
        finally:
            if self.llamafile:
                self._ggml.cpu_set_llamafile(False)
            llc.llama_batch_free(batch)
        out, self._out = self._out, None
        if out is None or out.shape != (n, self.n_embd):
            raise LlamaError(f"llama_decode (status {rc}) gave no l_out-{self.block} of shape {(n, self.n_embd)}")
        return out

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> BlockOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InferenceSession:
    """Owns a read-only model + context for scoring and greedy generation, and the LoRA
    adapter (if any) attached to that context through llama.cpp's adapter API."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 256,
        threads: int = 2,
        adapter: Path | None = None,
        adapter_scale: float = 1.0,
        verbose: bool = False,
        n_gpu_layers: int = 0,
    ) -> None:
        self._h = _ModelHandle(model_path, n_ctx=n_ctx, n_batch=n_ctx, threads=threads, writable=False, verbose=verbose,
                               n_gpu_layers=n_gpu_layers)  # fmt: skip
        self.n_ctx = self._h.n_ctx
        self.adapter_path = adapter
        self._adapter = None
        if adapter is not None:
            self._adapter = llc.llama_adapter_lora_init(self._h.model, str(adapter).encode())
            if not self._adapter:
                self.close()
                raise LlamaError(f"llama_adapter_lora_init refused {adapter} for base {model_path}")
            arr = (llc.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(adapter_scale)
            if llc.llama_set_adapters_lora(self._h.ctx, arr, 1, scales) != 0:
                self.close()
                raise LlamaError(f"llama_set_adapters_lora failed for {adapter}")

    @property
    def n_vocab(self) -> int:
        return self._h.n_vocab

    @property
    def vocab(self) -> LlamaVocab:
        """The model's vocabulary for ``adapter_chat.chat_template.tokenize_conversation``."""
        return self._h.text

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        return self._h.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Iterable[int]) -> str:
        return self._h.detokenize(tokens)

    def _decode(self, tokens: Sequence[int], pos0: int, *, all_logits: bool, logits_at: Sequence[bool] | None = None) -> None:  # noqa: E501
        n = len(tokens)
        batch = llc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i] = int(t)
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                if logits_at is not None:
                    batch.logits[i] = 1 if logits_at[i] else 0
                else:
                    batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            if llc.llama_decode(self._h.ctx, batch) != 0:
                raise LlamaError("llama_decode failed")
        finally:
            llc.llama_batch_free(batch)

    def window_nll(self, window: Sequence[int], only: Sequence[bool] | None = None) -> np.ndarray:
        """Per-token negative log-likelihood (nats) of ``window[1:]`` given the preceding tokens,
        from one llama_decode of ``window[:-1]``. ``only`` (one flag per position of
        ``window[1:]``): llama.cpp computes logits just where it is set (the output matrix is a
        fifth of this model's forward pass) and the result holds those positions only."""
        inputs, labels = list(window[:-1]), np.asarray(window[1:], dtype=np.int64)
        if not 0 < len(inputs) <= self.n_ctx:
            raise ValueError(f"window must hold 2..{self.n_ctx + 1} tokens, got {len(window)}")
        if only is not None:
            keep = np.asarray(only, dtype=bool)
            if keep.shape != (len(inputs),) or not keep.any():
                raise ValueError("only must hold one flag per scored position, at least one set")
        else:
            keep = np.ones(len(inputs), dtype=bool)
        self._h.clear_memory()
        self._decode(inputs, 0, all_logits=True, logits_at=keep)
        rows = int(keep.sum())
        ptr = llc.llama_get_logits(self._h.ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        return lse - logits[np.arange(rows), labels[keep]]

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 64) -> str:
        """Greedy (argmax) continuation of ``prompt`` (token ids, or a rendered string whose
        special tokens are parsed), stopping at an end-of-generation token, ``max_tokens`` or the
        context size."""
        return self.detokenize(self.generate_ids(prompt, max_tokens=max_tokens))

    def generate_ids(self, prompt: str | Sequence[int], *, max_tokens: int = 64) -> list[int]:
        """The token ids :meth:`generate` detokenizes."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the {self.n_ctx}-token context")
        self._h.clear_memory()
        self._decode(tokens, 0, all_logits=False)
        pos, out = len(tokens), []
        for _ in range(max_tokens):
            ptr = llc.llama_get_logits_ith(self._h.ctx, -1)
            nxt = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))
            if self._h.is_eog(nxt) or pos >= self.n_ctx:
                break
            out.append(nxt)
            self._decode([nxt], pos, all_logits=False)
            pos += 1
        return out

    def close(self) -> None:
        if getattr(self, "_adapter", None):
            llc.llama_set_adapters_lora(self._h.ctx, None, 0, None)
            llc.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        self._h.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), capped so a diverged model reports inf instead of raising."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


__all__ = [
    "DEFAULT_TARGETS",
    "OPTIMIZERS",
    "InferenceSession",
    "LlamaError",
    "TrainSession",
    "VocabOnly",
    "perplexity",
]
