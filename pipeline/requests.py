"""Read a request table from any fsspec URL and turn its rows into engine Requests.

A table that cannot be a request table is refused whole (TableError, before any work); a bad row only
fails itself: it becomes an error RequestOutput that says what is wrong and what to do."""
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.adapters import ADAPTER_ID
from engine.request import MAX_LOGPROBS, Request, RequestOutput, SamplingParams
from pipeline.bad_values import int64_overflow_rows, invalid_rows, null_rows
from pipeline.formats.batch_files import read_batch_file
from pipeline.formats.chat import message_problems
from pipeline.schema import PARTITION_COLUMN, REQUEST_COLUMNS, RESULT_SCHEMA, TableError
from pipeline.storage import filesystem, read_parquet, visible_files

SHOWN_IDS, SHOWN_ID_CHARS = 5, 64   # repeated request_ids named in the log and summary.json, and their length


def read_request_table(url: str, storage_options: dict | None = None, base_model_name: str | None = None) -> pa.Table:
    """One .parquet or .jsonl (OpenAI batch) file, or every *.parquet and *.jsonl below a folder (skipping
    '_'/'.' names), as one table with the request columns cast to one type each and extra columns kept as
    they are. base_model_name: the model name in a batch file that means the base model. A value no request
    may use (invalid UTF-8, an integer beyond int64) is replaced by null and its row gets an input_error
    naming the column: that row alone becomes an error row."""
    fs, root = filesystem(url, storage_options)
    if fs.isdir(root):
        paths = [p for p in visible_files(fs, root) if p.endswith((".parquet", ".jsonl"))]
        if not paths:
            raise TableError(f"{url}: no *.parquet or *.jsonl files in this folder")
    elif fs.isfile(root):
        paths = [root]
    else:
        raise TableError(f"{url}: no such file or folder")
    tables = [_read_one(fs, path, base_model_name) for path in paths]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        raise _conflict(fs, paths, tables) from None
    return table.select([c for c in REQUEST_COLUMNS if c in table.column_names]
                        + [c for c in table.column_names if c not in REQUEST_COLUMNS])


def _read_one(fs, path: str, base_model_name: str | None) -> pa.Table:
    name = fs.unstrip_protocol(path)
    if path.endswith(".jsonl"):
        table = read_batch_file(fs, path, base_model_name)
    else:
        try:
            table = read_parquet(fs, path)
        except Exception as e:  # noqa: BLE001 - any failure to read is "not a request table"
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TableError(f"{name}: not a readable Parquet file ({detail})") from None
    columns = table.column_names
    if "request_id" not in columns:
        raise TableError(f"{name}: missing column 'request_id' (a unique string per row)")
    if not {"prompt", "prompt_token_ids", "messages"} & set(columns):
        raise TableError(f"{name}: missing column 'prompt' (or 'prompt_token_ids', or 'messages'); one of them "
                         "is required")
    _check_names(name, columns)
    problems: dict[int, list[str]] = {}   # row -> its values replaced by null, and why
    for i, f in enumerate(table.schema):
        column = table.column(i)
        if pa.types.is_dictionary(f.type):
            # a Categorical column in one file and plain strings in another are one column
            column = column.cast(f.type.value_type)
        bad = invalid_rows(column)
        if f.name in REQUEST_COLUMNS:   # their integers are read as int64 below
            bad = {**int64_overflow_rows(column), **bad}
        for row, why in bad.items():
            problems.setdefault(row, []).append(f"{f.name} {why}")
        if bad or pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, null_rows(column, bad) if bad else column)
    for column, (accepts, cast_to, wanted) in REQUEST_COLUMNS.items():
        if column not in columns:
            continue
        array = table[column]
        if not (pa.types.is_null(array.type) or accepts(array.type)):
            raise TableError(f"{name}: column '{column}' has type {array.type}; it must be {wanted}")
        try:
            table = table.set_column(columns.index(column), column, _cast(array, cast_to))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            detail = str(e).splitlines()[0]
            raise TableError(f"{name}: column '{column}' cannot be read as {wanted} ({detail})") from None
    return _with_input_errors(table, name, problems) if problems else table


def _with_input_errors(table: pa.Table, name: str, problems: dict[int, list[str]]) -> pa.Table:
    """The rows with values replaced by null fail as a batch file's bad lines do: with an input_error."""
    errors = table["input_error"].to_pylist() if "input_error" in table.column_names else [None] * table.num_rows
    for row, why in problems.items():
        errors[row] = "; ".join(filter(None, [errors[row], f"row {row + 1} of {name}: {'; '.join(why)}"]))
    if "input_error" in table.column_names:
        return table.set_column(table.column_names.index("input_error"), "input_error", pa.array(errors, pa.string()))
    return table.append_column("input_error", pa.array(errors, pa.string()))


