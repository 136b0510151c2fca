"""A run directory is written by one process: a second run, or a quickstart onto it, is refused while the first
lives (tested with real processes); a lock left by a killed process is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orionlm.cli import main
from orionlm.errors import OrionError
from orionlm.train.lock import LOCK_FILE, RunLocked, acquire, release
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.trainer import train

from .test_trainer import write_recipe

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the other process ended before {what}: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def cli(*args: object) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_a_run_in_progress_is_neither_joined_nor_deleted(tmp_path, capsys):
    path = write_recipe(tmp_path, run={"max_steps": 100_000, "save_every_steps": 0, "eval_every": 0})
    run_dir = tmp_path / "run"
    # its output goes to a file: a pipe nobody reads fills up and blocks the run, even on its way out after Ctrl-C
    log = tmp_path / "other.log"
    with log.open("w") as out:
        # default Ctrl-C handling whatever this process inherited (Python ignores SIGINT for good when it starts
        # with the signal ignored)
        other = subprocess.Popen([sys.executable, "-m", "orionlm", "train", str(path)], env=ENV, cwd=tmp_path,
                                 stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, "its first metrics record", other, log)
        assert json.loads((run_dir / LOCK_FILE).read_text()) == {"pid": other.pid, "host": socket.gethostname()}
        with pytest.raises(RunLocked, match=rf"{run_dir} is in use by process {other.pid} \(its run.lock\)"):
            train(load_recipe(path))
        capsys.readouterr()
        assert cli("quickstart", "--out", run_dir) == 2
        err = capsys.readouterr().err
        assert err.startswith("orionlm: error: ") and err.count("\n") == 1 and f"process {other.pid}" in err
        size = metrics.stat().st_size
        wait_for(lambda: metrics.stat().st_size > size, "another record: the run goes on, its files intact", other, log)
    finally:
        other.send_signal(signal.SIGINT)  # Ctrl-C: the run lets go of its directory on the way out
        try:
            code = other.wait(180)
        except subprocess.TimeoutExpired:
            other.kill()
            raise AssertionError(f"the run did not end within 180 s of Ctrl-C: {log.read_text()[-3000:]}") from None
    assert code == 130, log.read_text()[-3000:]
    assert not (run_dir / LOCK_FILE).exists()
    with pytest.raises(RecipeError, match="already holds a run"):  # now the run's own refusal, not the lock's
        train(load_recipe(path))


HOLD = "import sys, time; from orionlm.train.lock import acquire; acquire(sys.argv[1]); print('held', flush=True); "
HOLD += "time.sleep(120)"


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunLocked, match=f"in use by process {holder.pid}"):
        acquire(run_dir)
    holder.kill()  # SIGKILL: no chance to clean up; the lock file stays
    holder.wait(60)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = acquire(run_dir)
    taken = f"note: taking over {run_dir / LOCK_FILE}, left by process {holder.pid}, which has ended"
    assert capsys.readouterr().err == taken + "\n"
    assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    release(lock)
    assert not lock.exists()


def test_a_lock_from_another_host_or_onto_a_file_is_refused_and_nested_locks_are_released_last(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunLocked, match=r"written by process 1 on elsewhere, .* if that run has ended, delete"):
        acquire(run_dir)
    (run_dir / LOCK_FILE).unlink()
    (tmp_path / "a file").write_text("")
    with pytest.raises(OrionError, match="a file is a file, not a run directory"):
        acquire(tmp_path / "a file")
    fresh = tmp_path / "fresh"
    outer = acquire(fresh)
    assert acquire(fresh) == outer  # quickstart holds its --out while the trainer inside takes it again
    release(outer)
    assert outer.is_file()
    release(outer)
    assert not fresh.exists()  # taking the lock created the directory, and nothing was written into it


def test_quickstart_onto_a_run_that_has_not_logged_yet_says_it_is_in_use_and_a_file_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        (run_dir / "tokenizer").mkdir()  # a run still tokenizing: no metrics.jsonl yet
        assert cli("quickstart", "--out", run_dir) == 2
        err = capsys.readouterr().err
        assert err == f"orionlm: error: {run_dir.resolve()} is in use by process {holder.pid} (its run.lock): wait " \
                      "for that run to end or stop it, or choose another run directory\n"  # fmt: skip
        assert (run_dir / "tokenizer").is_dir()
    finally:
        holder.kill()
        holder.wait(60)
    (tmp_path / "a file").write_text("")
    assert cli("quickstart", "--out", tmp_path / "a file") == 2
    assert capsys.readouterr().err.count("\n") == 1 and (tmp_path / "a file").read_text() == ""
