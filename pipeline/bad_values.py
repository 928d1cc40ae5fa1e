"""Values a Parquet file can hold that no request may use, found with Arrow so that each fails its own row.

Parquet readers do not validate string data: a file written with a binary-typed writer can hold bytes that are
not UTF-8 in a string column (anywhere: a prompt, an id, a field of a struct), and Python cannot take such a
value. An unsigned 64-bit column can hold integers beyond the int64 the request columns are read as. Both are
found per row here, with Arrow, and the rows get a problem instead of the table being refused."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INT64_MAX = 2**63 - 1
PREVIEW_BYTES = 40   # of a bad value, in an error message


def invalid_rows(column: pa.ChunkedArray) -> dict[int, str]:
    """row -> why, for the rows of column whose value fails Arrow's full validation (invalid UTF-8 at any depth)."""
    found, offset = {}, 0
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):   # rows of a dictionary share its values: check the ones they use
            chunk = chunk.dictionary_decode()
        for row in _invalid_rows(chunk):
            found[offset + row] = _why_invalid(chunk, row)
        offset += len(chunk)
    return found


def _invalid_rows(array: pa.Array) -> list[int]:
    """Bisection: whole halves that validate are skipped, so a few bad rows cost a few validations each."""
    try:
        array.validate(full=True)
        return []
    except pa.ArrowInvalid:
        if len(array) == 1:
            return [0]
    half = len(array) // 2
    # take copies the rows, children included: a slice would share the whole child arrays and fail on all
    first, second = (array.take(pa.array(np.arange(a, b))) for a, b in ((0, half), (half, len(array))))
    return _invalid_rows(first) + [half + row for row in _invalid_rows(second)]


def _why_invalid(array: pa.Array, row: int) -> str:
    value = array.take(pa.array([row]))
    try:
        value.validate(full=True)
    except pa.ArrowInvalid as e:
        if "utf8" not in str(e).lower():
            return f"holds an invalid value ({str(e).splitlines()[0]})"
    as_bytes = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(value.type)
    if as_bytes is None:
        return "holds invalid UTF-8 (bytes that are not text): write it as UTF-8 text"
    raw = value.view(as_bytes)[0].as_py()
    shown = repr(raw[:PREVIEW_BYTES]) + ("..." if len(raw) > PREVIEW_BYTES else "")
    return f"holds invalid UTF-8 ({shown}): write it as UTF-8 text"


def int64_overflow_rows(column: pa.ChunkedArray) -> dict[int, str]:
    """row -> why, for the rows of an unsigned 64-bit column (or list of them) with a value beyond int64."""
    value_type = column.type.value_type if hasattr(column.type, "value_type") else column.type
    if value_type != pa.uint64():
        return {}
    found, offset = {}, 0
    for chunk in column.chunks:
        is_list = chunk.type != value_type
        values = chunk.flatten() if is_list else chunk
        rows = pc.list_parent_indices(chunk).to_numpy() if is_list else np.arange(len(chunk))
        too_big = pc.fill_null(pc.greater(values, pa.scalar(INT64_MAX, pa.uint64())), False)
        for index in np.flatnonzero(too_big.to_numpy(zero_copy_only=False)):
            row = offset + int(rows[index])
            value = values[int(index)].as_py()
            found.setdefault(row, f"holds {value}, beyond a signed 64-bit integer (at most {INT64_MAX})")
        offset += len(chunk)
    return found


def null_rows(column: pa.ChunkedArray, rows) -> pa.ChunkedArray:
    """column with the values of `rows` replaced by null (any type: a null index takes a null)."""
    keep = np.ones(len(column), dtype=bool)
    keep[list(rows)] = False
    return column.take(pa.array(np.arange(len(column)), mask=~keep))
