"""Runs that cannot go on (issue 14): a full or read-only output stops the run with exit 3; SIGTERM, SIGINT and
SIGHUP with 143, 130 and 129; an interrupt inside Dagster with its own exception. Each keeps the rows committed
(and commits those that finished), releases the lock, says one line, and a rerun finishes every request
exactly once. An output that cannot be written at all is refused with exit 2 before any work."""
import errno
import gc
import json
import os
import random
import signal
import subprocess
import threading
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine.engine
import pipeline.results
import pipeline.run
import pipeline.storage
from engine.config import EngineConfig
from pipeline.cli import main
from pipeline.run import run_requests
from pipeline.signals import RunInterrupted, StopSignals

N = 24
IDS = [f"req-{i:02d}" for i in range(N)]


@pytest.fixture
def requests_path(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.table({
        "request_id": IDS, "adapter_id": [[None, "a1", "a2"][i % 3] for i in range(N)],
        "prompt": [" ".join(f"w{rng.randrange(100)}" for _ in range(rng.randint(2, 12))) for _ in range(N)],
        "max_new_tokens": pa.array([2 + i % 7 for i in range(N)], pa.int32())}), path)
    return path


def run_args(tiny_fleet, requests_path, out) -> list[str]:
    return ["run", "--model", str(tiny_fleet["model"]), "--adapters", str(tiny_fleet["adapters"]), "--requests",
            str(requests_path), "--output", str(out), "--max-num-seqs", "2", "--rows-per-shard", "2", "--no-progress"]


def committed(out) -> list[str]:
    shards = list(out.glob("part-*.parquet"))
    return sorted(pl.read_parquet(shards)["request_id"]) if shards else []


def wait_for_first_shard(out, proc=None) -> None:
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")):
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.02)


def assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, before: list[str]) -> None:
    assert 0 < len(before) < N and len(set(before)) == len(before), "the stop must land mid-run"
    assert main(run_args(tiny_fleet, requests_path, out)) == 0
    assert committed(out) == IDS                                          # each request exactly once
    rerun = max(out.glob("_runs/*/summary.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(rerun.read_text())["rows_skipped"] == len(before)   # nothing committed was redone


def assert_lock_released(out) -> None:
    assert not list((out / "_runs").glob("LOCK*"))


# -- storage faults ----------------------------------------------------------------------------------------

def test_disk_full_mid_run_exits_3_and_a_rerun_finishes(tiny_fleet, requests_path, tmp_path, monkeypatch, capsys):
    out, real_publish, shards = tmp_path / "out", pipeline.results.publish, []

    def publish_until_full(fs, path, data, tmp_dir):
        if len(shards) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_publish(fs, path, data, tmp_dir)
        shards.append(path)
    monkeypatch.setattr(pipeline.results, "publish", publish_until_full)
    assert main(run_args(tiny_fleet, requests_path, out)) == 3
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lorafleet: error: cannot write {out}: No space left on device; the rows committed")
    assert len(committed(out)) == 4
    assert_lock_released(out)
    monkeypatch.undo()
    assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, committed(out))


def test_an_output_that_cannot_be_written_is_refused_with_exit_2_before_any_work(tiny_fleet, requests_path, tmp_path,
                                                                                   monkeypatch, capsys):
    def read_only(*args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(pipeline.storage, "publish", read_only)     # the probe's write, before the lock
    monkeypatch.setattr(pipeline.run, "load_engine", lambda config: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert main(run_args(tiny_fleet, requests_path, out)) == 2
    assert capsys.readouterr().err.strip() == f"lorafleet: error: cannot write {out}: Read-only file system"
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("LOCK*"))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 48 KiB filesystem: room for the lock and a few shards. Needs root (and a kernel that lets us mount)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def remount(mount, options: str) -> None:
    """Remount the tmpfs. A file open for writing makes a read-only remount fail (EBUSY): a failed run's file
    objects may wait for the collector in a long test session, and a running process writes shards now and
    then, so after a failure collect, and try again at once (a few ms a try) until one lands between writes."""
    for attempt in range(200):
        if subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], capture_output=True).returncode == 0:
            return
        if attempt == 0:
            gc.collect()
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_a_real_full_disk_and_a_read_only_one(tiny_fleet, requests_path, tiny_tmpfs, capsys, lorafleet):
    out = tiny_tmpfs / "out"
    args = run_args(tiny_fleet, requests_path, out)
    args[args.index("--rows-per-shard") + 1] = "1"                  # ~4 KB a shard: the disk fills mid-run
    assert main(args) == 3
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lorafleet: error: cannot write {out}: No space left on device")
    full = committed(out)
    assert_lock_released(out)

    remount(tiny_tmpfs, "ro")                                       # read-only at start: refused, nothing done
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"lorafleet: error: cannot write {out}: Read-only file system"

    remount(tiny_tmpfs, "rw,size=4m")                                # read-only mid-run: a real process, whose lock
    slow = args + ["--max-num-seqs", "1"]                            # the read-only disk keeps; the rerun takes it
    proc = lorafleet(*slow)                                          # over, as its holder is gone. One sequence at a
    wait_for_first_shard_after(out, full, proc)                      # time: the run outlasts the remount
    remount(tiny_tmpfs, "ro")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"lorafleet: error: cannot write {out}: Read-only file system")
    assert "Traceback" not in stderr
    remount(tiny_tmpfs, "rw")
    assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, committed(out))


