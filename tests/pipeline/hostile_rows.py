"""A request table of hostile values beside good rows (issue 14): strings that are not UTF-8 at any depth and
integers beyond int64, written as a binary-typed writer leaves them in a Parquet file."""
import pyarrow as pa
import pyarrow.parquet as pq

BAD = [b"\xed\xa0\x80", b"\xff", b"ok\xc3", b"\x80abc", b"w1 \xf0\x28\x8c\x28"]   # a lone surrogate, stray bytes...
U64_MAX, I64_MAX = 2**64 - 1, 2**63 - 1


def text(values: list, type_=pa.string()) -> pa.Array:
    """Bytes as a string array without validation, as a binary-typed writer leaves them in a Parquet file."""
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}[type_]
    return pa.array(values, binary).view(type_)


# request_id -> (its fields, the column its error must name); rows of two files beside good rows
HOSTILE = {
    "utf8-prompt": ({"prompt": b"w1 " + BAD[0]}, "prompt"),
    "utf8-prompt-2": ({"prompt": BAD[1] * 3}, "prompt"),
    "utf8-adapter": ({"adapter_id": b"a1" + BAD[2]}, "adapter_id"),
    "utf8-stop": ({"stop": [b"w9", BAD[3]]}, "stop"),
    "utf8-note": ({"note": b"note " + BAD[4]}, "note"),
    "utf8-meta": ({"meta": {"tags": [b"t1", BAD[0]]}}, "meta"),
    "utf8-messages": ({"prompt": None, "messages": [{"role": b"user", "content": b"hi " + BAD[1]}]}, "messages"),
    "u64-ids": ({"prompt_token_ids": [5, U64_MAX]}, "prompt_token_ids"),
    "u64-max-new-tokens": ({"max_new_tokens": U64_MAX}, "max_new_tokens"),
    "u64-top-k": ({"top_k": I64_MAX + 1}, "top_k"),
    "u64-seed": ({"seed": U64_MAX}, "seed"),
}
TYPES = {"request_id": pa.binary(), "adapter_id": pa.binary(), "prompt": pa.binary(), "stop": pa.list_(pa.binary()),
         "note": pa.binary(), "meta": pa.struct({"tags": pa.list_(pa.binary())}),
         "prompt_token_ids": pa.list_(pa.uint64()), "max_new_tokens": pa.uint64(), "top_k": pa.uint64(),
         "seed": pa.uint64(), "messages": pa.list_(pa.struct({"role": pa.binary(), "content": pa.binary()}))}


def hostile_rows() -> list[dict]:
    rows = []
    for i, (request_id, (fields, _)) in enumerate(HOSTILE.items()):
        rows.append({"request_id": f"good-{i}".encode(), "adapter_id": [b"a1", b"a2", None][i % 3], "prompt": b"w1 w2",
                     "note": b"n", "seed": i, "meta": {"tags": [b"t"]}})
        rows.append({"request_id": request_id.encode(), "prompt": b"w3", "note": b"n", "meta": {"tags": [b"h"]},
                     **fields})
    rows.append({"request_id": b"id-" + BAD[0], "prompt": b"w4", "note": b"n"})
    return rows


def write_bytes_table(path, rows: list[dict]) -> None:
    """Rows of bytes written as string columns without validation (uint64 integers as they are)."""
    columns = {}
    for name, type_ in TYPES.items():
        array = pa.array([row.get(name) for row in rows], type_)
        columns[name] = array.view(_as_text(type_))
    pq.write_table(pa.table(columns), path)


def _as_text(type_: pa.DataType) -> pa.DataType:
    if type_ == pa.binary():
        return pa.string()
    if pa.types.is_list(type_):
        return pa.list_(_as_text(type_.value_type))
    if pa.types.is_struct(type_):
        return pa.struct([f.with_type(_as_text(f.type)) for f in type_])
    return type_
