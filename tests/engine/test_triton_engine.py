"""The engine on its Triton kernels (CPU, TRITON_INTERPRET=1) gives the tokens of the torch references.

A subprocess, because the interpreter must be switched on before triton is first imported."""
import json
import subprocess
import sys
import textwrap


def test_triton_kernels_in_the_engine_match_the_reference_path(tmp_path):
    script = textwrap.dedent(f"""
        import json, os
        os.environ["TRITON_INTERPRET"] = "1"
        from engine.config import EngineConfig
        from engine.engine import Engine
        from tests.checkpoints import build_checkpoint, write_peft_adapter
        from tests.oracle import mixed_requests
        root = {str(tmp_path)!r}
        build_checkpoint(root + "/m", "qwen2", layers=1)
        write_peft_adapter(root + "/a/x", 64, 128, 1, 32, rank=4, targets=["q_proj", "v_proj", "down_proj"],
                           alpha=8, seed=1)
        write_peft_adapter(root + "/a/y", 64, 128, 1, 32, rank=16,
                           targets=["o_proj", "gate_proj", "up_proj", "k_proj"], alpha=8, seed=2)
        requests = mixed_requests(["x", "y"], 6, 4)
        outputs = {{}}
        for kernels in ("torch", "triton"):
            engine = Engine(EngineConfig(model=root + "/m", adapters=root + "/a", kernels=kernels,
                                         cpu_pool_bytes=4 << 20))
            outputs[kernels] = {{o.request_id: o.output_token_ids for o in engine.generate(requests)}}
        print(json.dumps(outputs))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(outputs["torch"]) == 6 and all(len(t) == 4 for t in outputs["torch"].values())
    assert outputs["triton"] == outputs["torch"]
