"""The warm-start launcher (cmapkd.warm): a stage forked by the server behaves like `python -m`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cmapkd import warm

PROBE = '''
import os, sys
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("PROBE_VALUE"))
print("torch-preloaded", "torch" in sys.modules)
print("stdin", sys.stdin.readline().strip())
print("to-stderr", file=sys.stderr)
raise SystemExit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
'''

SLEEPER = '''
import os, sys, time
print("pid", os.getpid(), flush=True)
time.sleep(60)
'''

CLIENT = "import sys; from cmapkd import warm; r = warm.run(sys.argv[1], sys.argv[2:]); print('RESULT', r, flush=True)"


@pytest.fixture
def warm_env():
    """A private temp folder (short: AF_UNIX paths are limited) and warm start switched on."""
    tmp = Path(tempfile.mkdtemp(prefix="cw", dir="/tmp"))
    env = dict(os.environ, TMPDIR=str(tmp), CMAPKD_WARM="1", CMAPKD_WARM_IDLE="30", PROBE_VALUE="from-caller")
    work = tmp / "work"
    work.mkdir()
    (work / "probe_stage.py").write_text(PROBE)
    (work / "sleeper_stage.py").write_text(SLEEPER)
    yield env, work, tmp
    for sock in tmp.glob("cmapkd-warm-*/*.sock"):  # stop the server: it exits when its socket goes
        sock.unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def _client(env, work, *args, stdin="", extra_env=None):
    return subprocess.run([sys.executable, "-c", CLIENT, *args], cwd=work, env=dict(env, **(extra_env or {})),
                          input=stdin, capture_output=True, text=True, timeout=120)


def _wait_for_server(tmp: Path, timeout: float = 90.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        logs = list(tmp.glob("cmapkd-warm-*/*.log"))
        if logs and "preloaded" in logs[0].read_text():
            return logs[0]
        time.sleep(0.2)
    raise AssertionError(f"no warm server came up in {timeout} s: {[p.read_text() for p in tmp.glob('**/*.log')]}")


def test_a_stage_runs_in_a_warm_child_with_the_callers_streams_env_cwd_and_status(warm_env):
    env, work, tmp = warm_env
    first = _client(env, work, "probe_stage", "x")
    assert first.stdout.strip() == "RESULT None"  # no server yet: it is started, the caller runs cold
    log = _wait_for_server(tmp)

    out = _client(env, work, "probe_stage", "--flag", "3", stdin="line from stdin\n",
                  extra_env={"DVC_STAGE": "baseline@kd-0"})  # DVC_STAGE differs per stage: same server
    lines = out.stdout.splitlines()
    assert lines[-1] == "RESULT 3"  # the child's exit status comes back
    assert "argv ['--flag', '3']" in lines
    assert f"cwd {work}" in lines
    assert "env from-caller" in lines
    assert "torch-preloaded True" in lines  # it ran in the server's child, torch already imported
    assert "stdin line from stdin" in lines  # the caller's stdin, stdout and stderr were passed on
    assert out.stderr.strip() == "to-stderr"
    assert "probe_stage --flag 3 -> pid" in log.read_text()


def test_signals_reach_the_stage_and_a_vanished_caller_takes_its_stage_with_it(warm_env):
    env, work, tmp = warm_env
    _client(env, work, "probe_stage")
    _wait_for_server(tmp)

    for how in ("SIGTERM", "SIGKILL"):
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleeper_stage"], cwd=work, env=env,
                                stdout=subprocess.PIPE, text=True)
        pid = int(proc.stdout.readline().split()[1])
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=20)
        if how == "SIGTERM":  # forwarded to the stage, which dies of it; the caller reports 128 + 15
            assert proc.stdout.read().strip() == "RESULT 143"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), f"stage pid {pid} outlived its caller ({how})"


def test_switched_off_or_idle_means_no_server(warm_env):
    env, work, tmp = warm_env
    off = _client(env, work, "probe_stage", extra_env={"CMAPKD_WARM": "0"})
    assert off.stdout.strip() == "RESULT None"
    time.sleep(0.5)
    assert not list(tmp.glob("cmapkd-warm-*/*.sock"))

    idle = dict(env, CMAPKD_WARM_IDLE="1")
    _client(idle, work, "probe_stage")
    log = _wait_for_server(tmp)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20 and "exiting" not in log.read_text():
        time.sleep(0.2)
    assert "idle for 1 s, exiting" in log.read_text()
    assert not list(tmp.glob("cmapkd-warm-*/*.sock"))  # it removed its socket


def test_the_server_key_follows_the_environment_but_not_the_stage_name(monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "a")
    key = warm.server_key("/repo")
    monkeypatch.setenv("DVC_STAGE", "b")
    assert warm.server_key("/repo") == key
    assert warm.server_key("/other") != key
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read by the preloaded libraries at import time
    k1 = warm.server_key("/repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert warm.server_key("/repo") != k1


def test_cmapkd_command_ends_with_the_stages_status(project_root, warm_env):
    env, work, tmp = warm_env
    bad = work / "params.yaml"
    bad.write_text((project_root / "params.yaml").read_text().replace("lambda2: 0.5", "lambda2: oops"))
    for attempt in ("cold", "cold, starts the server", "warm"):
        if attempt == "warm":
            _wait_for_server(tmp)
        proc = subprocess.run([sys.executable, "-m", "cmapkd", "params", "--file", str(bad)], cwd=work,
                              env=dict(env, CMAPKD_WARM="0" if attempt == "cold" else "1"),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, attempt
        assert "'lambda2' expects float, got str 'oops'" in proc.stderr, attempt
    assert "cmapkd.stages.params --file" in _wait_for_server(tmp).read_text()  # the last one ran warm
