"""Runtime helpers (seeding, device from the environment, offline hub) and the `cmapkd` command."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmapkd import runtime
from cmapkd.cli import main as cli_main


def test_seed_everything_repeats_python_numpy_torch():
    import random

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    runtime.seed_everything(123)
    a = draw()
    runtime.seed_everything(123)
    b = draw()
    runtime.seed_everything(124)
    c = draw()
    assert a == b and a != c


def test_device_comes_from_environment(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, "cpu")
    assert runtime.get_device().type == "cpu"
    monkeypatch.setenv(runtime.DEVICE_ENV, "auto")
    assert runtime.get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(runtime.DEVICE_ENV, "potato")
    with pytest.raises(ValueError, match="CMAPKD_DEVICE='potato'"):
        runtime.get_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(runtime.DEVICE_ENV, "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime.get_device()


def test_embedded_setting_switches_hub_off(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", runtime.HUB_ENV):
        monkeypatch.delenv(k, raising=False)
    assert runtime.configure_hub("paper") is False
    assert "HF_HUB_OFFLINE" not in os.environ
    assert runtime.configure_hub("embedded") is True
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_cli_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("params", "prepare", "evaluate"):
        assert name in out


def test_python_dash_m_cmapkd_help_runs(project_root):
    r = subprocess.run([sys.executable, "-m", "cmapkd", "--help"], capture_output=True, text=True, cwd=project_root)
    assert r.returncode == 0 and "stages" in r.stdout


def test_params_stage_prints_overrides_and_rejects_bad_keys(project_root, capsys):
    assert cli_main(["params", "--file", str(project_root / "params.yaml"), "-S", "lambda2=0.3"]) == 0
    assert "lambda2: 0.3" in capsys.readouterr().out
    assert cli_main(["params", "--file", str(project_root / "params.yaml"), "-S", "lambda2=oops"]) == 2
    assert "key 'lambda2' expects float" in capsys.readouterr().err


@pytest.mark.parametrize("body, code, out", [
    ("print('written', flush=False); logging.getLogger('x').warning('logged'); return 3", 3, "written"),
    ("return None", 0, ""),
])
def test_run_stage_exits_with_mains_status_and_flushes(tmp_path, body, code, out):
    """Stage entry points end with os._exit (no interpreter teardown): the status is main's, and
    buffered output and log records still arrive."""
    script = tmp_path / "stage.py"
    script.write_text("import logging\nfrom cmapkd import runtime\nlogging.basicConfig()\n"
                      f"def main():\n    {body}\nruntime.run_stage(main)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == code
    assert r.stdout.strip() == out
    assert ("logged" in r.stderr) == (code == 3)


def test_run_stage_lets_an_exception_fail_the_process(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("from cmapkd import runtime\ndef main():\n    raise RuntimeError('boom')\nruntime.run_stage(main)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr


def test_nproc_runs_training_stages_under_torchrun_only():
    from cmapkd.cli import torchrun_command

    cmd = torchrun_command("cmapkd.stages.distill", ["--run", "stage1"], {"CMAPKD_NPROC": "8"})
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
                       "-m", "cmapkd.stages.distill", "--run", "stage1"]
    assert torchrun_command("cmapkd.stages.distill", [], {}) is None  # not asked
    assert torchrun_command("cmapkd.stages.distill", [], {"CMAPKD_NPROC": "1"}) is None
    assert torchrun_command("cmapkd.stages.evaluate", [], {"CMAPKD_NPROC": "8"}) is None  # does not train
    # a torchrun worker never launches torchrun again
    assert torchrun_command("cmapkd.stages.distill", [], {"CMAPKD_NPROC": "8", "LOCAL_RANK": "0"}) is None
    with pytest.raises(SystemExit, match="CMAPKD_NPROC must be a whole number of processes, got 'eight'"):
        torchrun_command("cmapkd.stages.distill", [], {"CMAPKD_NPROC": "eight"})


def test_nproc_launch_goes_through_torchrun(project_root):
    # two torchrun workers each run the distill stage's --help and exit 0; torchrun reports success
    env = {**os.environ, "CMAPKD_NPROC": "2", "CMAPKD_WARM": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "cmapkd", "distill", "--help"], cwd=project_root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("usage:") == 2  # one per worker process


def test_keep_freed_memory_env_respects_the_user_and_the_switch():
    env = runtime.keep_freed_memory_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", **runtime.KEEP_FREED_MALLOC_ENV}
    assert runtime.keep_freed_memory_env(env) is None  # already restarted: no loop
    assert runtime.keep_freed_memory_env({"MALLOC_MMAP_MAX_": "65536"}) is None  # the user's own tuning wins
    assert runtime.keep_freed_memory_env({runtime.KEEP_FREED_ENV: "0"}) is None


_PROBE_STAGE = """
import os, resource, torch

def main(args):
    x = torch.ones(16 << 20)  # 64 MB
    for _ in range(10):  # a repeated step: two 64 MB temporaries per step, freed again
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        (x * 2 + 1).sum()
    print(os.environ.get("MALLOC_MMAP_MAX_"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return 0
"""


def test_a_stage_command_reuses_freed_memory(tmp_path):
    """`cmapkd <stage>` (cli.launch) restarts itself with glibc told to keep freed memory: once warm,
    a repeated step reuses the pages its temporaries had instead of faulting in 2 x 16,384 fresh
    4 KB pages every time. CMAPKD_KEEP_FREED_MEMORY=0 keeps glibc's default."""
    (tmp_path / "probe_stage.py").write_text(_PROBE_STAGE)
    code = "import sys; from cmapkd.cli import launch; launch('probe_stage', sys.argv[1:])"

    def run(switch):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(CMAPKD_WARM="0", PYTHONPATH=str(tmp_path), **{runtime.KEEP_FREED_ENV: switch})
        out = subprocess.run([sys.executable, "-c", code, "--an-arg"], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    on_setting, on_faults = run("1")
    off_setting, off_faults = run("0")
    assert on_setting == "0" and off_setting == "None"
    assert off_faults >= 32_000  # one fault per 4 KB page of both temporaries
    assert on_faults < 1_000
