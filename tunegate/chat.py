"""Conversations as the chat template sees them: rich messages, rendering, tool support and the loss mask.

A message of the internal schema (tunegate.formats) has a role and text content, and may carry what
the OpenAI chat format adds: `name`, assistant `tool_calls` (`{"id", "type": "function", "function":
{"name", "arguments": {...}}}`, arguments already parsed), `tool_call_id` on a `tool` message, and
`weight` (0 or 1) on an assistant message. A row may carry the `tools` it was given.

Every stage that needs the rendered text goes through here, so validation's token lengths, the mix's
token shares, training and the forgetting probe all see the same text:

- `template_messages` turns internal messages into what chat templates read (weights left out);
- `Renderer` renders with the template compiled once, with `tools` and the generation prompt;
- `tool_support` probes whether a template renders tool calls, tool results and the tools list;
- `system_refusal` probes whether a template refuses a system turn (Gemma's raises "System role not
  supported"), and `fold_system` gives such a template its instructions the way its model was trained
  to read them: the system text, a blank line, then the first user turn;
- `tokenize` gives a conversation's token ids and a mask that is 1 exactly on the tokens of every
  assistant turn whose weight is not 0 (the turn's text and the template's end-of-turn marker).
  Each turn's span is found by rendering the conversation up to the turn with the generation prompt,
  then up to and including it; the difference is what the model must produce. A template that
  renders earlier turns differently once later ones follow (some reasoning templates drop earlier
  `<think>` blocks) is not prefix-stable: such a row trains its final assistant turn only, and is
  counted, as TRL's prompt/completion path would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

TEMPLATE_KEYS = ("name", "tool_calls", "tool_call_id")
RICH_KEYS = ("name", "tool_calls", "tool_call_id", "weight")


def _get(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else getattr(message, key, None)


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Internal messages (structs or dicts) -> the dicts chat templates read: role, content and, where
    set, name / tool_calls / tool_call_id. Keys that are not set are left out, not None, so templates
    that test `'tool_calls' in message` see what the data says."""
    out = []
    for m in messages:
        d = {"role": _get(m, "role"), "content": _get(m, "content")}
        for key in TEMPLATE_KEYS:
            value = _get(m, key)
            if value is not None:
                d[key] = value
        out.append(d)
    return out


def uses_tools(messages: Sequence[Any], tools: Any = None) -> bool:
    """Whether a conversation needs the template's tool support (tool calls, tool results or a tools list)."""
    return bool(tools) or any(_get(m, "tool_calls") or _get(m, "role") == "tool" for m in messages)


def is_rich(messages: Sequence[Any], tools: Any = None) -> bool:
    """Anything beyond role + content: such a conversation is rendered for real, not from a layout."""
    return (
        bool(tools)
        or any(_get(m, k) is not None for m in messages for k in RICH_KEYS)
        or any(_get(m, "role") == "tool" for m in messages)
    )


def call_text(call: dict[str, Any]) -> str:
    """A tool call as one line of text (name and arguments, keys sorted) for matching and pattern checks."""
    fn = call.get("function") or {}
    return f"{fn.get('name', '')}({json.dumps(fn.get('arguments', {}), sort_keys=True, ensure_ascii=False)})"


def message_text(message: Any) -> str:
    """A message's text as dedup, decontamination, contradictions and PII checks see it: the content,
    then each tool call on a line of its own."""
    content = _get(message, "content") or ""
    calls = _get(message, "tool_calls")
    if not calls:
        return content
    return "\n".join([content, *map(call_text, calls)]) if content else "\n".join(map(call_text, calls))


