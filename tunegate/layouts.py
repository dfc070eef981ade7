"""The layouts other tools export, translated into the OpenAI shapes `tunegate.formats` reads.

- **ShareGPT** (`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`, with an optional
  top-level `system` and `tools`), the roles as LLaMA-Factory maps them: human/user -> user, gpt/assistant ->
  assistant, system -> system, function_call -> an assistant tool call (its value is the call's JSON),
  observation/tool -> tool. With `chosen` and `rejected` turns beside `conversations`, a preference pair.
- **OpenAI preference fine-tuning** (`input.messages` with optional `input.tools`, `preferred_output`,
  `non_preferred_output`): the DPO file uploaded to OpenAI, read as the same pair.
- **Gemini / Vertex AI tuning** (`{"contents": [{"role": "user" | "model", "parts": [{"text": ...}]}]}`, with an
  optional `systemInstruction` and `tools` of `functionDeclarations`; camelCase or the SDKs' snake_case): model ->
  assistant, text parts joined with newlines, `functionCall` parts as tool calls, `functionResponse` parts as tool
  results, file and inline data parts refused (`non_text_content`). With `completions` (one scored 1, one
  scored 0: Vertex AI's preference tuning), a preference pair.
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
- **Other names for a role** in OpenAI-shaped messages: any case of system / user / assistant / tool (`User`,
  `Assistant`), Gemini's `model`, ShareGPT's `human` and `gpt`, Cohere's `Chatbot`; each message is counted
  (`role_renamed`). Any other role is left for the role check (`wrong_role`).
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
NOTE_ROLE_ALIAS = "role_renamed"  # messages whose role was another tool's name for it (`role_alias`)
ROLES = ("system", "user", "assistant", "tool")
# Other names for the roles in files people export: Gemini's model, ShareGPT's human and gpt inside OpenAI
# messages, Cohere's Chatbot (and User / System: any case of the four roles is read as that role).
ROLE_ALIASES = {"model": "assistant", "human": "user", "gpt": "assistant", "chatbot": "assistant"}

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
GEMINI_ROLES = {"user": "user", "model": "assistant", "system": "system", "function": "tool", "tool": "tool"}
# Parts a text model cannot train on (camelCase as the REST API writes them, snake_case as the SDKs do).
GEMINI_NOT_TEXT = ("inlineData", "inline_data", "fileData", "file_data", "executableCode", "executable_code",
                   "codeExecutionResult", "code_execution_result")  # fmt: skip


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
            t if not isinstance(t, dict) or "function" in t else {"type": "function", "function": t} for t in tools
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
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        missing = next((i for i, m in enumerate(turns) if "role" not in m), None)
        if missing is not None:
            raise NormaliseError("missing_field", f"{side}[{missing}] needs 'role' and 'content'")
    prompt, chosen, rejected = split_implicit(chosen, rejected)
    if notes is not None:
        notes[NOTE_IMPLICIT] += 1
    return {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def role_alias(role: str) -> str | None:
    """The role a common other name stands for (`ROLE_ALIASES`, and any case of the four roles), else None."""
    low = role.lower()
    if low in ROLES:
        return low if low != role else None
    return ROLE_ALIASES.get(low)


def legacy_message(m: dict[str, Any], notes: Counter | None) -> dict[str, Any]:
    """OpenAI's older fields in today's shape: `developer` as system, `function_call` as a tool call, role
    `function` as a tool result (its `name` kept); another tool's name for a role as the role (`role_alias`)."""
    role = m.get("role")
    if isinstance(role, str) and role.lower() == "developer":
        if notes is not None:
            notes[NOTE_DEVELOPER] += 1
        return {**m, "role": "system"}
    if isinstance(role, str) and (alias := role_alias(role)):
        if notes is not None:
            notes[NOTE_ROLE_ALIAS] += 1
        m = {**m, "role": alias}
        role = alias
    if role == "assistant" and isinstance(m.get("function_call"), dict):
        if notes is not None:
            notes[NOTE_LEGACY_FUNCTION] += 1
        call = {"type": "function", "function": m["function_call"]}
        rest = {k: v for k, v in m.items() if k != "function_call"}
        return {**rest, "content": rest.get("content") or "", "tool_calls": [*(m.get("tool_calls") or []), call]}
    if role == "function":
        return {**m, "role": "tool"}
    return m


def _field(value: dict[str, Any], camel: str) -> Any:
    """A Gemini field under its camelCase name or the snake_case one the Python SDK writes."""
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()
    return value.get(camel, value.get(snake))


