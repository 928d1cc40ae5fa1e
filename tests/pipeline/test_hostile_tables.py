"""Hostile request tables, round 2 (issue 14), below the CLI: values Python cannot take (invalid UTF-8 at any
depth, integers beyond int64) fail their own rows, found with Arrow; pass-through columns of any Arrow type
round-trip as they are; names that readers would confuse with result or partition columns are refused;
repeated ids are summarised, not listed."""
import datetime
import decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.request import RequestOutput
from hostile_rows import BAD, HOSTILE, I64_MAX, U64_MAX, hostile_rows, text, write_bytes_table
from pipeline.bad_values import int64_overflow_rows, invalid_rows, null_rows
from pipeline.requests import duplicates_summary, parse_requests, read_request_table
from pipeline.results import ResultStore, ShardWriter
from pipeline.schema import TableError

# type name -> (an array of 5 rows, rows 1 and 3 invalid)
def nested_cases() -> dict[str, pa.Array]:
    flat = text([b"a", BAD[0], b"c", b"d" + BAD[1], b"e"])
    offsets = pa.array([0, 1, 2, 3, 4, 5], pa.int32())
    return {
        "string": flat,
        "large_string": text([b"a", BAD[2], b"c", BAD[3], None], pa.large_string()),
        "list<string>": pa.ListArray.from_arrays(offsets, flat),
        "large_list<string>": pa.LargeListArray.from_arrays(pa.array([0, 1, 2, 3, 4, 5], pa.int64()), flat),
        "struct<string>": pa.StructArray.from_arrays([flat, pa.array(range(5))], names=["name", "n"]),
        "map<string,int>": pa.MapArray.from_arrays(offsets, flat, pa.array(range(5))),
        "dictionary<string>": pa.DictionaryArray.from_arrays(pa.array([0, 1, 0, 2, 0]), text([b"a", BAD[4], BAD[0]])),
        "list<struct<list<string>>>": pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(offsets, flat)], names=["words"])),
    }


@pytest.mark.parametrize("name", list(nested_cases()))
def test_invalid_utf8_is_found_per_row_at_any_depth(name):
    array = nested_cases()[name]
    column = pa.chunked_array([array, array.slice(1, 3)])      # a second, sliced chunk: rows 5..7
    bad = invalid_rows(column)
    assert sorted(bad) == [1, 3, 5, 7], bad
    assert all("invalid UTF-8" in why for why in bad.values())
    if pa.types.is_dictionary(column.type):      # the reader decodes dictionaries first: rows share their values
        column = column.cast(column.type.value_type)
    cleaned = null_rows(column, bad)
    cleaned.validate(full=True)
    assert cleaned.type == column.type and cleaned.null_count == column.null_count + 4
    assert cleaned[0] == column[0] and cleaned[6] == column[6]   # the good rows are untouched


def test_a_bad_string_is_shown_cut_short_and_valid_columns_cost_one_validation():
    bad = invalid_rows(pa.chunked_array([text([b"x" * 100 + BAD[0]])]))
    assert bad == {0: "holds invalid UTF-8 (b'" + "x" * 40 + "'...): write it as UTF-8 text"}
    assert invalid_rows(pa.chunked_array([pa.array(["a", None, "ü"])])) == {}


@pytest.mark.parametrize("array, rows", [
    (pa.array([1, U64_MAX, None, I64_MAX, I64_MAX + 1], pa.uint64()), [1, 4]),
    (pa.array([[1], [2, U64_MAX], None, [I64_MAX + 1, 3]], pa.list_(pa.uint64())), [1, 3]),
    (pa.array([[1, 2], [U64_MAX, 2], None, [5, 6]], pa.list_(pa.uint64(), 2)), [1]),
    (pa.array([[1], [2], [U64_MAX]], pa.large_list(pa.uint64())).slice(1), [1]),
    (pa.array([float(U64_MAX)], pa.float64()), []),               # only unsigned 64-bit integers can overflow int64
    (pa.array([[I64_MAX]], pa.list_(pa.int64())), []),
])
def test_integers_beyond_int64_are_found_per_row(array, rows):
    found = int64_overflow_rows(pa.chunked_array([array]))
    assert sorted(found) == rows and all("beyond a signed 64-bit integer" in why for why in found.values())


def test_hostile_values_fail_only_their_rows_across_files(tmp_path):
    write_bytes_table(tmp_path / "a.parquet", hostile_rows())
    pq.write_table(pa.table({"request_id": ["plain"], "prompt": ["w5"], "note": ["n"]}), tmp_path / "b.parquet")
    table = read_request_table(str(tmp_path))
    table.validate(full=True)                               # every value Python can take now
    parsed = parse_requests(table, 4)
    assert sorted(r.request_id for r in parsed.requests) == sorted([f"good-{i}" for i in range(len(HOSTILE))]
                                                                   + ["plain"])
    errors = {o.request_id: o.error for o in parsed.rejected}
    assert set(errors) == set(HOSTILE) | {None}
    for number, (request_id, (_, column)) in enumerate(HOSTILE.items()):
        assert errors[request_id].startswith(f"row {2 * number + 2} of file://{tmp_path}/a.parquet: {column} holds ")
        assert errors[request_id].count(";") == 0             # the null left behind adds no second problem
    assert "request_id holds invalid UTF-8 (b'id-\\xed\\xa0\\x80')" in errors[None]
    assert errors["utf8-adapter"].endswith("write it as UTF-8 text")
    notes = parsed.pass_through.rows(["utf8-note", "utf8-meta", "good-0"]).to_pylist()
    assert [n["note"] for n in notes] == [None, "n", "n"]                 # only the bad value is nulled
    assert [n["meta"] for n in notes] == [{"tags": ["h"]}, None, {"tags": ["t"]}]
    assert "input_error" not in parsed.pass_through.table.column_names


