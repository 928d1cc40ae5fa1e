"""Reading request tables (whole-table refusals) and parsing their rows (a bad row fails alone)."""
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.requests import parse_requests, read_request_table
from pipeline.schema import TableError


def write(path, columns: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def table_error(url, **kwargs) -> str:
    with pytest.raises(TableError) as info:
        read_request_table(url, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reading -----------------------------------------------------------------------------------------------

def test_reads_folder_of_files_with_compatible_schemas(tmp_path):
    write(tmp_path / "a.parquet", {"request_id": ["r1", "r2"], "prompt": ["w1 w2", "w3"],
                                   "max_new_tokens": pa.array([4, None], pa.int32()),
                                   "task": ["qa", "sum"]})
    write(tmp_path / "sub" / "b.parquet", {"request_id": pa.array(["r3"], pa.large_string()),
                                           "prompt_token_ids": pa.array([[5, 6]], pa.list_(pa.int32())),
                                           "max_new_tokens": pa.array([9], pa.int64()),
                                           "adapter_id": pa.array(["a1"]).dictionary_encode(),
                                           "stop": [["x", "y"]]})
    # skipped: '_' and '.' names, and files that are not *.parquet
    write(tmp_path / "_runs" / "junk.parquet", {"zzz": [1]})
    write(tmp_path / ".hidden.parquet", {"zzz": [1]})
    (tmp_path / "README.txt").write_text("not a table")

    table = read_request_table(str(tmp_path))
    assert table.num_rows == 3
    assert table.column_names == ["request_id", "adapter_id", "prompt", "prompt_token_ids",
                                  "max_new_tokens", "stop", "task"]
    assert table.schema.field("request_id").type == pa.string()
    assert table.schema.field("max_new_tokens").type == pa.int64()
    rows = table.to_pylist()
    assert rows[0]["max_new_tokens"] == 4 and rows[0]["prompt_token_ids"] is None and rows[0]["task"] == "qa"
    assert rows[2] == {"request_id": "r3", "adapter_id": "a1", "prompt": None, "prompt_token_ids": [5, 6],
                       "max_new_tokens": 9, "stop": ["x", "y"], "task": None}


def test_reads_single_file_on_memory_filesystem():
    import fsspec
    fs = fsspec.filesystem("memory")
    with fs.open("/reqs/t.parquet", "wb") as f:
        pq.write_table(pa.table({"request_id": ["r1"], "prompt": ["w1"], "stop": ["###"]}), f)
    table = read_request_table("memory://reqs/t.parquet")
    assert table.to_pylist() == [{"request_id": "r1", "prompt": "w1", "stop": ["###"]}]  # plain string stop
    assert read_request_table("memory://reqs").num_rows == 1
    fs.rm("/reqs", recursive=True)


def test_not_parquet(tmp_path):
    (tmp_path / "t.parquet").write_text("request_id,prompt\nr1,hello\n")
    message = table_error(str(tmp_path / "t.parquet"))
    assert str(tmp_path / "t.parquet") in message and "not a readable Parquet file" in message


def test_missing_path_and_empty_folder(tmp_path):
    assert "no such file" in table_error(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    assert "no *.parquet or *.jsonl files" in table_error(str(tmp_path / "empty"))


def test_missing_request_id(tmp_path):
    path = write(tmp_path / "t.parquet", {"id": ["r1"], "prompt": ["w1"]})
    message = table_error(path)
    assert path in message and "'request_id'" in message


def test_missing_prompt_and_token_ids(tmp_path):
    path = write(tmp_path / "t.parquet", {"request_id": ["r1"], "text": ["w1"]})
    message = table_error(path)
    assert path in message and "'prompt'" in message and "prompt_token_ids" in message


@pytest.mark.parametrize("column, values", [
    ("request_id", pa.array([1, 2])),
    ("adapter_id", pa.array([1, 2])),
    ("prompt", pa.array([[1], [2]])),
    ("prompt_token_ids", pa.array(["w1", "w2"])),
    ("prompt_token_ids", pa.array([[1.5], [2.0]])),
    ("max_new_tokens", pa.array([1.0, 2.0])),
    ("temperature", pa.array(["hot", "cold"])),
    ("top_p", pa.array([True, False])),
    ("top_k", pa.array([0.5, 1.0])),
    ("seed", pa.array(["1", "2"])),
    ("stop", pa.array([[1], [2]])),
])
def test_column_of_wrong_type(tmp_path, column, values):
    columns = {"request_id": ["r1", "r2"], "prompt": ["w1", "w2"], column: values}
    path = write(tmp_path / "t.parquet", columns)
    message = table_error(path)
    assert path in message and f"'{column}'" in message and "must be" in message


def test_extra_column_with_conflicting_types_across_files(tmp_path):
    a = write(tmp_path / "a.parquet", {"request_id": ["r1"], "prompt": ["w1"], "task": ["qa"]})
    b = write(tmp_path / "b.parquet", {"request_id": ["r2"], "prompt": ["w2"], "task": [[1, 2]]})
    message = table_error(str(tmp_path))
    assert "'task'" in message and a in message and b in message


def test_categorical_and_plain_string_pass_through_columns_read_as_one(tmp_path):
    pq.write_table(pa.table({"request_id": ["r1"], "prompt": ["w1"],
                             "task": pa.array(["qa"]).dictionary_encode()}), tmp_path / "a.parquet")
    write(tmp_path / "b.parquet", {"request_id": ["r2"], "prompt": ["w2"], "task": ["sort"]})
    table = read_request_table(str(tmp_path))
    assert table.schema.field("task").type == pa.string() and sorted(table["task"].to_pylist()) == ["qa", "sort"]


def test_column_named_like_a_result_column(tmp_path):
    path = write(tmp_path / "t.parquet", {"request_id": ["r1"], "prompt": ["w1"], "output_text": ["old"]})
    message = table_error(path)
    assert path in message and "'output_text'" in message


# -- parsing rows ------------------------------------------------------------------------------------------

def parse(rows: list[dict], default_max_new_tokens: int = 7):
    names = list(dict.fromkeys(name for row in rows for name in row))
    return parse_requests(pa.table({n: [row.get(n) for row in rows] for n in names}), default_max_new_tokens)


def test_valid_rows_become_requests_with_defaults():
    parsed = parse([
        {"request_id": "r1", "adapter_id": None, "prompt": "w1 w2", "temperature": None, "top_p": None,
         "top_k": None, "seed": None, "stop": None, "max_new_tokens": None},
        {"request_id": "r2", "adapter_id": "math-v1.2_x", "prompt": None, "prompt_token_ids": [4, 5],
         "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 11, "stop": ["w9"], "max_new_tokens": 3},
    ])
    assert parsed.rejected == [] and parsed.duplicates == []
    r1, r2 = parsed.requests
    assert (r1.request_id, r1.adapter_id, r1.prompt, r1.prompt_token_ids) == ("r1", None, "w1 w2", None)
    s = r1.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (7, 0.0, 1.0, 0, None, [])
    assert s.greedy
    assert (r2.adapter_id, r2.prompt_token_ids) == ("math-v1.2_x", [4, 5])
    s = r2.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (3, 0.7, 0.9, 5, 11, ["w9"])


BAD_ROWS = [  # (row fields, a word the error must contain)
    ({"adapter_id": "../x"}, "adapter_id"),
    ({"adapter_id": "/etc"}, "adapter_id"),
    ({"adapter_id": "a/b"}, "adapter_id"),
    ({"adapter_id": ""}, "adapter_id"),
    ({"adapter_id": "a" * 129}, "adapter_id"),
    ({"adapter_id": ".hidden"}, "adapter_id"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": [3, -1]}, "prompt_token_ids"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["ok", None]}, "stop"),
    ({"stop": [""]}, "stop"),
]


@pytest.mark.parametrize("fields, word", BAD_ROWS, ids=[f"{k}={v!r}"[:40] for (f, _) in BAD_ROWS for k, v in f.items()])
def test_bad_row_fails_alone(fields, word):
    bad = {"request_id": "bad", "adapter_id": None, "prompt": "w1", **fields}
    parsed = parse([{"request_id": "before", "prompt": "w1"}, bad, {"request_id": "after", "prompt": "w2"}])
    assert [r.request_id for r in parsed.requests] == ["before", "after"]
    (error_row,) = parsed.rejected
    assert error_row.request_id == "bad" and error_row.finish_reason == "error"
    assert error_row.output_text is None and error_row.output_token_ids == []
    assert word in error_row.error and ("must" in error_row.error or "give" in error_row.error)


def test_stop_that_is_not_strings_fails_the_row():
    table = pa.table({"request_id": ["ok", "bad"], "prompt": ["w1", "w2"], "stop": pa.array([[], [1, 2]])})
    parsed = parse_requests(table, 4)
    assert [r.request_id for r in parsed.requests] == ["ok"]
    assert "stop" in parsed.rejected[0].error


def test_every_problem_of_a_row_is_reported():
    parsed = parse([{"request_id": "r", "adapter_id": "../x", "prompt": "", "top_p": 2.0}])
    error = parsed.rejected[0].error
    assert "adapter_id" in error and "prompt" in error and "top_p" in error


def test_missing_request_id_is_an_error_row_without_id():
    parsed = parse([{"request_id": "r1", "prompt": "w1"}, {"request_id": None, "prompt": "w2"},
                    {"request_id": "", "prompt": "w3"}])
    assert [r.request_id for r in parsed.requests] == ["r1"]
    assert [o.request_id for o in parsed.rejected] == [None, None]
    assert "row 2" in parsed.rejected[0].error and "row 3" in parsed.rejected[1].error
    assert "request_id" in parsed.rejected[0].error


def test_duplicates_keep_the_first_row():
    parsed = parse([{"request_id": "r1", "prompt": "first", "task": "a"},
                    {"request_id": "r2", "prompt": "", "task": "b"},
                    {"request_id": "r1", "prompt": "second", "task": "c"},
                    {"request_id": "r2", "prompt": "valid now", "task": "d"},
                    {"request_id": "r1", "prompt": "third", "task": "e"}])
    assert [(r.request_id, r.prompt) for r in parsed.requests] == [("r1", "first")]
    assert [o.request_id for o in parsed.rejected] == ["r2"]          # the first r2 was bad: it stays the result
    assert parsed.duplicates == ["r1", "r2", "r1"]
    assert parsed.pass_through.rows(["r1", "r2"]).to_pylist() == [{"task": "a"}, {"task": "b"}]


def test_extra_columns_pass_through_for_valid_and_rejected_rows():
    table = pa.table({"request_id": ["ok", "bad"], "prompt": ["w1", None],
                      "reference": ["w5", "w6"], "weight": pa.array([1, 2], pa.int16())})
    parsed = parse_requests(table, 4)
    assert parsed.pass_through.rows(["bad", "ok", None]).to_pylist() == [
        {"reference": "w6", "weight": 2}, {"reference": "w5", "weight": 1}, {"reference": None, "weight": None}]
    assert parsed.pass_through.table.schema == pa.schema([("reference", pa.string()), ("weight", pa.int16())])


def test_an_all_null_extra_column_passes_through_as_strings():
    # typed `null`, one night's column would not read together with another night's strings
    parsed = parse_requests(pa.table({"request_id": ["r"], "prompt": ["w1"], "reference": pa.nulls(1)}), 4)
    assert parsed.pass_through.table.schema == pa.schema([("reference", pa.string())])
