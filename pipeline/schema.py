"""The request and result table schemas (DESIGN.md "Tables"), and the error for a table we refuse."""
import pyarrow as pa


class TableError(Exception):
    """A table that cannot be a request table. str(e) is one line naming the file and the column."""


# Request columns and the Arrow types each accepts; anything else in a request table is an extra
# column that passes through to the results.
def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_of(t: pa.DataType, item) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return is_list and (item(t.value_type) or pa.types.is_null(t.value_type))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _is_messages(t: pa.DataType) -> bool:
    """list<struct<role: string, content: string>>, fields in any order, no others."""
    def is_message(m):
        return pa.types.is_struct(m) and sorted(f.name for f in m) == ["content", "role"] and all(
            _is_string(f.type) or pa.types.is_null(f.type) for f in m)
    return _is_list_of(t, is_message)


# column -> (accepts a type?, the type it is cast to, what to write instead)
REQUEST_COLUMNS = {
    "request_id": (_is_string, pa.string(), "string"),
    "adapter_id": (_is_string, pa.string(), "string (null = base model)"),
    "prompt": (_is_string, pa.string(), "string"),
    "prompt_token_ids": (lambda t: _is_list_of(t, pa.types.is_integer), pa.list_(pa.int64()), "list of integers"),
    "max_new_tokens": (pa.types.is_integer, pa.int64(), "integer"),
    "temperature": (_is_number, pa.float64(), "number"),
    "top_p": (_is_number, pa.float64(), "number"),
    "top_k": (pa.types.is_integer, pa.int64(), "integer"),
    "seed": (pa.types.is_integer, pa.int64(), "integer"),
    # a plain string is taken as a one-element stop list, as vLLM's `stop` accepts both
    "stop": (lambda t: _is_list_of(t, _is_string) or _is_string(t), pa.list_(pa.string()), "list of strings"),
    # a chat instead of a prompt, rendered with the chat template (pipeline/formats/chat.py)
    "messages": (_is_messages, MESSAGES, "list of {role: string, content: string}"),
    # why a line of a batch file cannot be a request (pipeline/formats/batch_files.py); the row fails with it
    "input_error": (_is_string, pa.string(), "string"),
    # scored rows (engine/scoring.py) and per-token log-probs
    "continuation": (_is_string, pa.string(), "string"),
    "continuation_token_ids": (lambda t: _is_list_of(t, pa.types.is_integer), pa.list_(pa.int64()),
                               "list of integers"),
    "logprobs": (pa.types.is_integer, pa.int64(), "integer"),
}

TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])

RESULT_SCHEMA = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("adapter_id", pa.string()),
    pa.field("output_text", pa.string()),
    pa.field("output_token_ids", pa.list_(pa.int32())),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("base_model", pa.string()),
    pa.field("adapter_sha256", pa.string()),
    # null unless the row was scored / asked for logprobs
    pa.field("continuation_logprob", pa.float64()),
    pa.field("continuation_tokens", pa.int32()),
    pa.field("is_greedy", pa.bool_()),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
    pa.field("run_id", pa.string()),
    pa.field("completed_at", pa.timestamp("us", tz="UTC")),
])
RESULT_COLUMNS = RESULT_SCHEMA.names
SCORING_COLUMNS = ("continuation_logprob", "continuation_tokens", "is_greedy", "token_logprobs", "top_logprobs")
PARTITION_COLUMN = "date"   # of the results' Hive folders (pipeline.layout): readers add it to every row
