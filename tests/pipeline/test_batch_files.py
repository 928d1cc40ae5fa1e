"""OpenAI Batch API files: .jsonl request lines mapped to request columns, bad lines failing alone with their
line number, files that are not JSON Lines refused, and `lorafleet export --format openai-batch`."""
import io
import json
import re
import uuid
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.cli import main
from pipeline.formats.batch_export import ExportError, export_openai_batch
from pipeline.requests import parse_requests, read_request_table
from pipeline.schema import RESULT_SCHEMA, TableError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GREETING = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def line(custom_id, url=CHAT, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write(url: str, lines: list) -> str:
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def memory_url(name: str = "requests.jsonl") -> str:
    return f"memory://batch-{uuid.uuid4().hex[:8]}/{name}"


def test_lines_map_to_request_columns():
    url = write(memory_url(), [
        line("chat", model="r8-qv", messages=GREETING, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3,
             stop="END", logprobs=True, top_logprobs=2, user="bob", metadata={"k": "é"}),
        line("parts", model="tiny-base", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}]),
        line("text", COMPLETIONS, model=None, prompt="w1 w2", max_tokens=4, logprobs=1, stop=["a", "b"], n=1,
             stream=False, top_k=5),
        line("ids", COMPLETIONS, prompt=[[5, 6, 7]], max_tokens=2),
        b"",                                                # blank lines are not requests
    ])
    rows = {r["request_id"]: r for r in read_request_table(url, base_model_name="tiny-base").to_pylist()}
    assert rows["chat"] == {**rows["chat"], "adapter_id": "r8-qv", "messages": GREETING, "max_new_tokens": 7,
                                 "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["END"], "logprobs": 2,
                                 "prompt": None, "input_error": None, "openai_url": CHAT, "openai_model": "r8-qv"}
    assert json.loads(rows["chat"]["openai_extra_body"]) == {"user": "bob", "metadata": {"k": "é"}}
    assert rows["parts"]["adapter_id"] is None and rows["parts"]["messages"] == [{"role": "user", "content": "a\nb"}]
    assert (rows["text"]["prompt"], rows["text"]["max_new_tokens"], rows["text"]["logprobs"], rows["text"]["stop"],
            rows["text"]["top_k"], rows["text"]["openai_extra_body"]) == ("w1 w2", 4, 1, ["a", "b"], 5, None)
    assert rows["ids"]["prompt_token_ids"] == [5, 6, 7] and rows["ids"]["prompt"] is None
    parsed = parse_requests(read_request_table(url, base_model_name="tiny-base"), default_max_new_tokens=16)
    assert not parsed.rejected and sorted(parsed.messages) == ["chat", "parts"]
    assert parsed.pass_through.rows(["text"])["openai_url"].to_pylist() == [COMPLETIONS]


@pytest.mark.parametrize("bad, error", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[1, 2]", "a JSON list, not an object"),
    ({"url": CHAT, "body": {"messages": GREETING}}, "no custom_id: give every line a unique"),
    ({**line("x"), "custom_id": 5}, "no custom_id"),
    ({**line("x"), "body": "hello"}, "body is not a JSON object"),
    ({**line("x", messages=GREETING), "method": "GET"}, "method 'GET' is not supported"),
    (line("x", "/v1/embeddings", input="hi"), "url '/v1/embeddings' is not supported"),
    (line("x", messages=GREETING, n=2), "body.n = 2 is not supported: remove it"),
    (line("x", messages=GREETING, tools=[{"type": "function"}]), "body.tools = .* is not supported"),
    (line("x", messages=GREETING, response_format={"type": "json_object"}), "body.response_format"),
    (line("x", messages=GREETING, stream=True), "body.stream = true is not supported"),
    (line("x", messages=GREETING, presence_penalty=0.5), "body.presence_penalty"),
    (line("x", messages=GREETING, temperature="hot"), 'body.temperature = "hot" is not a number'),
    (line("x", messages=GREETING, max_tokens=1.5), "body.max_tokens = 1.5 is not an integer"),
    (line("x", messages=GREETING, max_tokens=True), "body.max_tokens = true is not an integer"),
    (line("x", messages=GREETING, seed=2 ** 70), "body.seed = .* is out of range"),
    (line("x", messages=GREETING, max_tokens=3, max_completion_tokens=4), "disagree: give one"),
    (line("x", messages=GREETING, stop=5), "body.stop = 5 is not a string or a list of strings"),
    (line("x", messages=GREETING, top_logprobs=3), "body.top_logprobs needs body.logprobs = true"),
    (line("x", COMPLETIONS, prompt=["a", "b"]), "one string or one list of token ids: give each prompt its own line"),
    (line("x", prompt="hi"), "a /v1/chat/completions body has messages"),
    (line("x", COMPLETIONS, messages=GREETING), "a /v1/completions body has a prompt"),
    (line("x", messages=[{"role": "user", "content": "x", "name": "bob"}]), "give objects with role and content"),
    (line("x", messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text content parts"),
    (line("x", model="org/model", messages=GREETING), "neither an adapter name nor the base model's name"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
])
def test_a_bad_line_fails_alone_naming_its_line(bad, error):
    url = write(memory_url(), [line("good", messages=GREETING), bad, line("after", COMPLETIONS, prompt="w1")])
    parsed = parse_requests(read_request_table(url), default_max_new_tokens=16)
    assert [r.request_id for r in parsed.requests] == ["good", "after"]
    [failed] = parsed.rejected
    custom_id = bad.get("custom_id") if isinstance(bad, dict) else None
    assert failed.finish_reason == "error" and failed.request_id == (custom_id if isinstance(custom_id, str) else None)
    assert re.match(r"line 2 of memory://.*/requests.jsonl: ", failed.error)
    assert re.search(error, failed.error), failed.error


def test_values_out_of_range_fail_with_the_checks_every_request_table_gets():
    url = write(memory_url(), [line("cold", messages=GREETING, temperature=-1), line("same", messages=GREETING),
                               line("same", messages=GREETING), line("zero", COMPLETIONS, prompt="w", max_tokens=0)])
    parsed = parse_requests(read_request_table(url), default_max_new_tokens=16)
    assert {o.request_id: o.error for o in parsed.rejected} == {
        "cold": "temperature = -1.0 is invalid: it must be a number >= 0 (0 or null = greedy)",
        "zero": "max_new_tokens = 0 is invalid: it must be an integer >= 1 (null = the run's default)"}
    assert parsed.duplicates == ["same"]


def parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["w1"]}), sink)
    return sink.getvalue()


