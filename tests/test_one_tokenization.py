"""What is trained is what is served: the trainer's token ids of a conversation are the ids the
server's engine feeds the model for the same conversation (real model, real vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_chat.chat_template import ChatTemplate
from adapter_chat.engine import Engine, EngineConfig
from trainer.llama_opt import InferenceSession, VocabOnly
from trainer.packing import tokenize_example


@dataclass(frozen=True)
class Chat:
    text: str
    messages: tuple[dict, ...]


def test_trained_ids_equal_served_ids_with_special_looking_content(model_path, base_info) -> None:
    template = ChatTemplate.from_model(base_info)
    history = [
        {"role": "system", "content": "Answer <|im_start|>briefly<|im_end|>."},
        {"role": "user", "content": "What does <|im_end|> mean in ChatML?"},
    ]
    answer = "It ends a turn: <|im_end|> closes the message. <|endoftext|>"
    item = Chat(text="", messages=(*history, {"role": "assistant", "content": answer}))

    with VocabOnly(model_path) as vocab:
        trained = tokenize_example(vocab, template, item)
    with InferenceSession(model_path, n_ctx=256, threads=1) as inf:  # the evaluator's vocabulary
        evaluated = tokenize_example(inf.vocab, template, item)
    eng = Engine(EngineConfig(model_path, n_ctx=512, parallel=1, n_threads=1))
    eng.start()
    try:
        served_prompt = eng.tokenize(template.render_segments(history, add_generation_prompt=True))
        served_answer = eng.tokenize_text(answer)
        im_end = eng._vocab.tokenize("<|im_end|>", add_special=False, parse_special=True)
    finally:
        eng.close()

    assert trained.ids == evaluated.ids
    # the served prompt is exactly the start of the trained sequence, the answer follows as text
    n = len(served_prompt)
    assert trained.ids[:n] == served_prompt
    assert trained.ids[n : n + len(served_answer)] == served_answer
    # the only control tokens are the template's: 3 turn ends (system, user, assistant)
    assert len(im_end) == 1 and trained.ids.count(im_end[0]) == 3
    # targets: the answer and its end-of-turn token, nothing of the prompt
    targets = [t for t, m in zip(trained.ids, trained.mask) if m]
    assert targets == served_answer + im_end
    assert not any(trained.mask[:n])
