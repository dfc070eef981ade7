"""The layouts other tools export, translated into the OpenAI shapes `tunegate.formats` reads.

- **ShareGPT** (`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`, with an optional
  top-level `system` and `tools`), the roles as LLaMA-Factory maps them: human/user -> user, gpt/assistant ->
  assistant, system -> system, function_call -> an assistant tool call (its value is the call's JSON),
  observation/tool -> tool. With `chosen` and `rejected` turns beside `conversations`, a preference pair.
- **OpenAI preference fine-tuning** (`input.messages` with optional `input.tools`, `preferred_output`,
  `non_preferred_output`): the DPO file uploaded to OpenAI, read as the same pair.
- **Implicit-prompt pairs** (TRL's layout: `chosen` and `rejected` are whole conversations that share their
  prompt turns, no `prompt`): the shared turns are the prompt; pairs that differ before the answer are
  quarantined (`prompt_mismatch`).
- **Anthropic HH** text pairs (`"\\n\\nHuman: ...\\n\\nAssistant: ..."` in `chosen` and `rejected`): parsed into
  turns, then split as an implicit-prompt pair.
- OpenAI's **`developer` role** (system instructions for newer models) becomes the system turn: the chat
  templates of the open-weight families this project trains (Llama, Qwen, Mistral, Gemma) have no developer
  role; each row is counted (`developer_as_system`).
- Legacy OpenAI **`function_call`** on an assistant message and role **`function`** become a tool call and a
  tool result (`legacy_function_call`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

NOTE_DEVELOPER = "developer_as_system"
NOTE_LEGACY_FUNCTION = "legacy_function_call"
NOTE_IMPLICIT = "implicit_prompt"  # preference pairs whose prompt is the turns chosen and rejected share
NOTE_HH = "hh_text_pair"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class NormaliseError(ValueError):
    """A record that cannot become a row: a reason (the quarantine's column) and a detail naming the field."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _sharegpt_turn(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise NormaliseError("wrong_type", f"{where} must be an object with 'from' and 'value'")
    who, value = turn.get("from"), turn.get("value")
    if who is None or value is None:
        raise NormaliseError("missing_field", f"{where} needs 'from' and 'value'")
    if not isinstance(who, str) or not isinstance(value, str):
        raise NormaliseError("wrong_type", f"{where}.from and .value must be strings")
    if who == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _calls(value, f"{where}.value")}
    role = SHAREGPT_ROLES.get(who)
    if role is None:
        known = ", ".join(sorted({*SHAREGPT_ROLES, "function_call"}))
        raise NormaliseError("wrong_role", f"{where}.from {who!r} is not a ShareGPT role ({known})")
    return {"role": role, "content": value}


def _calls(value: str, where: str) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn's value: one call or a list of them, each {"name", "arguments"}."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        raise NormaliseError("bad_tool_call", f"{where} is not JSON (a function_call turn holds the call)") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise NormaliseError("bad_tool_call", f"{where} needs 'name' (and 'arguments') for each call")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _sharegpt_tools(record: dict[str, Any]) -> Any:
    tools = record.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory keeps the tools list as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else None
        except (json.JSONDecodeError, RecursionError):
            raise NormaliseError("wrong_type", "tools is text but not JSON (a list of tool definitions)") from None
    if isinstance(tools, list):  # bare function definitions become OpenAI tool entries
        tools = [
            t if "function" in t or not isinstance(t, dict) else {"type": "function", "function": t} for t in tools
        ]
    return tools


def sharegpt(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, record) in OpenAI's shape: `messages`, or `preference` when chosen/rejected turns are given."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise NormaliseError("wrong_type", f"conversations must be a list of turns, got {type(turns).__name__}")
    messages = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise NormaliseError("wrong_type", "system must be a string")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    extra = {"tools": tools} if (tools := _sharegpt_tools(record)) else {}
    if "chosen" not in record and "rejected" not in record:
        return "messages", {"messages": messages, **extra}
    pair = {}
    for side in ("chosen", "rejected"):
        if record.get(side) is None:
            raise NormaliseError("missing_field", side)
        value = record[side]
        pair[side] = [_sharegpt_turn(t, f"{side}[{i}]") for i, t in enumerate(value)] if isinstance(value, list) else [
            _sharegpt_turn(value, side)
        ]  # fmt: skip
    return "preference", {"prompt": messages, **pair, **extra}


def openai_preference(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's preference fine-tuning record as a preference record (prompt, chosen, rejected, tools)."""
    given = record["input"]
    if not isinstance(given, dict) or given.get("messages") is None:
        raise NormaliseError("missing_field", "input.messages")
    out = {
        "prompt": given["messages"],
        "chosen": record["preferred_output"],
        "rejected": record["non_preferred_output"],
    }
    return {**out, "tools": given["tools"]} if given.get("tools") else out


def hh_turns(text: str, side: str) -> list[dict[str, str]]:
    """An Anthropic HH transcript as turns; text before the first marker (other than whitespace) is refused."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise NormaliseError(
            "wrong_type", f"{side} is text but not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript"
        )
    return [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


def split_implicit(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) of a pair whose prompt is the turns both conversations share (TRL's implicit
    prompt): they must share at least one turn and part where the answers begin (an assistant turn)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise NormaliseError("prompt_mismatch", "chosen and rejected share no prompt turn (their first turns differ)")
    if k == len(chosen) and k == len(rejected):
        raise NormaliseError("chosen_equals_rejected", "chosen and rejected are the same conversation")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if k == len(turns) or turns[k]["role"] != "assistant":
            what = "ends" if k == len(turns) else f"has a {turns[k]['role']} turn"
            raise NormaliseError(
                "prompt_mismatch",
                f"{side} {what} where the pair parts (turn {k}): an implicit-prompt pair shares every turn before "
                "the answers",
            )
    return chosen[:k], chosen[k:], rejected[k:]


def implicit_pair(record: dict[str, Any], notes: Counter | None) -> dict[str, Any]:
    """A preference record without `prompt`: HH text pairs parsed into turns, then the shared turns as the prompt.
    The sides are plain turns here; formats.normalise checks each message as for any preference row."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and HH_TURN.match(chosen):
        chosen, rejected = hh_turns(chosen, "chosen"), hh_turns(rejected, "rejected")
        if notes is not None:
            notes[NOTE_HH] += 1
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise NormaliseError(
            "missing_field", "prompt (or chosen and rejected as whole conversations that share their prompt turns)"
        )
    if not all(isinstance(m, dict) for m in chosen + rejected):
        raise NormaliseError("wrong_type", "chosen and rejected must be lists of messages")
    prompt, chosen, rejected = split_implicit(chosen, rejected)
    if notes is not None:
        notes[NOTE_IMPLICIT] += 1
    return {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def legacy_message(m: dict[str, Any], notes: Counter | None) -> dict[str, Any]:
    """OpenAI's older fields in today's shape: `developer` as system, `function_call` as a tool call, role
    `function` as a tool result (its `name` kept)."""
    role = m.get("role")
    if role == "developer":
        if notes is not None:
            notes[NOTE_DEVELOPER] += 1
        return {**m, "role": "system"}
    if role == "assistant" and isinstance(m.get("function_call"), dict):
        if notes is not None:
            notes[NOTE_LEGACY_FUNCTION] += 1
        call = {"type": "function", "function": m["function_call"]}
        rest = {k: v for k, v in m.items() if k != "function_call"}
        return {**rest, "content": rest.get("content") or "", "tool_calls": [*(m.get("tool_calls") or []), call]}
    if role == "function":
        return {**m, "role": "tool"}
    return m