class Renderer:
    """messages (+ tools) -> the text the trainer sees, with the template compiled once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        self._compiled = None
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = _compile_jinja_template(template)
                self._special = dict(tokenizer.special_tokens_map)
            except Exception:  # a transformers without the helper: the public API below
                self._compiled = None

    def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, generation: bool = False
    ) -> str:
        if self._compiled is not None:
            return self._compiled.render(
                messages=messages, tools=tools, add_generation_prompt=generation, **self._special
            )
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation
        )


PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "tgprobetool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {"tgprobearg": {"type": "string"}}},
    },
}
PROBE_CONVERSATION = [
    {"role": "user", "content": "tgprobeuser"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_tgprobe",
                "type": "function",
                "function": {"name": "tgprobecall", "arguments": {"tgprobearg": "tgprobevalue"}},
            }
        ],
    },
    {"role": "tool", "content": "tgproberesult", "tool_call_id": "call_tgprobe"},
    {"role": "assistant", "content": "tgprobeanswer"},
]


SYSTEM_PROBE = [
    {"role": "system", "content": "tgprobesystem"},
    {"role": "user", "content": "tgprobeuser"},
    {"role": "assistant", "content": "tgprobeanswer"},
]


def system_refusal(render: Callable[..., str]) -> str | None:
    """The template's own words when it refuses a system turn that it renders the same conversation without
    (Gemma's "System role not supported"); None when it renders one, or refuses more than that."""
    try:
        render(SYSTEM_PROBE)
        return None
    except Exception as err:  # templates raise (raise_exception) for a role they do not take
        try:
            render(SYSTEM_PROBE[1:])
        except Exception:
            return None
        return first_line(err)


def first_line(err: Exception) -> str:
    """An exception as one short line: its first line, or its type when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def fold_system(messages: Sequence[Any]) -> list[Any]:
    """A leading system turn folded into the user turn after it (the system text, a blank line, the user's),
    for a template that refuses a system turn. Messages may be dicts or structs; the list is returned as it
    is (the same object) when it does not start with a system turn followed by a user turn."""
    if len(messages) < 2 or _get(messages[0], "role") != "system" or _get(messages[1], "role") != "user":
        return messages  # type: ignore[return-value]
    system, user = _get(messages[0], "content"), messages[1]
    text = f"{system}\n\n{_get(user, 'content')}" if system.strip() else _get(user, "content")
    if isinstance(user, dict):
        folded = {**user, "content": text}
    else:
        import msgspec

        folded = msgspec.structs.replace(user, content=text)
    return [folded, *messages[2:]]


def tool_support(tokenizer) -> str | None:
    """None when the chat template renders a tools list, an assistant tool call (name and arguments)
    and a tool result; otherwise what it does not render, for a one-line quarantine reason."""
    try:
        text = Renderer(tokenizer)(PROBE_CONVERSATION, tools=[PROBE_TOOL])
    except Exception as err:  # templates raise for roles they do not know
        return f"it fails on tool turns ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    missing = [
        what
        for what, marker in (
            ("the tools list", "tgprobetool"),
            ("tool calls", "tgprobecall"),
            ("tool call arguments", "tgprobevalue"),
            ("tool results", "tgproberesult"),
        )
        if marker not in text
    ]
    return f"it does not render {', '.join(missing)}" if missing else None


def loss_spans(
    render: Callable[..., str], messages: Sequence[Any], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]], bool]:
    """(rendered text, character spans of the trained assistant turns, prefix-stable?).

    A span runs from the end of the generation prompt before an assistant turn to the end of that
    turn's rendering (its text and the end-of-turn marker). Turns with weight 0 have none. When the
    template is not prefix-stable for this row, only the final assistant turn is trained."""
    msgs = template_messages(messages)
    text = render(msgs, tools)
    spans: list[tuple[int, int]] = []
    stable = True
    for i, m in enumerate(messages):
        if _get(m, "role") != "assistant" or _get(m, "weight") == 0:
            continue
        before = render(msgs[:i], tools, generation=True)
        upto = text if i == len(msgs) - 1 else render(msgs[: i + 1], tools)
        if not (upto.startswith(before) and text.startswith(upto)):
            stable = False
            break
        spans.append((len(before), len(upto)))
    if not stable:
        last = len(msgs) - 1
        spans = []
        if _get(messages[last], "role") == "assistant" and _get(messages[last], "weight") != 0:
            before = render(msgs[:last], tools, generation=True)
            start = len(before) if text.startswith(before) else common_prefix(before, text)
            spans = [(start, len(text))]
    return text, spans, stable


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the common start of two sequences (strings or token ids)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that starts inside a span (offsets are character offsets into the rendered text)."""
    mask = [0] * len(offsets)
    k = 0
    for j, (start, _) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if start >= spans[k][0]:
            mask[j] = 1
    return mask


def tokenize(
    tokenizer, render: Renderer, messages: Sequence[Any], tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[int], bool]:
    """(token ids, loss mask, prefix-stable?) of one conversation, as the trainer sees it."""
    text, spans, stable = loss_spans(render, messages, tools)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], mask_from_offsets(enc["offset_mapping"], spans), stable
    # a slow tokenizer has no offsets: tokenise the pieces between span edges separately
    ids: list[int] = []
    mask: list[int] = []
    edges = sorted({0, len(text), *(e for span in spans for e in span)})
    for a, b in zip(edges, edges[1:], strict=False):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        mask += [int(inside)] * len(piece)
    return ids, mask, stable


def token_count(tokenizer, render: Renderer, messages: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> int:
    """Tokens of the rendered conversation (what the mix weighs its shares by)."""
    return len(tokenizer(render(template_messages(messages), tools), add_special_tokens=False)["input_ids"])