def _check_names(name: str, columns: list[str]) -> None:
    """Refuse column names that readers of the results would confuse (DuckDB matches names ignoring case): two
    alike, a pass-through column named as a result column, or as the Hive partition column `date` of a
    night's folder (which replaces it)."""
    seen = {}
    for column in columns:
        if column.lower() in seen:
            raise TableError(f"{name}: columns '{seen[column.lower()]}' and '{column}' have one name (names "
                             "compare ignoring case, as DuckDB does); rename one")
        seen[column.lower()] = column
    taken = {c.lower(): c for c in [*RESULT_SCHEMA.names, PARTITION_COLUMN]}
    for column in columns:
        clash = None if column in REQUEST_COLUMNS else taken.get(column.lower())
        if clash == PARTITION_COLUMN:
            raise TableError(f"{name}: column '{column}' would be replaced by the results' partition column "
                             f"'{PARTITION_COLUMN}' (date=YYYY-MM-DD folders; names compare ignoring case); "
                             "rename it")
        if clash is not None:
            raise TableError(f"{name}: column '{column}' has the name of the result column '{clash}' (names "
                             "compare ignoring case, as DuckDB does); rename it so it can pass through")


def _cast(array: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_list(to) and not pa.types.is_null(array.type) and not hasattr(array.type, "value_type"):
        # a plain string stop column: each value becomes a one-element list (a null stays null)
        return pa.chunked_array([_one_element_lists(chunk.cast(to.value_type)) for chunk in array.chunks], to)
    return array.cast(to)


def _one_element_lists(values: pa.Array) -> pa.Array:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=values.is_null())


def _conflict(fs, paths: list[str], tables: list[pa.Table]) -> TableError:
    """Name the first extra column whose type differs between two files."""
    first_seen = {}
    for path, table in zip(paths, tables):
        for f in table.schema:
            if pa.types.is_null(f.type):
                continue
            seen = first_seen.setdefault(f.name, (path, f.type))
            if seen[1] != f.type:
                return TableError(f"{fs.unstrip_protocol(path)}: column '{f.name}' has type {f.type}, but "
                                  f"{fs.unstrip_protocol(seen[0])} has {seen[1]}; write it with one type in every file")
    return TableError(f"{fs.unstrip_protocol(paths[0])}: files have schemas that cannot be combined")


@dataclass
class PassThrough:
    """The request table's extra columns, kept as Arrow so that any type round-trips as it is, and the row of
    each request_id in them: a result shard takes its rows' values with one `take`."""
    table: pa.Table = field(default_factory=lambda: pa.table({}))
    row_of: dict[str, int] = field(default_factory=dict)

    def rows(self, request_ids: list[str | None]) -> pa.Table:
        """The extra columns of these requests, in this order; nulls for an id without a row (no request_id)."""
        return self.table.take(pa.array([self.row_of.get(i) for i in request_ids], pa.int64()))


@dataclass
class ParsedRequests:
    requests: list[Request] = field(default_factory=list)          # valid rows, in table order
    rejected: list[RequestOutput] = field(default_factory=list)    # one error row per bad row
    duplicates: list[str] = field(default_factory=list)            # request_ids seen again (no row)
    pass_through: PassThrough = field(default_factory=PassThrough)
    messages: dict[str, list[dict]] = field(default_factory=dict)  # request_id -> its chat (pipeline/formats/chat.py)


def parse_requests(table: pa.Table, default_max_new_tokens: int) -> ParsedRequests:
    """Valid rows become Requests; each bad row becomes one error RequestOutput; a repeated
    request_id keeps its first row (valid or not) and is listed in `duplicates`."""
    extras = [c for c in table.column_names if c not in REQUEST_COLUMNS]
    parsed = ParsedRequests(pass_through=PassThrough(_pass_through(table.select(extras))))
    rows = table.select([c for c in table.column_names if c in REQUEST_COLUMNS]).to_pylist()
    seen = set()
    for number, row in enumerate(rows, start=1):
        request_id = row.get("request_id")
        if request_id in seen:
            parsed.duplicates.append(request_id)
            continue
        if isinstance(request_id, str) and request_id:
            seen.add(request_id)
            parsed.pass_through.row_of[request_id] = number - 1
        problems = _row_problems(row, number)
        if problems:
            parsed.rejected.append(RequestOutput(request_id or None, row.get("adapter_id"), None, [], 0, 0, "error",
                                                 "; ".join(problems)))
        else:
            parsed.requests.append(_request(row, default_max_new_tokens))
            if row.get("messages") is not None:
                parsed.messages[request_id] = row["messages"]
    return parsed


def _pass_through(table: pa.Table) -> pa.Table:
    """The extra columns as they go into the results, each nullable (a row without a request_id has none of
    them). An all-null column is typed null; written as such, it would clash with the same column of another
    night (string, say) when the nights are read as one table: it becomes string."""
    fields = [pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type, True, f.metadata)
              for f in table.schema]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(table.columns, fields)], schema=pa.schema(fields))