def test_a_table_without_bad_values_gets_no_input_errors(tmp_path):
    pq.write_table(pa.table({"request_id": ["r"], "prompt": ["w1"], "n": pa.array([U64_MAX], pa.uint64())}),
                   tmp_path / "r.parquet")
    table = read_request_table(str(tmp_path / "r.parquet"))
    assert "input_error" not in table.column_names and table["n"].type == pa.uint64()   # pass-through: any uint64


def exotic_columns(n: int) -> dict[str, pa.Array]:
    """Pass-through columns that Python objects would change or could not hold."""
    return {
        "ts_ns": pa.array(np.arange(n) + 1_700_000_000_000_000_001, pa.timestamp("ns", "UTC")),
        "dur_ns": pa.array(np.arange(n) * 7 + 1, pa.duration("ns")),
        "time_ns": pa.array(np.arange(n) + 1, pa.time64("ns")),
        "dec128": pa.array([decimal.Decimal("12345678901234567890.123456789012345678")] * n, pa.decimal128(38, 18)),
        "dec256": pa.array([decimal.Decimal(10) ** 60 + i for i in range(n)], pa.decimal256(76, 0)),
        "nested": pa.array([{"a": i, "b": [{"c": str(i)}] * i} for i in range(n)],
                           pa.struct({"a": pa.int8(), "b": pa.list_(pa.struct({"c": pa.string()}))})),
        "large": pa.array([list(range(i)) for i in range(n)], pa.large_list(pa.int16())),
        "fixed": pa.array([[i, -i] for i in range(n)], pa.list_(pa.float32(), 2)),
        "mapping": pa.array([[("k", i)] for i in range(n)], pa.map_(pa.string(), pa.uint64())),
        "u64": pa.array([U64_MAX - i for i in range(n)], pa.uint64()),
        "half": pa.array(np.arange(n, dtype=np.float16), pa.float16()),
        "blob": pa.array([bytes([i, 255]) for i in range(n)], pa.binary(2)),
        "day": pa.array([datetime.date(2026, 1, 1 + i) for i in range(n)], pa.date32()),
        "empty": pa.nulls(n),
    }


def test_pass_through_columns_of_any_type_round_trip_through_the_shards(tmp_path):
    n = 6
    columns = exotic_columns(n)
    table = pa.table({"request_id": [f"r{i}" for i in range(n)], "prompt": ["w1"] * n, **columns})
    required = pa.schema([f.with_nullable(f.name == "empty") for f in table.schema])   # NOT NULL in the file
    pq.write_table(table.cast(required), tmp_path / "requests.parquet")
    parsed = parse_requests(read_request_table(str(tmp_path / "requests.parquet")), 4)
    store = ResultStore(str(tmp_path / "out"))
    with ShardWriter(store, "run1", "base", parsed.pass_through, rows_per_shard=4) as writer:
        for i in (5, 0, 3, 1, 4, 2):                                    # any order, two shards
            writer.add(RequestOutput(f"r{i}", None, "w2", [5], 1, 1, "length"))
        writer.add(RequestOutput(None, None, None, [], 0, 0, "error", "row 9 has no request_id"))
    shards = [pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))]
    assert len(shards) == 2 and shards[0].schema == shards[1].schema     # one schema for every shard of a run
    results = pa.concat_tables(shards)
    order = [int(r[1:]) if r else None for r in results["request_id"].to_pylist()]
    for name, array in columns.items():
        expected = array.cast(pa.string()) if name == "empty" else array   # all-null columns are typed string
        assert results.schema.field(name).type == expected.type, name
        taken = expected.take(pa.array(order, pa.int64()))               # the row without an id gets nulls
        assert results[name].combine_chunks().equals(taken), name


@pytest.mark.parametrize("column", ["Error", "ERROR", "output_TEXT", "Completed_At", "date", "Date",
                                    "DATE"])
def test_pass_through_names_that_collide_with_result_or_partition_columns_are_refused(tmp_path, column):
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"request_id": ["r"], "prompt": ["w1"], column: ["x"]}), path)
    with pytest.raises(TableError) as info:
        read_request_table(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"'{column}'" in message and "rename it" in message
    assert ("partition column 'date'" in message) == (column.lower() == "date")


@pytest.mark.parametrize("extra, twins", [(["task", "Task"], ("task", "Task")), (["PROMPT"], ("prompt", "PROMPT")),
                                          (["Request_ID"], ("request_id", "Request_ID"))])
def test_two_columns_with_one_name_ignoring_case_are_refused(tmp_path, extra, twins):
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"request_id": ["r"], "prompt": ["w1"], **{name: ["x"] for name in extra}}), path)
    with pytest.raises(TableError, match=f"columns '{twins[0]}' and '{twins[1]}' have one name"):
        read_request_table(str(path))


def test_repeated_ids_are_summarised_with_short_ids():
    long_id = "x" * 1_000_000
    summary = duplicates_summary([long_id] * 100 + [f"r{i}" for i in range(20)] * 3)
    assert summary["rows"] == 160 and summary["ids"] == 21 and len(summary["first"]) == 5
    assert summary["first"][0] == "x" * 64 + "... (1,000,000 characters)" and summary["first"][1:] == ["r0", "r1",
                                                                                                      "r2", "r3"]
    assert len(repr(summary)) < 500
    assert duplicates_summary([]) == {"rows": 0, "ids": 0, "first": []}
