"""Which memory-allocator setting makes the pipeline's big forward passes fastest on this CPU:
glibc's defaults, torch's transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`), or glibc told to keep
freed memory (`MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_` at its maximum)? The pipeline adopts
the last: `cmapkd.runtime.keep_freed_memory_env` (switch: `CMAPKD_KEEP_FREED_MEMORY=0`).

    python benchmarks/bench_alloc.py [--rounds 3] [--repeats 5]

Each round runs one fresh process per allocator setting (`SETTINGS`: glibc's defaults, torch's
huge pages, glibc told to keep freed memory; the order reverses every other round, as the speed of
a shared machine drifts) and times, after one warm-up call, the median of
`--repeats` calls of:
- teacher forward: the teacher's image tower (timm `tf_efficientnet_lite2`, channels-last, eval,
  no grad) on a batch of 64 images at 128 px: the work of the teacher, cache and evaluate stages;
- student step: forward + backward + AdamW step of the student's image tower
  (`tf_efficientnet_lite0`, train mode) on 64 images at 64 px: the image half of a training step.
Random weights and inputs: the time does not depend on the values. It also counts the minor page
faults per call (getrusage), the cost huge pages remove. Prints one Markdown table (median over
rounds of each process's median; min-max over rounds in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import timm, torch

repeats = int(sys.argv[1])
torch.manual_seed(0)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def timed(fn):
    fn()
    times, flts = [], []
    for _ in range(repeats):
        f0, t0 = faults(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        flts.append(faults() - f0)
    return sorted(times)[len(times) // 2] * 1e3, sorted(flts)[len(flts) // 2]

teacher = timm.create_model("tf_efficientnet_lite2", pretrained=False).eval().to(memory_format=torch.channels_last)
x_t = torch.randn(64, 3, 128, 128).to(memory_format=torch.channels_last)
def teacher_forward():
    with torch.no_grad():
        teacher(x_t)

student = timm.create_model("tf_efficientnet_lite0", pretrained=False).train()
opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
x_s = torch.randn(64, 3, 64, 64)
def student_step():
    opt.zero_grad(set_to_none=True)
    student(x_s).float().square().mean().backward()
    opt.step()

out = {}
for name, fn in (("teacher forward", teacher_forward), ("student step", student_step)):
    out[name] = timed(fn)
print(json.dumps(out))
"""

# setting -> environment of its worker process
SETTINGS = {
    "glibc defaults": {"THP_MEM_ALLOC_ENABLE": "0"},
    "torch huge pages": {"THP_MEM_ALLOC_ENABLE": "1"},
    # glibc: no mmap for large blocks, never trim the heap, so freed blocks are reused in-process
    "glibc keeps freed memory": {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_MAX_": "0",
                                 "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
}


def run_worker(setting: str, repeats: int) -> dict:
    env = dict(os.environ, **SETTINGS[setting])
    res = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench_alloc: the worker failed ({setting}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    results: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
        for k in order:
            results[k].append(run_worker(k, args.repeats))
            print(f"round {r + 1}/{args.rounds} {k}: {results[k][-1]}", file=sys.stderr)
    print(f"{os.cpu_count()} cores, torch threads: default; {args.rounds} rounds x {args.repeats} timed calls\n")
    print("| work | allocator | ms per call | minor page faults per call |")
    print("|---|---|--:|--:|")
    for work in results["glibc defaults"][0]:
        for k in SETTINGS:
            ms = [x[work][0] for x in results[k]]
            fl = [x[work][1] for x in results[k]]
            print(f"| {work} | {k} | {statistics.median(ms):.0f} [{min(ms):.0f}-{max(ms):.0f}] | {statistics.median(fl):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
