"""The OpenAI-compatible chat server: `python -m server`.

It stands on `adapter_chat` (the adapter format, the log, the tokenization, the engine) and never
imports the trainer. The README's Layout section has one line per module.
"""
