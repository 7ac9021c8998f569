"""benchmarks/regime_search.py's saved-run table (docs/lr_search.md is printed from it): a cell run
again in a later file replaces the earlier one, the best rate is the highest seed mean, and runs
with params overrides get their own row."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rec(method, lr, seed, val, overrides=None, cos=0.1):
    return {"candidate": "default", "method": method, "terms": None, "overrides": overrides, "lr": lr,
            "seed": seed, "val": val, "steps": 60, "seconds": 40.0, "img_cos": cos, "stage_vals": [val]}


def test_from_json_later_cells_replace_earlier_ones(tmp_path):
    old = [rec("c2kd", 1e-3, 0, 0.30, cos=0.6), rec("c2kd", 1e-3, 1, 0.32, cos=0.6),
           rec("c2kd", 3e-3, 0, 0.05), rec("c2kd", 3e-3, 1, 0.03),
           rec("kd", 1e-3, 0, 0.36), rec("kd", 1e-3, 1, 0.38)]
    new = [rec("c2kd", 1e-3, 0, 0.40, cos=0.4), rec("c2kd", 1e-3, 1, 0.36, cos=0.4),
           rec("kd", 1e-3, 0, 0.20, overrides=["loss.x=1"])]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    out = subprocess.run([sys.executable, "benchmarks/regime_search.py", "--from-json", str(a), str(b)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    # c2kd at 1e-3: the new seeds only (mean 38.0, std 2.8), still best over 3e-3's 4.0; cosine of the new runs
    assert rows["c2kd"] == "| c2kd | **38.0 ± 2.8** | 4.0 ± 1.4 | 0.001 | 0.40 |"
    assert rows["kd"] == "| kd | **37.0 ± 1.4** |  | 0.001 | 0.10 |"
    assert rows["kd [loss.x=1]"] == "| kd [loss.x=1] | **20.0 (n=1)** |  | 0.001 | 0.10 |"