def _gemini_turn(turn: Any, where: str) -> list[dict[str, Any]]:
    """One Gemini content (role and parts) as OpenAI messages: text and function calls as one message, function
    responses as one tool message each."""
    if not isinstance(turn, dict):
        raise NormaliseError("wrong_type", f"{where} must be an object with 'role' and 'parts'")
    who, parts = turn.get("role"), turn.get("parts")
    if who is None or parts is None:
        raise NormaliseError("missing_field", f"{where} needs 'role' and 'parts'")
    if not isinstance(who, str):
        raise NormaliseError("wrong_type", f"{where}.role must be a string")
    if who not in GEMINI_ROLES:
        raise NormaliseError("wrong_role", f"{where}.role {who!r} is not a Gemini role ({', '.join(GEMINI_ROLES)})")
    if not isinstance(parts, list) or not parts or not all(isinstance(part, dict) for part in parts):
        raise NormaliseError("wrong_type", f"{where}.parts must be a non-empty list of objects")
    texts, calls, results = _gemini_parts(parts, where)
    role = GEMINI_ROLES[who]
    if results and (texts or calls):
        raise NormaliseError("wrong_type", f"{where} mixes functionResponse parts with text or calls")
    if results and role not in ("user", "tool"):  # they answer the model's calls; a system or model turn holds none
        raise NormaliseError("wrong_type", f"{where}: functionResponse parts belong in a user turn, not a {who} one")
    if results:
        return results
    if calls and role != "assistant":
        raise NormaliseError("bad_tool_call", f"{where}: a functionCall part is the model's, not the {who}'s")
    return [{"role": role, "content": "\n".join(texts), **({"tool_calls": calls} if calls else {})}]


def _gemini_parts(parts: list[dict[str, Any]], where: str) -> tuple[list[str], list[dict], list[dict]]:
    """(text parts, function calls, function responses) of one content's parts."""
    texts, calls, results = [], [], []
    for j, part in enumerate(parts):
        at = f"{where}.parts[{j}]"
        if (text := part.get("text")) is not None:
            if not isinstance(text, str):
                raise NormaliseError("wrong_type", f"{at}.text must be a string")
            texts.append(text)
        elif (call := _field(part, "functionCall")) is not None:
            calls.append(_gemini_call(call, at))
        elif (result := _field(part, "functionResponse")) is not None:
            results.append(_gemini_result(result, at))
        elif kind := next((k for k in GEMINI_NOT_TEXT if k in part), None):
            raise NormaliseError("non_text_content", f"{at} is a {kind!r} part; only text parts can be trained")
        else:
            raise NormaliseError("wrong_type", f"{at} has no text, functionCall or functionResponse")
    return texts, calls, results


def _gemini_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise NormaliseError("bad_tool_call", f"{where}.functionCall needs a name")
    out = {"type": "function", "function": {"name": call["name"], "arguments": call.get("args") or {}}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def _gemini_result(result: Any, where: str) -> dict[str, Any]:
    if not isinstance(result, dict) or not isinstance(result.get("name"), str):
        raise NormaliseError("missing_field", f"{where}.functionResponse needs a name and a response")
    message = {"role": "tool", "content": json.dumps(result.get("response"), ensure_ascii=False)}
    return {**message, "tool_call_id": result["id"]} if isinstance(result.get("id"), str) else message


def _gemini_turns(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise NormaliseError("wrong_type", f"{where} must be a list of contents, got {type(value).__name__}")
    return [m for i, turn in enumerate(value) for m in _gemini_turn(turn, f"{where}[{i}]")]


def _gemini_tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise NormaliseError("wrong_type", "tools must be a list of {functionDeclarations: [...]}")
    out = []
    for i, tool in enumerate(tools):
        declared = _field(tool, "functionDeclarations") if isinstance(tool, dict) else None
        if not isinstance(declared, list):
            raise NormaliseError(
                "wrong_type", f"tools[{i}] has no functionDeclarations (only functions can be trained as tools)"
            )
        out += [{"type": "function", "function": d} for d in declared]
    return out or None


def gemini(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, record) in OpenAI's shape: `messages`, or `preference` when Vertex AI's scored `completions` are
    given (the one scored 1 chosen, the one scored 0 rejected)."""
    messages = _gemini_turns(record["contents"], "contents")
    system = _field(record, "systemInstruction")
    if system is not None:
        if not isinstance(system, dict):
            raise NormaliseError("wrong_type", "systemInstruction must be an object with 'parts'")
        (said,) = _gemini_turn({**system, "role": "system"}, "systemInstruction")
        messages.insert(0, said)
    extra = {"tools": tools} if (tools := _gemini_tools(record)) else {}
    completions = record.get("completions")
    if completions is None:
        return "messages", {"messages": messages, **extra}
    scored = {}
    for i, c in enumerate(completions if isinstance(completions, list) else [None]):
        if not isinstance(c, dict) or c.get("score") not in (0, 1) or type(c.get("score")) is bool:
            raise NormaliseError("wrong_type", f"completions[{i}] must be {{score: 0 or 1, completion: {{...}}}}")
        scored.setdefault(c["score"], []).append(_gemini_turn(c.get("completion"), f"completions[{i}].completion"))
    if sorted((score, len(turns)) for score, turns in scored.items()) != [(0, 1), (1, 1)]:
        raise NormaliseError("wrong_type", "completions must be one completion scored 1 and one scored 0")
    return "preference", {"prompt": messages, "chosen": scored[1][0], "rejected": scored[0][0], **extra}