@pytest.mark.parametrize("content", [parquet_bytes(), json.dumps([line("a", messages=GREETING)], indent=2).encode(),
                                     b"request_id,prompt\na,w1\n"])
def test_a_file_that_is_not_json_lines_is_refused_before_any_work(tmp_path, capsys, content):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    with pytest.raises(TableError, match=r"requests.jsonl: not a JSON Lines file \(no line is a JSON object\)"):
        read_request_table(str(path))
    code = main(["run", "--model", str(tmp_path / "no-model"), "--requests", str(path), "--output",
                 str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "requests.jsonl: not a JSON Lines file" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_reads_jsonl_beside_parquet(tmp_path):
    pq.write_table(pa.table({"request_id": ["p"], "prompt": ["w1 w2"], "task": ["copy"]}), tmp_path / "a.parquet")
    write(str(tmp_path / "b.jsonl"), [line("j", messages=GREETING)])
    write(str(tmp_path / "_partial.jsonl"), [b"{broken"])
    table = read_request_table(str(tmp_path))
    assert table.column("request_id").to_pylist() == ["p", "j"]
    assert table.column("task").to_pylist() == ["copy", None]
    assert table.column("openai_url").to_pylist() == [None, CHAT]


def result_rows(base_model: str) -> list[dict]:
    def top(*alternatives):
        return [{"token_id": i, "token": t, "logprob": lp} for i, t, lp in alternatives]
    common = {"prompt_tokens": 5, "output_tokens": 2, "base_model": base_model, "run_id": "run-1",
              "completed_at": datetime(2026, 1, 2, tzinfo=timezone.utc),
              "output_token_ids": [40, 300]}
    return [
        {**common, "request_id": "chat", "adapter_id": "r8-qv", "output_text": "Hi!", "finish_reason": "stop",
         "openai_url": CHAT, "openai_model": "r8-qv", "token_logprobs": [-0.25, -1.5],
         "top_logprobs": [top((40, "I", -0.25), (41, "J", -2.0)), top((7, "x", -0.5))]},
        {**common, "request_id": "text", "adapter_id": None, "output_text": "ab", "finish_reason": "length",
         "openai_url": COMPLETIONS, "openai_model": "tiny-base", "token_logprobs": [-0.5, -0.75],
         "top_logprobs": [top((40, "I", -0.5)), top((300, "b", -0.75))]},
        {**common, "request_id": "parquet", "adapter_id": None, "output_text": "c", "finish_reason": "stop"},
        {**common, "request_id": "bad", "adapter_id": None, "output_text": None, "output_token_ids": [],
         "finish_reason": "error", "error": "line 3 of x.jsonl: body.n = 2 is not supported: remove it",
         "openai_url": CHAT, "output_tokens": 0},
    ]


def write_results(folder, rows: list[dict]) -> None:
    schema = pa.schema(list(RESULT_SCHEMA) + [("openai_url", pa.string()), ("openai_model", pa.string())])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-000000.parquet")


def check_documented_shape(out: dict) -> None:
    """The Batch API output line as documented; the `openai` package's own types where it is installed."""
    assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
    response = out["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    body = response["body"]
    if response["status_code"] != 200:
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
        return
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(body)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    try:
        from openai.types import Completion
        from openai.types.chat import ChatCompletion
    except ImportError:
        return
    (ChatCompletion if body["object"] == "chat.completion" else Completion).model_validate(body)


def test_export_writes_the_batch_output_shape(chat_fleet, tmp_path, capsys):
    model = chat_fleet["llama3"]
    write_results(tmp_path / "results", result_rows(str(model)))
    out = tmp_path / "out.jsonl"
    assert main(["export", str(tmp_path / "results"), "--format", "openai-batch", "--output", str(out)]) == 0
    assert "wrote 4 lines" in capsys.readouterr().out
    lines = {o["custom_id"]: o for o in map(json.loads, out.read_text().splitlines())}
    for o in lines.values():
        check_documented_shape(o)
    chat = lines["chat"]["response"]["body"]
    assert (chat["object"], chat["model"], chat["created"]) == ("chat.completion", "r8-qv", 1767312000)
    [choice] = chat["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi!", "refusal": None}
    assert choice["finish_reason"] == "stop"
    spelled = AutoTokenizer.from_pretrained(str(model)).decode([300])       # not among its alternatives
    assert [(c["token"], c["logprob"]) for c in choice["logprobs"]["content"]] == [("I", -0.25), (spelled, -1.5)]
    assert choice["logprobs"]["content"][1]["bytes"] == list(spelled.encode())
    assert choice["logprobs"]["content"][0]["top_logprobs"] == [{"token": "I", "logprob": -0.25, "bytes": [73]},
                                                                {"token": "J", "logprob": -2.0, "bytes": [74]}]
    text = lines["text"]["response"]["body"]
    assert (text["object"], text["choices"][0]["text"], text["model"]) == ("text_completion", "ab", "tiny-base")
    assert text["choices"][0]["logprobs"] == {"tokens": ["I", "b"], "token_logprobs": [-0.5, -0.75],
                                              "top_logprobs": [{"I": -0.5}, {"b": -0.75}], "text_offset": [0, 1]}
    parquet = lines["parquet"]["response"]["body"]
    assert parquet["object"] == "text_completion" and parquet["choices"][0]["logprobs"] is None
    assert parquet["model"] == str(model)
    bad = lines["bad"]["response"]
    assert bad["status_code"] == 400 and "body.n = 2 is not supported" in bad["body"]["error"]["message"]
    first = out.read_bytes()
    export_openai_batch(str(tmp_path / "results"), str(out))
    assert out.read_bytes() == first                                           # ids derive from run and request


def test_export_of_a_folder_without_results_exits_2(tmp_path, capsys):
    with pytest.raises(ExportError, match="no result shards"):
        export_openai_batch(str(tmp_path), str(tmp_path / "out.jsonl"))
    assert main(["export", str(tmp_path), "--format", "openai-batch", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_batch_file_runs_through_the_cli_and_exports(chat_fleet, tmp_path, capsys):
    model, adapters = chat_fleet["llama3"], chat_fleet["adapters"]
    requests = write(str(tmp_path / "batch.jsonl"), [
        line("base-chat", model="tiny-llama3", messages=GREETING, max_tokens=2),
        line("adapter-chat", model="own-template", messages=GREETING, max_completion_tokens=2, temperature=0.8,
             seed=1),
        line("text", COMPLETIONS, prompt="The quick", max_tokens=2),
        line("refused", messages=GREETING, n=3)])
    out = tmp_path / "results"
    args = ["--model", str(model), "--adapters", str(adapters), "--requests", requests, "--base-model-name",
            "tiny-llama3"]
    assert main(["run", *args, "--output", str(out), "--no-progress"]) == 1          # one row failed
    assert main(["export", str(out), "--format", "openai-batch", "--output", str(tmp_path / "out.jsonl")]) == 0
    lines = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    hf = AutoTokenizer.from_pretrained(str(model))
    base = lines["base-chat"]["response"]["body"]
    assert base["object"] == "chat.completion" and base["model"] == "tiny-llama3"
    assert base["usage"]["prompt_tokens"] == len(hf.apply_chat_template(GREETING, add_generation_prompt=True)[
        "input_ids"])
    own = lines["adapter-chat"]["response"]["body"]
    assert own["model"] == "own-template" and own["usage"]["prompt_tokens"] == len(hf.apply_chat_template(
        GREETING, chat_template=(adapters / "own-template" / "chat_template.jinja").read_text(),
        add_generation_prompt=True)["input_ids"])
    assert lines["text"]["response"]["body"]["object"] == "text_completion"
    assert lines["refused"]["response"]["status_code"] == 400
    assert "line 4 of" in lines["refused"]["response"]["body"]["error"]["message"]
    capsys.readouterr()
    assert main(["plan", *args, "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["waves"][0]["request_ids"]) == [
        "adapter-chat", "base-chat", "text"]
