"""What the server and the trainer share: the contract between them, and the engine.

Both `server/` and `trainer/` import this package; it imports neither, and they never import each
other (`make lint` checks it; the contracts are in pyproject.toml). Modules, each owning one thing:

- `registry`: the adapter format: names, manifests, validation, atomic publish and rollback, so the
  trainer publishes only what the server will load;
- `identity`: which adapter is meant (`AdapterRef` unresolved, `AdapterUse` resolved) and `PathKind`;
- `gguf_info`: GGUF headers (sha256, architecture, tensor shapes, the chat template);
- `store`: the conversation log's tables, their migrations, the writer thread, trainer-run records;
- `records`: the log's rows as typed records, each with its to-row or from-row;
- `db`: SQLite or PostgreSQL behind one SQLAlchemy engine, every difference between the two;
- `chat_template`: rendering a conversation, and the one tokenization (ids + loss mask) used by
  serving, training and evaluation alike;
- `engine`, `sampling`, `llama_vocab`, `llama_model`: the llama.cpp binding for generation, the
  only modules here that import llama_cpp;
- `scheduler`: the engine's scheduling policy, pure functions tested without a model;
- `errors`: the engine's own errors, which know nothing of HTTP.
"""
