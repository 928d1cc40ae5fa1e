"""OpenAI Batch API files (JSON Lines, as vLLM's run-batch reads them) as request tables.

A line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
custom_id -> request_id; body.model -> adapter_id (the base's own name, given with --base-model-name, or
null: no adapter); messages -> messages; prompt (a string, or token ids) -> prompt / prompt_token_ids;
max_completion_tokens or max_tokens -> max_new_tokens; temperature, top_p, top_k, seed, stop as they are;
logprobs (chat: `logprobs: true` with `top_logprobs: N`; completions: `logprobs: N`) -> logprobs N.
The url, the model as asked and the body's other fields (one JSON object) pass through to the results as
openai_url, openai_model and openai_extra_body, which `lorafleet export` reads. Fields asking for what
lorafleet does not do (n > 1, tools, response_format json, ...) fail their line.

Lines are read one by one (json.loads), since a bad line must fail alone with its line number: it becomes
a row with input_error, which pipeline.requests turns into an error row. Types are checked here, as JSON
has its own; ranges and the rest are checked by pipeline.requests, as for every request table. A file
none of whose lines is a JSON object is not JSON Lines at all: TableError, before any work.
"""
import json

import pyarrow as pa

from engine.adapters import ADAPTER_ID
from pipeline.formats.chat import message_problems
from pipeline.schema import REQUEST_COLUMNS, TableError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PASS_THROUGH = [("openai_url", pa.string()), ("openai_model", pa.string()), ("openai_extra_body", pa.string())]
MAPPED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "logprobs", "top_logprobs"}
# body fields that ask for what lorafleet does not do -> does this value ask for it?
UNSUPPORTED = {
    "n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
    "stream": bool, "echo": bool, "suffix": lambda v: v is not None,
    "tools": bool, "functions": bool, "tool_choice": lambda v: v not in (None, "none"),
    "function_call": lambda v: v not in (None, "none"), "logit_bias": bool, "audio": lambda v: v is not None,
    "prediction": lambda v: v is not None, "modalities": lambda v: v not in (None, ["text"]),
    "response_format": lambda v: v is not None and v != {"type": "text"},
    "presence_penalty": bool, "frequency_penalty": bool,
}
INT64 = 1 << 63


class LineError(Exception):
    """Why a line cannot be a request."""


def read_batch_file(fs, path: str, base_model_name: str | None = None) -> pa.Table:
    """The request table of one .jsonl file (a row per non-blank line)."""
    name = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TableError(f"{name}: cannot read it ({type(e).__name__}: {e})") from None
    rows, objects = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        record = None
        try:
            record = _json_object(line)
            objects += 1
            rows.append(_request_row(record, base_model_name))
        except LineError as e:
            rows.append(_failed_row(record, f"line {number} of {name}: {e}"))
    if rows and not objects:
        raise TableError(f"{name}: not a JSON Lines file (no line is a JSON object); give one request object a line")
    schema = pa.schema([(c, cast_to) for c, (_, cast_to, _) in REQUEST_COLUMNS.items()] + PASS_THROUGH)
    return pa.Table.from_pylist(rows, schema=schema)


def _json_object(line: bytes) -> dict:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise LineError("not UTF-8 text") from None
    except ValueError as e:
        raise LineError(f"not valid JSON ({e})") from None
    except RecursionError:
        raise LineError("nested too deeply to read: flatten the line's JSON") from None
    if not isinstance(record, dict):
        raise LineError(f"a JSON {type(record).__name__}, not an object with custom_id, url and body")
    return record


def _failed_row(record: dict | None, error: str) -> dict:
    """What a bad line keeps: its custom_id and url where they can be read, so its error row can be matched."""
    record = record or {}
    text = {k: v for k, v in record.items() if k in ("custom_id", "url") and isinstance(v, str)}
    body = record.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    return {"request_id": text.get("custom_id") or None, "input_error": error, "openai_url": text.get("url"),
            "openai_model": model if isinstance(model, str) else None}


