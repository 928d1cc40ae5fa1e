"""The end-to-end benchmark runs on CPU with --tiny and reports every case with consistent counts.

No timing is asserted: the numbers come from a tiny model on a shared CPU.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ["lorafleet-base", "lorafleet-N1", "lorafleet-N12", "lorafleet-arrival-N12", "peft-mixed", "peft-single",
         "roofline"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, "-m", "bench.bench_e2e", "--tiny", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "bench_e2e.json").read_text()), run.stdout, out


def test_every_case_is_reported_in_json_table_and_chart(report):
    data, stdout, out = report
    cases = {c["case"]: c for c in data["cases"]}
    assert list(cases) == CASES
    for name in CASES:
        assert name in stdout
    assert (out / "bench_e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for c in data["cases"]:
        assert c["output_tokens_per_s"] > 0 and math.isfinite(c["output_tokens_per_s"]), c["case"]
        assert c["roofline_fraction"] > 0, c["case"]
    assert cases["lorafleet-base"]["vs_base"] == 1.0
    assert cases["peft-mixed"]["vs_peft_mixed"] == 1.0


def test_lorafleet_cases_generate_exactly_the_fixed_output_lengths(report):
    data, _, _ = report
    meta = data["meta"]
    for c in data["cases"]:
        if not c["case"].startswith("lorafleet"):
            continue
        assert (c["requests"], c["requests_done"], c["requests_failed"]) == (meta["requests_per_case"],) * 2 + (0,)
        assert c["output_tokens"] == meta["output_tokens_per_case"], c["case"]   # no EOS cuts a request short
        assert c["prompt_tokens"] >= meta["prompt_tokens_per_case"], c["case"]  # more only if preempted


def test_adapter_counts(report):
    data, _, _ = report
    cases = {c["case"]: c for c in data["cases"]}
    max_active = data["meta"]["engine"]["max_active_adapters"]
    base, planned, arrival = cases["lorafleet-base"], cases["lorafleet-N12"], cases["lorafleet-arrival-N12"]
    assert (base["adapter_loads"], base["mean_adapters_per_decode_step"]) == (0, 0)
    assert cases["lorafleet-N1"]["adapter_loads"] == 1
    # The planner's order loads each adapter once; arrival order can only need more loads.
    assert planned["adapter_loads"] == planned["distinct_adapters"] > 1
    assert arrival["adapter_loads"] >= planned["adapter_loads"]
    for c in (planned, arrival):
        assert 1 <= c["mean_adapters_per_decode_step"] <= max_active
        assert c["adapter_bytes_read"] > 0 and c["adapter_read_gb_per_s"] > 0 and c["adapter_load_wait_s"] >= 0
    peft = cases["peft-mixed"]
    assert peft["output_tokens"] == data["meta"]["peft_batch"] * data["meta"]["peft_new_tokens"]
    assert peft["adapter_loads"] == peft["n_adapters"] == peft["mean_adapters_per_decode_step"]


def test_publish_fills_the_readme_block_with_a_gpu_run(report, tmp_path):
    from bench.publish import END, FIGURE, START, publish
    data, _, out = report
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    with pytest.raises(SystemExit, match="only GPU runs"):
        publish(out, readme, tmp_path / FIGURE)
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    data["meta"].update(device="cuda", device_name="NVIDIA H100 80GB HBM3")
    (gpu / "bench_e2e.json").write_text(json.dumps(data))
    (gpu / "bench_e2e.png").write_bytes((out / "bench_e2e.png").read_bytes())
    publish(gpu, readme, tmp_path / FIGURE)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    block = text.split(START)[1].split(END)[0]
    assert "NVIDIA H100 80GB HBM3" in block and data["meta"]["date"] in block
    for name in CASES:
        assert f"| {name} |" in block
    assert "| load GB/s | load wait s |" in block
    assert block.count("not measured") == 5     # no N512, N8 or N2048 case (4 targets); batches stay below 64
    assert (tmp_path / FIGURE).read_bytes() == (out / "bench_e2e.png").read_bytes()
    publish(gpu, readme, tmp_path / FIGURE)      # publishing again replaces the block, nothing else
    assert readme.read_text() == text


def test_targets_are_judged_from_the_cases():
    from bench.publish import targets
    cases = {"lorafleet-base": dict(roofline_fraction_batch64=0.7),
             "lorafleet-N8": dict(n_adapters=8, output_tokens_per_s=1000.0, adapter_read_gb_per_s=3.0),
             "lorafleet-N512": dict(n_adapters=512, vs_base=0.93, vs_peft_mixed=85.0, output_tokens_per_s=950.0),
             "lorafleet-arrival-N512": dict(output_tokens_per_s=900.0),
             "lorafleet-N2048": dict(n_adapters=2048, output_tokens_per_s=880.0, adapter_read_gb_per_s=12.5,
                                     adapter_load_wait_s=3.0, wall_s=100.0),
             "lorafleet-arrival-N2048": dict(output_tokens_per_s=800.0)}
    assert [(value, met) for _, value, met in targets(cases)] == \
        [("93%", True), ("85x", False), ("1.43x the roofline", True), ("88%", False), ("1.06x at worst", True),
         ("12.5 GB/s", True), ("3.0%", False)]