def duplicates_summary(duplicates: list[str]) -> dict:
    """What the log and summary.json say about repeated request_ids: counts and the first few ids, each cut
    short (50,000 copies of a 1 MB id must not become 50,000 lines or a 50 GB summary)."""
    distinct = list(dict.fromkeys(duplicates))
    return {"rows": len(duplicates), "ids": len(distinct), "first": [_shorten(i) for i in distinct[:SHOWN_IDS]]}


def _shorten(text: str) -> str:
    return text if len(text) <= SHOWN_ID_CHARS else f"{text[:SHOWN_ID_CHARS]}... ({len(text):,} characters)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _row_problems(row: dict, number: int) -> list[str]:
    """Everything wrong with one row, each with what to do about it."""
    if row.get("input_error") is not None:
        return [row["input_error"]]
    problems = []
    request_id = row.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        problems.append(f"row {number} has no request_id: give every row a unique, non-empty request_id")
    adapter_id = row.get("adapter_id")
    if adapter_id is not None and not (isinstance(adapter_id, str) and ADAPTER_ID.fullmatch(adapter_id)):
        problems.append(f"adapter_id {adapter_id!r} is not a plain adapter name: it must be 1-128 letters, "
                        "digits, '.', '_' or '-', starting with a letter or digit (null = base model)")
    token_ids, prompt, messages = row.get("prompt_token_ids"), row.get("prompt"), row.get("messages")
    if messages is not None:
        if token_ids is not None or prompt is not None:
            problems.append("the row has messages and a prompt: give one of prompt, prompt_token_ids or messages")
        problems += message_problems(messages)
    elif token_ids is not None:
        if not token_ids:
            problems.append("prompt_token_ids is empty: give at least one token id, or null to use prompt")
        elif not all(_is_int(t) and t >= 0 for t in token_ids):
            problems.append("prompt_token_ids has null or negative ids: token ids must be integers >= 0")
    elif not isinstance(prompt, str) or not prompt:
        if not _is_scored(row):    # a scored row's empty prompt is the prefix token (engine/scoring.py)
            problems.append("prompt is null or empty: give a non-empty prompt (or prompt_token_ids)")
    checks = [
        ("max_new_tokens", _is_int, lambda v: v >= 1, "an integer >= 1 (null = the run's default)"),
        ("temperature", _is_number, lambda v: v >= 0, "a number >= 0 (0 or null = greedy)"),
        ("top_p", _is_number, lambda v: 0 < v <= 1, "a number in (0, 1] (null = 1)"),
        ("top_k", _is_int, lambda v: v >= 0, "an integer >= 0 (0 or null = off)"),
        ("seed", _is_int, lambda v: True, "an integer (null = derived from request_id)"),
        ("logprobs", _is_int, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer from 0 to {MAX_LOGPROBS} (null = none)"),
    ]
    for name, has_type, in_range, wanted in checks:
        value = row.get(name)
        if value is not None and not (has_type(value) and in_range(value)):
            problems.append(f"{name} = {value!r} is invalid: it must be {wanted}")
    stop = row.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        problems.append(f"stop = {stop!r} is invalid: it must be a list of non-empty strings (null = none)")
    return problems + _scoring_problems(row)


def _is_scored(row: dict) -> bool:
    return row.get("continuation") is not None or row.get("continuation_token_ids") is not None


def _scoring_problems(row: dict) -> list[str]:
    """What is wrong with a scored row's continuation (nothing, for a row that generates)."""
    if not _is_scored(row):
        return []
    text, ids = row.get("continuation"), row.get("continuation_token_ids")
    problems = []
    if text is not None and ids is not None:
        problems.append("the row gives both continuation and continuation_token_ids: give one of them")
    if text == "" or ids == []:
        problems.append("the continuation is empty: give the text (or token ids) to score, or null to generate")
    if ids and not all(_is_int(t) and t >= 0 for t in ids):
        problems.append("continuation_token_ids has null or negative ids: token ids must be integers >= 0")
    if row.get("max_new_tokens") is not None:
        problems.append("the row has both max_new_tokens and a continuation: a row with a continuation is scored, "
                        "not generated; drop max_new_tokens (or the continuation, to generate)")
    return problems


def _request(row: dict, default_max_new_tokens: int) -> Request:
    def value(name, default):
        v = row.get(name)
        return default if v is None else v

    sampling = SamplingParams(
        max_new_tokens=value("max_new_tokens", default_max_new_tokens),
        temperature=float(value("temperature", 0.0)),
        top_p=float(value("top_p", 1.0)),
        top_k=value("top_k", 0),
        seed=row.get("seed"),
        stop=value("stop", []),
    )
    return Request(row["request_id"], row.get("adapter_id"), row.get("prompt"), row.get("prompt_token_ids"), sampling,
                   row.get("continuation"), row.get("continuation_token_ids"), row.get("logprobs"))