def _request_row(record: dict, base_model_name: str | None) -> dict:
    custom_id, url, body = record.get("custom_id"), record.get("url"), record.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("no custom_id: give every line a unique, non-empty custom_id string")
    if record.get("method", "POST") != "POST":
        raise LineError(f"method {record['method']!r} is not supported: batch lines are POST requests")
    if url not in (CHAT, COMPLETIONS):
        raise LineError(f"url {url!r} is not supported: use {CHAT} or {COMPLETIONS}")
    if not isinstance(body, dict):
        raise LineError("body is not a JSON object: give the request's parameters as an object")
    for key, asks in UNSUPPORTED.items():
        if asks(body.get(key)):
            raise LineError(f"body.{key} = {json.dumps(body[key])[:80]} is not supported: remove it")
    extra = {k: v for k, v in body.items() if k not in MAPPED and k not in UNSUPPORTED}
    model = _typed(body, "model", str)
    row = {"request_id": custom_id, "adapter_id": _adapter_id(model, base_model_name),
           "max_new_tokens": _max_tokens(body), "temperature": _number(body, "temperature"),
           "top_p": _number(body, "top_p"), "top_k": _int(body, "top_k"), "seed": _int(body, "seed"),
           "stop": _stop(body), "logprobs": _logprobs(body, url), "openai_url": url, "openai_model": model,
           "openai_extra_body": json.dumps(extra, ensure_ascii=False) if extra else None}
    if url == CHAT:
        if "prompt" in body or "messages" not in body:
            raise LineError(f"a {CHAT} body has messages (a list of {{role, content}}), not a prompt")
        row["messages"] = _messages(body["messages"])
    else:
        if "messages" in body or "prompt" not in body:
            raise LineError(f"a {COMPLETIONS} body has a prompt (a string or token ids), not messages")
        row.update(_prompt(body["prompt"]))
    return row


def _adapter_id(model: str | None, base_model_name: str | None) -> str | None:
    if model is None or model == base_model_name:
        return None
    if not ADAPTER_ID.fullmatch(model):
        raise LineError(f"body.model {model!r} is neither an adapter name nor the base model's name "
                        f"({base_model_name or 'not given: pass --base-model-name'})")
    return model


def _typed(body: dict, key: str, kind):
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise LineError(f"body.{key} = {json.dumps(value)[:80]} is not {_KIND_NAMES[kind]}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise LineError(f"body.{key} = {value} is out of range")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", (int, float): "a number", bool: "true or false"}


def _int(body: dict, key: str) -> int | None:
    return _typed(body, key, int)


def _number(body: dict, key: str) -> float | None:
    return _typed(body, key, (int, float))


def _max_tokens(body: dict) -> int | None:
    new, old = _int(body, "max_completion_tokens"), _int(body, "max_tokens")
    if new is not None and old is not None and new != old:
        raise LineError(f"body.max_completion_tokens = {new} and body.max_tokens = {old} disagree: give one")
    return new if new is not None else old


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    if stop is None or isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise LineError(f"body.stop = {json.dumps(stop)[:80]} is not a string or a list of strings")


def _logprobs(body: dict, url: str) -> int | None:
    """How many alternatives to report per token (0: the chosen token's log-probability only)."""
    if url == COMPLETIONS:
        return _int(body, "logprobs")
    wanted, top = _typed(body, "logprobs", bool), _int(body, "top_logprobs")
    if top is not None and not wanted:
        raise LineError("body.top_logprobs needs body.logprobs = true")
    return (top or 0) if wanted else None


def _messages(messages) -> list[dict]:
    """Text content parts ([{type: text, text}], as the chat API allows) are joined with newlines, as vLLM does."""
    if isinstance(messages, list):
        messages = [{**m, "content": _text_parts(m["content"])} if isinstance(m, dict) and "content" in m else m
                    for m in messages]
    problems = message_problems(messages)
    if problems:
        raise LineError("; ".join(problems))
    return messages


def _text_parts(content):
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise LineError("only text content parts ({type: text, text}) are supported")
    return "\n".join(p["text"] for p in content)


def _prompt(prompt) -> dict:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]          # a batch of one prompt
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and -INT64 <= t < INT64
                                        for t in prompt):
        return {"prompt_token_ids": prompt}
    raise LineError("body.prompt must be one string or one list of token ids: give each prompt its own line")
