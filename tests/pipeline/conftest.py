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
