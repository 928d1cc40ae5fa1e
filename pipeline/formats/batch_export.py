"""`lorafleet export --format openai-batch`: a results directory as an OpenAI Batch API output file.

One line per result row: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
A row that ran answers with status 200 and the body the endpoint of its request would have returned (the
openai_url pass-through column of a batch-file row; a row of a Parquet table counts as a completion): a
`chat.completion` with `message`, or a `text_completion` with `text`, its finish_reason, usage and, where
the row asked for them, logprobs in that endpoint's shape. An error row answers with status 400 and
{"error": {"message", "type": "invalid_request_error"}}, as the API answers a request it refuses. Ids are
derived from run_id and request_id, so exporting twice writes the same file.
"""
import hashlib
import json
from collections.abc import Callable, Iterator

from engine.tokenizer import Tokenizer
from pipeline.formats.batch_files import CHAT
from pipeline.results import ResultStore
from pipeline.storage import filesystem, publish, read_parquet


class ExportError(Exception):
    """Nothing to export, or no way to write it; str(e) is one line."""


def export_openai_batch(results_url: str, output_url: str, storage_options: dict | None = None,
                        model_url: str | None = None) -> int:
    """Write every committed result row under results_url to output_url; returns the lines written.
    model_url: the checkpoint whose tokenizer spells generated tokens for logprobs (default: the rows'
    base_model)."""
    store = ResultStore(results_url, storage_options)
    paths = store.shard_paths()
    if not paths:
        raise ExportError(f"{results_url}: no result shards (part-*.parquet) to export")
    spell = _TokenSpeller(model_url, storage_options)
    lines = [json.dumps(batch_output_line(row, spell), ensure_ascii=False) for row in _rows(store, paths)]
    fs, path = filesystem(output_url, storage_options)
    try:
        publish(fs, path, ("\n".join(lines) + "\n").encode("utf-8"), path.rsplit("/", 1)[0] or ".")
    except OSError as e:
        raise ExportError(f"cannot write {output_url}: {type(e).__name__}: {e}") from None
    return len(lines)


def _rows(store: ResultStore, paths: list[str]) -> Iterator[dict]:
    for path in paths:
        yield from read_parquet(store.fs, path).to_pylist()


def batch_output_line(row: dict, spell: Callable[[int, str | None], str]) -> dict:
    """The Batch API output line of one result row. spell(token_id, base_model) is a token's text."""
    # the error tells apart the rows of lines that had no custom_id (it names their line)
    key = hashlib.sha256(f"{row['run_id']}/{row['request_id']}/{row['error']}".encode()).hexdigest()[:24]
    if row["finish_reason"] == "error":
        status, body = 400, {"error": {"message": row["error"], "type": "invalid_request_error", "param": None,
                                       "code": None}}
    else:
        status, body = 200, _completion(row, key, spell)
    return {"id": f"batch_req_{key}", "custom_id": row["request_id"],
            "response": {"status_code": status, "request_id": f"req_{key}", "body": body}, "error": None}


def _completion(row: dict, key: str, spell) -> dict:
    chat = row.get("openai_url") == CHAT
    choice = {"index": 0, "finish_reason": row["finish_reason"], "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": row["output_text"], "refusal": None}
    else:
        choice["text"] = row["output_text"]
    if row.get("token_logprobs") is not None:
        tokens = [_token_text(t, row, spell) for t in row["output_token_ids"]]
        choice["logprobs"] = (_chat_logprobs if chat else _completion_logprobs)(
            tokens, row["token_logprobs"], row.get("top_logprobs") or [[] for _ in tokens])
    prompt_tokens, output_tokens = row["prompt_tokens"] or 0, row["output_tokens"] or 0
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{key}", "object": "chat.completion" if chat else "text_completion",
            "created": int(row["completed_at"].timestamp()),
            "model": row.get("openai_model") or row["adapter_id"] or row["base_model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
                      "total_tokens": prompt_tokens + output_tokens}}


def _token_text(token_id: int, row: dict, spell) -> str:
    """From the row's own top alternatives when the token is among them, else from the tokenizer."""
    for alternatives in row.get("top_logprobs") or []:
        for alt in alternatives or []:
            if alt["token_id"] == token_id and alt["token"] is not None:
                return alt["token"]
    return spell(token_id, row["base_model"])


def _chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[dict]]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a["token"], a["logprob"]) for a in alts or []]}
                        for t, lp, alts in zip(tokens, logprobs, top)],
            "refusal": None}


def _completion_logprobs(tokens: list[str], logprobs: list[float], top: list[list[dict]]) -> dict:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [{a["token"]: a["logprob"] for a in alts or []} for alts in top],
            "text_offset": offsets}


class _TokenSpeller:
    """A generated token's text, from the tokenizer of model_url (or of the row's base_model), read once."""

    def __init__(self, model_url: str | None, storage_options: dict | None):
        self.model_url, self.storage_options = model_url, storage_options
        self.tokenizers: dict[str, Tokenizer] = {}

    def __call__(self, token_id: int, base_model: str | None) -> str:
        url = self.model_url or base_model
        if url not in self.tokenizers:
            try:
                self.tokenizers[url] = Tokenizer(url, self.storage_options)
            except (OSError, ValueError, TypeError) as e:
                raise ExportError(f"cannot read the tokenizer of {url} to spell the logprob tokens "
                                  f"({type(e).__name__}: {e}): pass --model") from None
        return self.tokenizers[url].token_text(token_id)

