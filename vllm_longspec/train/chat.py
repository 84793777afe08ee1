"""Chat conversations as tokens with a loss mask on the assistant's tokens only.

The conversation is rendered with the target tokenizer's chat template. Each
assistant message's character span is found by rendering the conversation up
to it (with the generation prompt, i.e. up to the assistant header) and up to
and including it; the span between is the message's text plus its end-of-turn
marker. The full text is tokenized once with offsets, and a token carries a
loss when it starts inside an assistant span. This needs templates that render
a conversation prefix as a prefix of the whole (true for ChatML, Llama 3, ...);
others raise ``ChatTemplateError``.
"""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    """The chat template does not render conversation prefixes as prefixes."""


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[(start, end)) character spans of the assistant turns in the rendered chat."""
    full_text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise ChatTemplateError("a conversation cannot start with the assistant.")
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through.startswith(before) and full_text.startswith(through)):
            raise ChatTemplateError(
                "the chat template does not render a conversation's prefix as a "
                "prefix of the whole; assistant tokens cannot be located."
            )
        spans.append((len(before), len(through)))
    return spans


def tokenize_chat(
    tokenizer, messages: list[dict[str, Any]]
) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of a rendered conversation; loss on assistant tokens."""
    spans = assistant_spans(tokenizer, messages)
    text = _render(tokenizer, messages, generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    loss_mask = [
        any(start <= char_start < end for start, end in spans)
        for char_start, _ in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), loss_mask
