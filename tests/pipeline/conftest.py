"""Fixtures of the pipeline tests: an S3-compatible server (moto's server mode) on 127.0.0.1 with a fresh
bucket per test, a tiny checkpoint with adapters, and the CLI as a subprocess."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A new bucket; returns (bucket name, storage_options that reach it). Credentials are fake, in the env."""
    import boto3
    import s3fs
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember env and endpoints of earlier tests
    bucket = f"lorafleet-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    yield bucket, {"client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def tiny_fleet(tmp_path_factory):
    """A tiny random Llama checkpoint and two LoRA adapters of different ranks and targets."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # tests/checkpoints.py
    from checkpoints import build_adapter, build_checkpoint
    root = tmp_path_factory.mktemp("fleet")
    model = build_checkpoint(root / "model", "llama")
    build_adapter(root / "adapters" / "a1", model, rank=4, targets=("q_proj", "v_proj"), seed=1)
    build_adapter(root / "adapters" / "a2", model, rank=2, seed=2,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return {"model": root / "model", "adapters": root / "adapters"}


@pytest.fixture
def lorafleet():
    """Starts `lorafleet ARGS` as a subprocess (the console script's module, so no install is needed)."""
    def start(*args, env: dict | None = None) -> subprocess.Popen:
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return start


ADAPTER_TEMPLATE = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('this adapter takes no tool "
                    "messages') }}{% endif %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>"
                    "{% endfor %}<|start_header_id|>assistant<|end_header_id|>")


@pytest.fixture(scope="session")
def chat_fleet(tmp_path_factory):
    """Tiny Llama checkpoints whose tokenizers carry a real chat template (Llama-3 style and ChatML), and, on
    the Llama-3 one, an adapter that ships its own template ("own-template") and one that does not ("plain")."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # tests/checkpoints.py
    from checkpoints import CHAT_VOCAB, build_chat_tokenizer, build_checkpoint, write_peft_adapter
    root = tmp_path_factory.mktemp("chat-fleet")
    models = {}
    for style in ("llama3", "chatml"):
        models[style] = build_checkpoint(root / style, "llama", vocab_size=CHAT_VOCAB, layers=1)
        build_chat_tokenizer(models[style], style)
    for adapter_id in ("own-template", "plain"):
        write_peft_adapter(root / "adapters" / adapter_id, hidden=64, intermediate=128, layers=1, kv_dim=32, rank=2,
                           targets=["q_proj", "v_proj"], alpha=4, seed=3)
    (root / "adapters" / "own-template" / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    return {**models, "adapters": root / "adapters"}
