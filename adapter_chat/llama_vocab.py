"""A llama.cpp vocabulary as the `chat_template.Vocab` the one tokenization needs.

Owns: the ctypes calls that turn text into token ids (``llama_tokenize``) for both the server's
engine and the trainer, so prompts served and windows trained are tokenized by the same code.
Binding module: it imports ``llama_cpp``; the logic of what is parsed how lives in
``adapter_chat.chat_template.tokenize_conversation``.
"""

from __future__ import annotations

import llama_cpp.llama_cpp as C


class LlamaVocab:
    """Wraps a ``llama_vocab *`` owned by a loaded model (the model must outlive this object)."""

    def __init__(self, vocab: object) -> None:
        self.vocab = vocab
        self.add_bos = bool(C.llama_vocab_get_add_bos(vocab))
        self.n_tokens = int(C.llama_vocab_n_tokens(vocab))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``. Lone surrogates (possible in JSON input) become U+FFFD."""
        data = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace").encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))
