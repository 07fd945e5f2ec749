"""Chat templates: a `messages` list rendered to text, split into no-loss and trained segments.

`format: chat` sources name a template (`data.sources.*.template`); training renders each
conversation with it and trains on the assistant turns only. `raylm export --format hf`
writes the same template as Jinja (`JINJA[name]`, tokenizer_config.json `chat_template`),
and a test checks that Hugging Face's `apply_chat_template` renders the same string.

The templates are text only: raylm frames a whole conversation with BOS ... EOS tokens, so
neither template writes `<s>` / `</s>` literals (Llama-2's own template writes them as text).
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def _chatml(messages: list[dict]) -> list[tuple[str, bool]]:
    parts = []
    for m in messages:
        parts.append((f"<|im_start|>{m['role']}\n", False))
        if m["role"] == "assistant":
            parts += [(m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            parts.append((m["content"] + "<|im_end|>\n", False))
    return parts


def _llama2(messages: list[dict]) -> list[tuple[str, bool]]:
    parts = []
    for i, m in enumerate(messages):
        after_system = i > 0 and messages[i - 1]["role"] == "system"
        if m["role"] == "system":
            parts.append(("[INST] <<SYS>>\n" + m["content"] + "\n<</SYS>>\n\n", False))
        elif m["role"] == "user":
            opener = "" if after_system else (" [INST] " if i > 0 else "[INST] ")
            parts.append((opener + m["content"] + " [/INST]", False))
        else:
            parts += [(" ", False), (m["content"], True)]
    return parts


TEMPLATES = {"chatml": _chatml, "llama2": _llama2}
"""Every template a config may name (`data.sources.*.template`)."""

JINJA = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% for message in messages %}"
        "{% set after_system = loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' %}"
        "{% if message['role'] == 'system' %}"
        "{{ '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if not after_system %}{{ ' [INST] ' if loop.index0 > 0 else '[INST] ' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] }}{% endif %}"
        "{% endfor %}"
    ),
}
"""The same templates in Hugging Face's chat_template Jinja (rendering the same strings)."""


def _problem(messages: object, template: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} is not an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}"
        if m["role"] == "system" and i > 0:
            return f"message {i}: a system message may only come first"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to train on)"
    return None


def render(messages: list[dict], template: str) -> str:
    """The conversation as the text the model sees (what `JINJA[template]` renders)."""
    return "".join(text for text, _ in TEMPLATES[template](messages))


def render_segments(messages: object, template: str) -> tuple[list[str], str | None]:
    """(segments alternating no-loss / trained, starting with no-loss; or a problem message).

    The segments joined are `render(messages, template)`; the trained ones are the assistant
    turns (content and, for chatml, the closing `<|im_end|>`)."""
    problem = _problem(messages, template)
    if problem is not None:
        return [], problem
    segments, trained = [""], False
    for text, is_trained in TEMPLATES[template](messages):
        if is_trained != trained:
            segments.append("")
            trained = is_trained
        segments[-1] += text
    return segments, None