def wait_for_first_shard_after(out, before: list[str], proc) -> None:
    deadline = time.monotonic() + 300
    while len(committed(out)) == len(before):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.02)


# -- stop signals ------------------------------------------------------------------------------------------

@pytest.mark.e2e   # a real process, signalled mid-run, then a rerun
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_commits_the_finished_rows_and_a_rerun_finishes(tiny_fleet, requests_path, tmp_path, lorafleet,
                                                                      signum):
    out = tmp_path / "out"
    proc = lorafleet(*run_args(tiny_fleet, requests_path, out))
    wait_for_first_shard(out, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines()[-1] == (f"lorafleet: stopped by {name}: the rows finished so far are "
                                               f"committed to {out}; run the same command again to finish the rest")
    assert "Traceback" not in stderr
    assert_lock_released(out)
    assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, committed(out))


def test_sighup_in_process_stops_the_run_and_restores_the_handlers(tiny_fleet, requests_path, tmp_path, capsys):
    out, before = tmp_path / "out", signal.getsignal(signal.SIGHUP)
    stopper = threading.Thread(target=lambda: (wait_for_first_shard(out), os.kill(os.getpid(), signal.SIGHUP)))
    stopper.start()
    assert main(run_args(tiny_fleet, requests_path, out)) == 129
    stopper.join()
    assert signal.getsignal(signal.SIGHUP) is before
    assert capsys.readouterr().err.strip().startswith("lorafleet: stopped by SIGHUP: the rows finished so far")
    assert_lock_released(out)
    assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, committed(out))


def test_an_interrupt_inside_dagster_still_commits_the_finished_rows_and_releases_the_lock(tiny_fleet, requests_path,
                                                                                            tmp_path, monkeypatch):
    """Dagster's run worker turns a termination into an exception raised in the step's code (no `stop` given)."""
    out, real_step, steps = tmp_path / "out", engine.engine.Engine.step, []

    def step(self):
        steps.append(1)
        if len(steps) == 12:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(engine.engine.Engine, "step", step)
    config = EngineConfig(model=str(tiny_fleet["model"]), adapters=str(tiny_fleet["adapters"]), max_num_seqs=2)
    with pytest.raises(KeyboardInterrupt):
        run_requests(config, str(requests_path), str(out), progress=False, rows_per_shard=1000)
    assert_lock_released(out)
    monkeypatch.undo()
    assert_rerun_finishes_exactly_once(tiny_fleet, requests_path, out, committed(out))   # one shard, on exit


def test_stop_signals_defer_the_first_signal_only_between_steps():
    with StopSignals() as stop:
        with pytest.raises(RunInterrupted) as outside:           # reading, loading: nothing half done, stop at once
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        assert outside.value.exit_code == 129
    with StopSignals() as stop:
        with pytest.raises(RunInterrupted) as deferred:
            with stop.between_steps():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                assert stop.requested()                           # set, not raised: the loop stops at its next check
                with pytest.raises(RunInterrupted):               # a second signal does not wait
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
        assert deferred.value.exit_code == 128 + signal.SIGTERM
    assert not StopSignals().requested()                          # never entered (Dagster, tests): never asks
