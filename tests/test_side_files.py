"""Issue 13: side files (temp dirs, a `--force` swap's new/old) carry PID@HOST, and a run cleans or
recovers only those of this host's runs that are gone: on a filesystem shared by two machines, a PID
says nothing about the other machine's runs (one of them may be writing its export right now)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from mlx_bridge import fsutil
from mlx_bridge.formats import save_file
from mlx_bridge.fsutil import atomic_dir, recover, run_tag, scratch_dir, side_name


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def on_node_a(monkeypatch):
    """This process runs on host `node-a` (written `node_a` in names)."""
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    assert fsutil.host() == "node_a"


def test_names_carry_pid_and_host(on_node_a, tmp_path):
    assert side_name(tmp_path / "out", "new").name == f".out.new-{os.getpid()}@node_a"
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@node_a-")
    with scratch_dir("mlx-bridge-test") as d:
        assert d.name.startswith(f"mlx-bridge-test-{os.getpid()}@node_a-")


def test_another_hosts_side_dirs_are_left_alone(on_node_a, tmp_path):
    """A dead-looking PID of node-b: its temp dir and its half-done swap are not touched, and its new
    output is not put in place under our name."""
    pid = dead_pid()
    tmp = tmp_path / f".out.tmp-{run_tag(pid, 'node_b')}-abc"
    new, old = side_name(tmp_path / "out", "new", pid, "node_b"), side_name(tmp_path / "out", "old", pid, "node_b")
    for d in (tmp, new, old):
        d.mkdir()
        (d / "v").write_text(d.name)
    assert recover(tmp_path / "out") is None
    assert sorted(os.listdir(tmp_path)) == sorted([tmp.name, new.name, old.name])


def test_this_hosts_dead_runs_are_cleaned_beside_another_hosts(on_node_a, tmp_path):
    pid = dead_pid()
    ours = tmp_path / f".out.tmp-{run_tag(pid)}-abc"
    theirs = tmp_path / f".out.tmp-{run_tag(pid, 'node_b')}-abc"
    ours.mkdir(), theirs.mkdir()
    side_name(tmp_path / "out", "new", pid).mkdir()
    (side_name(tmp_path / "out", "new", pid) / "v").write_text("new")
    said = recover(tmp_path / "out")
    assert "recovered" in said and (tmp_path / "out" / "v").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", theirs.name])


def test_a_live_run_of_this_host_is_left_alone(on_node_a, tmp_path):
    live = tmp_path / f".out.tmp-{run_tag(os.getppid())}-abc"
    live.mkdir()
    recover(tmp_path / "out")
    assert live.is_dir()


def test_names_without_a_host_count_as_this_hosts(tmp_path):
    """Written before the host was recorded: cleaned by PID as they were then."""
    pid = dead_pid()
    (tmp_path / f".out.tmp-{pid}-abc").mkdir()
    (tmp_path / f".out.old-{pid}").mkdir()
    assert "recovered" in recover(tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]


def test_scratch_dirs_of_another_host_are_left_alone(on_node_a, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pid = dead_pid()
    ours, theirs = tmp_path / f"mlx-bridge-peft-{run_tag(pid)}-abc", tmp_path / f"mlx-bridge-peft-{pid}@node_b-abc"
    ours.mkdir(), theirs.mkdir()
    with scratch_dir("mlx-bridge-peft"):
        assert theirs.is_dir() and not ours.exists()
    assert os.listdir(tmp_path) == [theirs.name]


def test_an_output_written_beside_another_hosts_temp_dir_leaves_it(on_node_a, tmp_path):
    """A whole atomic write (as export and checkpoint saves do) beside another host's temp dir of the
    same output name succeeds and leaves that dir as it was."""
    theirs = tmp_path / f".out.tmp-{run_tag(dead_pid(), 'node_b')}-abc"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"\0" * 100)
    with atomic_dir(tmp_path / "out") as tmp:
        save_file({"a": np.ones(2, np.float32)}, tmp / "x.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", theirs.name])
    assert (theirs / "model.safetensors").stat().st_size == 100
