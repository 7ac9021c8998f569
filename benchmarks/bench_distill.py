"""Speed of a CMAPKD distillation step (issue 5, "Speed") on the embedded default.

    python benchmarks/bench_distill.py [--run stage3] [--batch-size 64] [--steps 10] [--warmup 3]
                                       [--device cpu|cuda] [--threads N] [--json PATH] [--profile DIR]
                                       [--variants plain,cached,online] [--cache-images 512]
                                       [--cache-rounds 3] [--no-cache-bench] [-S key=value ...]

Measures, with the data, teacher and teacher cache that `dvc repro` built (data/processed/
emojiscenes, models/teacher, data/cache/teacher):

1. `plain`:  a contrastive step of the student alone (`ScratchStudent`, the scratch baseline);
   `cached`: a CMAPKD step of the same student and batch with the cached teacher targets;
   `online`: the same CMAPKD step with the teacher's forward pass in the loop.
   A step is what `cmapkd.distill.trainer.train` does per step: batch building (views, captions,
   cache rows), forward (bf16 autocast on CUDA only), the finite-loss check, backward, gradient
   clipping, the AdamW and scheduler steps, the logit-scale clamp and the per-step float() of every
   logged term. Target: cached <= 1.15x plain.
2. The cache's write throughput (views + teacher forward + fp16 shard writes + commit, as the
   `cache_teacher` stage does it, on the first `--cache-images` training images into a temporary
   folder) vs the teacher's forward-only throughput on the same inputs. Target: >= 0.9x.
3. Bytes per cached sample, from the real cache's files and row counts (identity.json).
4. Peak memory: every variant runs in its own process (multiprocessing, spawn) and reports its
   RSS high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`; includes the set-up: data,
   models, the cache read into memory) and, on CUDA, `torch.cuda.max_memory_allocated`.

Noise control (the reference machine is a shared 2-core CPU): the variants' processes are all
alive at once but only one computes at a time; the parent drives them one step each in a rotating
order (ABC, BCA, CAB, ...) so drift and other tenants' load hit them alike; the report gives
medians over the timed steps, and "x plain" is the median of the per-step paired ratios.
`--profile DIR` additionally runs torch.profiler over a few steps of `plain` and `cached` and
prints the forward and backward time of each part of the step (student towers, UCMP, intra-modal
distances, every loss term, optimizer; `attribute_trace`), the operators that grow most, and saves
the operator tables and chrome traces in DIR. What-if variants (`--variants cached+channels_last`,
see PATCHES) apply a candidate speed-up inside that variant's process only, to measure it before
anyone changes the sources. On a shared machine, `--threads 1` gives far steadier numbers
(docs/benchmarks.md).

This is a benchmark, not a test: nothing here asserts; the targets are printed next to the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the params sections the distill stage loads (its own list when importable: it grows as methods are added)
_FALLBACK_KEYS = ["seed", "setting", "lambda1", "lambda2", "lambda3", "lambda4", "model", "loss", "cache_teacher", "distill"]
VARIANTS = ("plain", "cached", "online")
# what-if patches, applied inside a variant's own process only (never to the sources): a variant
# name may carry them, e.g. `cached+channels_last+vec_align`; they backed docs/benchmarks.md's
# suggestions 1-3, which are in the sources since 2026-11-23 (so these three now change nothing;
# the mechanism stays for the next what-if)
PATCHES = {
    "nofill": "torch.utils.deterministic.fill_uninitialized_memory = False after runtime.seed_everything",
    "channels_last": "the student FPN and the visual intra adapters run in channels_last memory format",
    "vec_align": "align_pyramid computes all (i, j) level pairs with one einsum instead of a 4x4 loop",
}
PHASES = ("batch", "forward", "backward", "optim")
# forward sub-phases, timed with hooks on the method's own modules / functions
SUBPHASES = ("targets", "student_image", "student_text", "ucmp", "losses")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux); nan elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _setup_torch(args):
    import torch

    from cmapkd import runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return torch, runtime, device


def _load_params(args):
    from cmapkd.config import load_params

    try:
        from cmapkd.stages.distill import KEYS as keys
    except ImportError:
        keys = _FALLBACK_KEYS
    return load_params(list(keys), path=args.params, overrides=args.set)


class _Timer:
    """Accumulates wall time per named region; on CUDA it synchronises at each boundary. While
    profiling, every region is also a torch.profiler `record_function` range (for attribution)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.acc: dict[str, float] = {}
        self._open: dict[str, tuple] = {}
        self.profiling = False
        self.every_region = False  # True: time every region, not only the step's phases

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def _skip(self, name) -> bool:
        # the fine regions (intra_v, loss:<term>, ...) only count while profiling: no syncs otherwise
        return not (self.profiling or self.every_region) and name not in PHASES and name not in SUBPHASES

    def start(self, name):
        if self._skip(name):
            return
        self.sync()
        rf = None
        if self.profiling:
            rf = self.torch.autograd.profiler.record_function(f"bench:{name}")
            rf.__enter__()
        self._open[name] = (time.perf_counter(), rf)

    def stop(self, name):
        if self._skip(name):
            return
        self.sync()
        t, rf = self._open.pop(name)
        self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t
        if rf is not None:
            rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def region(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def _wrap(timer, name, fn):
    def wrapped(*a, **k):
        with timer.region(name(*a, **k) if callable(name) else name):
            return fn(*a, **k)

    return wrapped


def _hook(module, timer, name):
    module.register_forward_pre_hook(lambda m, a: timer.start(name))
    module.register_forward_hook(lambda m, a, o: timer.stop(name))


def align_pyramid_batched(f: dict, ctx) -> "torch.Tensor":
    """`cmapkd.losses.cmapkd.align_pyramid` with every (i, j) pair in one batched product: the
    same value (to float rounding) from ~40 ops instead of ~16 x 20. The `vec_align` patch."""
    import torch
    import torch.nn.functional as F

    from cmapkd.losses import cmapkd as lmod

    if not ctx.vis_levels or not ctx.txt_levels:
        return lmod._zero(f)
    scale = ctx.align_logit_scale / ctx.t_kd
    vi, tj = ctx.vis_levels, ctx.txt_levels
    tv = F.normalize(f["t_vis_pool"][:, vi].float(), dim=-1)
    tl = F.normalize(f["t_txt_pool"][:, tj].float(), dim=-1)
    sv, sl = F.normalize(f["vis_emb"][:, vi], dim=-1), F.normalize(f["txt_emb"][:, tj], dim=-1)
    p_t = scale * torch.einsum("bie,cje->ijbc", tv, tl)  # [I, J, B, B]: row b = image b vs every caption
    p_s = scale * torch.einsum("bie,cje->ijbc", sv, sl)
    p_log = p_t.log_softmax(-1)
    kl = (p_log.exp() * (p_log - p_s.log_softmax(-1))).sum(-1).mean(-1)  # [I, J]
    return (ctx.alpha[vi][:, tj] * kl).sum() / (lmod.LEVELS * lmod.LEVELS)


def _apply_patches(patches, method=None) -> None:
    import torch

    if "nofill" in patches and method is None:
        torch.utils.deterministic.fill_uninitialized_memory = False
    if method is None:
        return
    if "channels_last" in patches and hasattr(method, "ucmp"):
        cl = torch.channels_last
        fpn = method.ucmp.fpn
        fpn.to(memory_format=cl)
        method.ucmp.vis_adapters.to(memory_format=cl)
        inner = fpn.forward
        fpn.forward = lambda taps: inner([t.contiguous(memory_format=cl) for t in taps])
    if "vec_align" in patches:
        from cmapkd.losses import cmapkd as lmod

        lmod.TERMS["align_pyramid"] = align_pyramid_batched


def _instrument(method, timer, fine: bool = False):
    """Time the forward sub-phases without touching the sources: forward hooks on the student's
    towers and the UCMP, and per-instance wrappers of `targets_from_batch` / `compute_losses`.
    `fine` (profiling only) also wraps, inside this process only, the distiller's intra-modal
    distances, its level weights and every CMAPKD loss term, so that the profile can attribute
    forward *and* backward time to them."""
    _hook(method.student.image, timer, "student_image")
    _hook(method.student.text, timer, "student_text")
    if hasattr(method, "ucmp"):
        _hook(method.ucmp, timer, "ucmp")
    if getattr(method, "required_targets", ()):
        method.targets_from_batch = _wrap(timer, "targets", method.targets_from_batch)
    method.compute_losses = _wrap(timer, "losses", method.compute_losses)
    if not fine:
        return
    method.compute_features = _wrap(timer, "compute_features", method.compute_features)
    if hasattr(method, "ucmp"):
        import cmapkd.distill.cmapkd as dmod
        from cmapkd.losses import cmapkd as lmod

        for m in method.ucmp.vis_adapters:
            _hook(m, timer, "intra_v")
        # the names the distiller module looks up at call time (module globals of this process)
        dmod.resample = _wrap(timer, "intra_v", dmod.resample)
        dmod.normalized_sq_distance = _wrap(
            timer, lambda s, t, dim=1, **k: "intra_v" if dim == 1 else "intra_l", dmod.normalized_sq_distance)
        method.level_weights = _wrap(timer, "level_weights", method.level_weights)
        for term, fn in list(lmod.TERMS.items()):
            lmod.TERMS[term] = _wrap(timer, f"loss:{term}", fn)


def attribute_trace(trace_path: Path, steps: int) -> dict:
    """Forward and backward time per benchmark region from a torch.profiler chrome trace.
    Forward: each `bench:<region>` range's own time (its duration less the regions nested in it).
    Backward: each autograd node evaluation (`autograd::engine::evaluate_function: ...`) is charged
    to the innermost region that was open when its forward op ran (matched by sequence number).
    Returns {region: {"forward_ms", "backward_ms"}} per step."""
    import bisect

    trace = json.loads(Path(trace_path).read_text())
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    regions = sorted((e for e in ev if e["name"].startswith("bench:")), key=lambda e: (e["ts"], -e["dur"]))
    out: dict[str, dict[str, float]] = {}

    def add(region, key, us):
        out.setdefault(region, {"forward_ms": 0.0, "backward_ms": 0.0})[key] += us / 1e3 / steps

    # exclusive forward time of each region, and an interval list for the innermost-region lookup
    stack, intervals = [], []  # intervals: (start, end, name, depth)
    for e in regions:
        s, t, name = e["ts"], e["ts"] + e["dur"], e["name"][6:]
        while stack and stack[-1][1] <= s:
            stack.pop()
        if stack:
            add(stack[-1][2], "forward_ms", -e["dur"])  # nested: not its parent's own time
        add(name, "forward_ms", e["dur"])
        stack.append((s, t, name))
        intervals.append((s, t, name, len(stack)))
    starts = [iv[0] for iv in intervals]

    def innermost(ts):
        best, i = None, bisect.bisect_right(starts, ts) - 1
        # walk back over earlier-starting intervals; the deepest one containing ts wins
        while i >= 0:
            s, t, name, depth = intervals[i]
            if s <= ts < t and (best is None or depth > best[1]):
                best = (name, depth)
            if depth == 1 and s <= ts < t:
                break
            i -= 1
        return best[0] if best else "other"

    # ops record the *next* autograd node's sequence number, so ops that create no node share it
    # with the node created after them: the last forward op (by start time) carrying a number is
    # the one that created that node (or an op nested in it)
    seq_region: dict[int, str] = {}
    bwd = []
    for e in sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: e["ts"]):
        seq = e.get("args", {}).get("Sequence number")
        if e["name"].startswith("autograd::engine::evaluate_function"):
            bwd.append((seq, e))
        elif seq is not None and not e["args"].get("Fwd thread id"):  # backward ops name their forward thread
            region = innermost(e["ts"])
            if region != "backward":  # ops run by a node evaluation carry that node's number too
                seq_region[seq] = region
    for seq, e in bwd:
        region = seq_region.get(seq, "accumulate_grad" if "AccumulateGrad" in e["name"] else "other")
        add(region, "backward_ms", e["dur"])
    return out


# --------------------------------------------------------------------------------------------
# one training variant per process
# --------------------------------------------------------------------------------------------


class StepRunner:
    """Everything `cmapkd.distill.runs.run` sets up for one method, and the trainer's step."""

    def __init__(self, variant: str, args):
        torch, runtime, device = _setup_torch(args)
        from torch.utils.data.distributed import DistributedSampler

        from cmapkd.data import ImageTextDataset
        from cmapkd.distill.batches import DistillBatches, cache_identity
        from cmapkd.distill.cache import CacheReader
        from cmapkd.distill.runs import build_method, plan
        from cmapkd.distill.teacher import load_teacher
        from cmapkd.distill.trainer import cosine_with_warmup
        from cmapkd.models.ucmp import TeacherDims

        params = _load_params(args)
        runtime.configure_hub(params.setting)
        runtime.seed_everything(params.seed)  # as the stage does (deterministic kernels included)
        self.torch, self.device, self.variant = torch, device, variant
        variant, *patches = variant.split("+")
        _apply_patches(patches)
        data_root = Path(args.data)
        dataset = ImageTextDataset(data_root, "train")
        num_views = params.cache_teacher.num_views
        name = "scratch" if variant == "plain" else args.run
        teacher = teacher_dims = cache = None
        if variant != "plain":
            teacher = load_teacher(params.model, Path(args.teacher))
            if variant == "cached":
                expected = cache_identity(teacher.identity(), data_root, "train", params.model.student.image_size,
                                          num_views, params.seed)
                cache = CacheReader(Path(args.cache), expected)
                teacher_dims = TeacherDims.from_targets({**cache.rows("image-v0", [0]), **cache.rows("text", [0])})
                for prefix in cache.meta["rows"]:  # read every shard now, not inside a timed step
                    cache.num_rows(prefix)
                teacher = None
            else:
                teacher = teacher.to(device)
        torch.manual_seed(params.seed)  # plain and CMAPKD start from the same student weights
        method = build_method(params, name, teacher, teacher_dims).to(device)
        _apply_patches(patches, method)
        self.method = method
        self.batches = DistillBatches(dataset, method.student.tokenize, params.seed, num_views, cache=cache,
                                      teacher_tokenize=teacher.tokenize if teacher is not None else None,
                                      needs_targets=variant != "plain")
        # optimizer, scheduler and sampler exactly as trainer.train builds them
        lrs = plan(params, name).lrs
        groups = [g for g in method.param_groups(lrs) if g["lr"] > 0]
        for g in method.param_groups(lrs):
            if g["lr"] <= 0:
                for p in g["params"]:
                    p.requires_grad_(False)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=params.distill.weight_decay)
        self.batch_size = args.batch_size or params.distill.batch_size
        self.grad_clip = params.distill.grad_clip
        self.sampler = DistributedSampler(range(len(dataset)), num_replicas=1, rank=0, shuffle=True,
                                          seed=params.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        total = self.steps_per_epoch * 10
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, total, int(0.1 * total)))
        self.timer = _Timer(device)
        self.fine = bool(args.profile) and variant in ("plain", "cached")
        _instrument(method, self.timer, fine=self.fine)
        method.train()
        self.n_params = sum(p.numel() for p in self.params)
        self.setup_peak_mb, self.setup_rss_mb = _peak_rss_mb(), _rss_mb()

    def step(self, step: int) -> dict:
        """One trainer step (cmapkd.distill.trainer.train's loop body, without checkpoint and
        DVCLive I/O); returns the wall time of each phase in seconds."""
        torch, method, timer = self.torch, self.method, self.timer
        from cmapkd.distill.ddp import DistInfo, gather_features

        timer.take()
        t0, c0 = time.perf_counter(), time.process_time()
        timer.start("batch")
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        indices = order[in_epoch * self.batch_size : (in_epoch + 1) * self.batch_size]
        batch = self.batches(indices, epoch)
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        timer.stop("batch")
        timer.start("forward")
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = method.compute_features(batch)
            feats = gather_features(feats, DistInfo())
            losses = method.compute_losses(feats)
        for name, value in losses.items():
            if not name.startswith("diag/") and not torch.isfinite(value).all():
                raise FloatingPointError(f"{self.variant}: loss term '{name}' is {value.item()}")
        timer.stop("forward")
        timer.start("backward")
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        timer.stop("backward")
        timer.start("optim")
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        student = method.student
        if hasattr(student, "logit_scale"):
            with torch.no_grad():
                student.logit_scale.clamp_(0, math.log(100))
        _ = {k: float(v.detach()) for k, v in losses.items()}  # the trainer logs every term every step
        timer.stop("optim")
        out = timer.take()
        out["total"] = time.perf_counter() - t0
        out["cpu"] = time.process_time() - c0  # this process's CPU time (all its threads)
        return out

    def memory(self) -> dict:
        out = {"peak_rss_mb": _peak_rss_mb(), "setup_peak_rss_mb": self.setup_peak_mb,
               "setup_rss_mb": self.setup_rss_mb, "rss_mb": _rss_mb(), "trained_params": self.n_params}
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out

    def profile(self, first_step: int, steps: int, out_dir: Path) -> dict:
        """torch.profiler over `steps` steps: the operator table (self CPU time) and the forward /
        backward time of each region (`attribute_trace`)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.timer.profiling = True
        phases = []
        with profile(activities=acts, record_shapes=True) as prof:
            for i in range(steps):
                phases.append(self.step(first_step + i))
        self.timer.profiling = False
        out_dir.mkdir(parents=True, exist_ok=True)
        trace = out_dir / f"trace_{self.variant}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=60)
        (out_dir / f"ops_{self.variant}.txt").write_text(table + "\n\n" + shapes)
        ops = {e.key: {"self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
               for e in prof.key_averages()}
        n_ops = sum(e.count for e in prof.key_averages()) / steps
        return {"table": table, "ops_per_step": ops, "op_calls_per_step": n_ops,
                "regions": attribute_trace(trace, steps),
                "phases_ms": {k: _median([p.get(k, 0.0) for p in phases]) * 1e3 for k in phases[0]}}


def _step_worker(variant: str, args, conn) -> None:
    try:
        runner = StepRunner(variant, args)
        conn.send(("ready", runner.memory()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "step":
                conn.send(("ok", runner.step(cmd[1])))
            elif cmd[0] == "memory":
                conn.send(("ok", runner.memory()))
            elif cmd[0] == "profile":
                conn.send(("ok", runner.profile(cmd[1], cmd[2], Path(cmd[3]))))
            elif cmd[0] == "stop":
                conn.send(("ok", runner.memory()))
                break
    except (EOFError, BrokenPipeError):  # the parent is gone: nothing to report to
        pass
    except BaseException as e:  # report to the parent instead of hanging it
        import traceback

        conn.send(("error", f"{variant}: {e!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Worker:
    def __init__(self, ctx, target, name: str, args):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(name, args, child), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child.close()

    def recv(self):
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(payload)
        return payload

    def call(self, *cmd):
        self.conn.send(cmd)
        return self.recv()

    def join(self):
        self.proc.join(timeout=60)


# --------------------------------------------------------------------------------------------
# cache write vs teacher forward
# --------------------------------------------------------------------------------------------


def _cache_worker(_name: str, args, conn) -> None:
    try:
        conn.send(("ok", cache_bench(args)))
    except BaseException as e:
        import traceback

        conn.send(("error", f"cache: {e!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def cache_bench(args) -> dict:
    """Rounds of (teacher forward only) and (full cache write) on the same subset, alternating."""
    torch, runtime, device = _setup_torch(args)
    import numpy as np

    from cmapkd.data import ImageTextDataset
    from cmapkd.distill.batches import TokenizedCaptions, cache_identity
    from cmapkd.distill.cache import CacheWriter
    from cmapkd.distill.teacher import load_teacher
    from cmapkd.distill.views import make_views
    from cmapkd.models.ucmp import compute_teacher_targets, pyramid_grids

    params = _load_params(args)
    runtime.configure_hub(params.setting)
    runtime.seed_everything(params.seed)
    cfg = params.cache_teacher
    data_root = Path(args.data)
    teacher = load_teacher(params.model, Path(args.teacher)).to(device)
    dataset = ImageTextDataset(data_root, "train")
    n = min(args.cache_images, len(dataset))
    grids = pyramid_grids(params.model.student.image_size)
    identity = cache_identity(teacher.identity(), data_root, "train", params.model.student.image_size,
                              cfg.num_views, params.seed)
    captions = TokenizedCaptions(dataset, teacher.tokenize)
    m = int(captions.offsets[n])  # the captions of the first n images (flattened order)
    samples = n * cfg.num_views + m
    timer = _Timer(device)
    timer.every_region = True

    def image_batches():
        for k in range(cfg.num_views):
            for start in range(0, n, cfg.batch_size):
                rows = list(range(start, min(n, start + cfg.batch_size)))
                yield k, rows

    # inputs of the forward-only rounds, prepared once (views on the device, caption ids)
    views = [(k, make_views(torch.from_numpy(np.ascontiguousarray(dataset.images[np.asarray(rows)])).permute(0, 3, 1, 2),
                            rows, k, params.seed).to(device)) for k, rows in image_batches()]
    tb = cfg.batch_size * 4  # the stage's caption batch
    texts = [(captions.ids[s : s + tb].to(device), captions.mask[s : s + tb].to(device)) for s in range(0, m, tb)]

    def forward_only() -> float:
        with torch.inference_mode():
            timer.start("fwd")
            for _, v in views:
                compute_teacher_targets(teacher, v, student_grids=grids)
            for ids, mask in texts:
                compute_teacher_targets(teacher, text_ids=ids, text_mask=mask)
            timer.stop("fwd")
        return timer.take()["fwd"]

    def write(folder: Path) -> dict:
        """cmapkd.stages.cache_teacher.build_cache's loop on the subset (no progress bar)."""
        timer.start("total")
        writer = CacheWriter(folder, identity, shard_rows=cfg.shard_rows)
        with torch.inference_mode():
            for k, rows in image_batches():
                with timer.region("views"):
                    raw = torch.from_numpy(np.ascontiguousarray(dataset.images[np.asarray(rows)])).permute(0, 3, 1, 2)
                    v = make_views(raw, rows, k, params.seed).to(device)
                with timer.region("forward"):
                    targets = compute_teacher_targets(teacher, v, student_grids=grids)
                with timer.region("write"):
                    writer.writer(f"image-v{k}").add(targets)
            for start in range(0, m, tb):
                with timer.region("forward"):
                    targets = compute_teacher_targets(teacher, text_ids=captions.ids[start : start + tb].to(device),
                                                      text_mask=captions.mask[start : start + tb].to(device))
                with timer.region("write"):
                    writer.writer("text").add(targets)
        with timer.region("write"):
            record = writer.commit()
        timer.stop("total")
        out = timer.take()
        out["bytes"] = record["bytes"]
        return out

    with torch.inference_mode():  # warm-up (first-call allocations, lazy init): one batch per side
        compute_teacher_targets(teacher, views[0][1], student_grids=grids)
        compute_teacher_targets(teacher, text_ids=texts[0][0], text_mask=texts[0][1])
    fwd, wr = [], []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for r in range(args.cache_rounds):
            fwd.append(forward_only())
            wr.append(write(Path(tmp) / f"cache{r}"))
    f_s = _median(fwd)
    w_s = _median([w["total"] for w in wr])
    ratios = [f / w["total"] for f, w in zip(fwd, wr)]
    return {
        "images": n, "views": cfg.num_views, "captions": m, "samples": samples, "rounds": args.cache_rounds,
        "forward_only_s": fwd, "write_rounds": wr,
        "forward_samples_per_s": samples / f_s,
        "write_samples_per_s": samples / w_s,
        "write_vs_forward": _median(ratios),
        "write_parts_s": {k: _median([w.get(k, 0.0) for w in wr]) for k in ("views", "forward", "write")},
        "subset_bytes": wr[-1]["bytes"] if wr else 0,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --------------------------------------------------------------------------------------------
# bytes per cached sample (the real cache)
# --------------------------------------------------------------------------------------------


def cache_bytes(cache_dir: Path) -> dict:
    from safetensors import safe_open

    meta = json.loads((cache_dir / "identity.json").read_text())
    rows = meta["rows"]
    per_prefix, per_key = {}, {}
    for prefix, n in rows.items():
        files = sorted(cache_dir.glob(f"{prefix}-*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        per_prefix[prefix] = {"rows": n, "bytes": size, "bytes_per_row": size / max(1, n)}
        if files:
            with safe_open(str(files[0]), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    shape = sl.get_shape()
                    per_row = math.prod(shape[1:]) * 2  # fp16
                    per_key.setdefault(prefix.split("-v")[0], {})[k] = {"shape": shape[1:], "bytes_per_row": per_row}
    image = [p for p in per_prefix if p.startswith("image-")]
    img_rows = sum(per_prefix[p]["rows"] for p in image)
    img_bytes = sum(per_prefix[p]["bytes"] for p in image)
    txt = per_prefix.get("text", {"rows": 0, "bytes": 0})
    n_images = per_prefix[image[0]]["rows"] if image else 0
    total = sum(v["bytes"] for v in per_prefix.values())
    return {
        "total_bytes": total, "identity_bytes": meta.get("bytes"), "rows": rows,
        "bytes_per_image_view": img_bytes / max(1, img_rows),
        "bytes_per_caption": txt["bytes"] / max(1, txt["rows"]),
        # what one training sample reads: one view of its image + one caption
        "bytes_per_training_sample": img_bytes / max(1, img_rows) + txt["bytes"] / max(1, txt["rows"]),
        # what the cache holds per training image (K views + all its captions)
        "bytes_per_train_image": total / max(1, n_images),
        "per_key": per_key,
        "stage_timing": meta.get("timing"),
    }


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def run_steps(args, ctx) -> dict:
    workers = []
    for v in args.variants:  # set up one at a time (their set-up is not timed but shares the CPU)
        w = Worker(ctx, _step_worker, v, args)
        w.setup = w.recv()
        workers.append(w)
        print(f"  {v}: ready, RSS {w.setup['setup_rss_mb']:.0f} MB", flush=True)
    total = args.warmup + args.steps
    times = {w.name: [] for w in workers}
    for s in range(total):
        rot = s % len(workers)
        for w in workers[rot:] + workers[:rot]:  # ABC, BCA, CAB, ...
            times[w.name].append(w.call("step", s))
        print(f"  step {s + 1}/{total}" + (" (warm-up)" if s < args.warmup else "") + ": "
              + ", ".join(f"{n} {t[-1]['total'] * 1e3:.0f} ms" for n, t in times.items()), flush=True)
    memory = {w.name: w.call("memory") for w in workers}  # before profiling (the profiler's buffers are big)
    profiles = {}
    if args.profile:
        for w in workers:
            if w.name in ("plain", "cached"):
                profiles[w.name] = w.call("profile", total, args.profile_steps, args.profile)
    for w in workers:
        w.call("stop")
    for w in workers:
        w.join()
    return {"times": times, "memory": memory, "profiles": profiles}


def summarize(args, res: dict, bs: int) -> dict:
    times = {n: t[args.warmup :] for n, t in res["times"].items()}
    out = {}
    plain = times.get("plain")
    for n, t in times.items():
        tot = [x["total"] for x in t]
        med = _median(tot)
        row = {
            "ms_per_step": med * 1e3,
            "cpu_ms_per_step": _median([x["cpu"] for x in t]) * 1e3,
            "ms_per_step_min": min(tot) * 1e3,
            "samples_per_s": bs / med,
            "phases_ms": {p: _median([x.get(p, 0.0) for x in t]) * 1e3 for p in PHASES},
            "forward_parts_ms": {p: _median([x.get(p, 0.0) for x in t]) * 1e3 for p in SUBPHASES},
            "steps_ms": [x * 1e3 for x in tot],
            **res["memory"][n],
        }
        if plain is not None:
            row["x_plain"] = _median([a["total"] / b["total"] for a, b in zip(t, plain)])
            row["x_plain_of_medians"] = med / _median([x["total"] for x in plain])
            row["x_plain_cpu"] = _median([a["cpu"] / b["cpu"] for a, b in zip(t, plain)])
        out[n] = row
    return out


def print_report(args, machine: dict, bs: int, rows: dict, cache: dict | None, sizes: dict | None) -> None:
    print()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['threads']} threads), device {args.device}; load average {machine['load_before']} "
          f"before, {machine['load_after']} after")
    print(f"run: {args.run} (cached/online) vs scratch (plain); batch {bs}; median of {args.steps} steps "
          f"after {args.warmup} warm-up, variants interleaved")
    print()
    w = max([8] + [len(n) for n in rows])
    hdr = (f"| {'variant':<{w}} | {'samples/s':>9} | {'ms/step':>8} | {'x plain':>7} | {'peak RSS MB':>11} "
           f"| {'CPU ms/step':>11} | {'x plain (CPU)':>13} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for n, r in rows.items():
        xp = f"{r['x_plain']:.2f}" if "x_plain" in r else "-"
        xc = f"{r['x_plain_cpu']:.2f}" if "x_plain_cpu" in r else "-"
        print(f"| {n:<{w}} | {r['samples_per_s']:>9.1f} | {r['ms_per_step']:>8.0f} | {xp:>7} | {r['peak_rss_mb']:>11.0f} "
              f"| {r['cpu_ms_per_step']:>11.0f} | {xc:>13} |")
    print("(x plain: median of the per-step paired ratios of wall time; CPU: the same on process CPU time, "
          "less sensitive to other tenants)")
    if "cached" in rows and "x_plain" in rows["cached"]:
        x = rows["cached"]["x_plain"]
        print(f"cached vs plain: {x:.2f}x (target <= 1.15x: {'met' if x <= 1.15 else 'NOT met'})")
    print()
    print("phases, median ms/step (forward = compute_features + compute_losses; optim = clip + AdamW + scheduler + logging)")
    print(f"| {'variant':<{w}} | " + " | ".join(f"{p:>8}" for p in PHASES) + " | "
          + " | ".join(f"{p:>13}" for p in SUBPHASES) + " |")
    for n, r in rows.items():
        print(f"| {n:<{w}} | " + " | ".join(f"{r['phases_ms'][p]:>8.0f}" for p in PHASES) + " | "
              + " | ".join(f"{r['forward_parts_ms'][p]:>13.0f}" for p in SUBPHASES) + " |")
    if args.device == "cuda":
        for n, r in rows.items():
            print(f"{n}: CUDA max allocated {r.get('cuda_max_allocated_mb', float('nan')):.0f} MB")
    if cache is not None:
        c = cache
        print()
        print(f"cache write ({c['images']} images x {c['views']} views + {c['captions']} captions = {c['samples']} "
              f"samples, median of {c['rounds']} rounds): teacher forward only {c['forward_samples_per_s']:.1f} "
              f"samples/s, cache write {c['write_samples_per_s']:.1f} samples/s -> {c['write_vs_forward']:.2f}x "
              f"(target >= 0.9x: {'met' if c['write_vs_forward'] >= 0.9 else 'NOT met'})")
        p = c["write_parts_s"]
        print(f"  write round: views {p['views']:.2f} s, teacher forward {p['forward']:.2f} s, "
              f"fp16 shards + commit {p['write']:.2f} s; peak RSS {c['peak_rss_mb']:.0f} MB")
    if sizes is not None:
        s = sizes
        print(f"cache size: {s['total_bytes'] / 1e6:.1f} MB for {s['rows']}: {s['bytes_per_image_view'] / 1e3:.1f} kB "
              f"per image view, {s['bytes_per_caption'] / 1e3:.2f} kB per caption -> "
              f"{s['bytes_per_training_sample'] / 1e3:.1f} kB read per training sample, "
              f"{s['bytes_per_train_image'] / 1e3:.1f} kB stored per training image")
        for side, keys in s["per_key"].items():
            print(f"  {side}: " + ", ".join(f"{k} {tuple(v['shape'])} {v['bytes_per_row'] / 1e3:.1f} kB"
                                           for k, v in keys.items()))
        if s.get("stage_timing"):
            t = s["stage_timing"]
            print(f"  cache_teacher stage's own timing ({t.get('device')}): forward {t.get('forward_samples_per_s')} "
                  f"samples/s, end-to-end {t.get('cache_samples_per_s')} samples/s")


def print_profile(args, profiles: dict) -> None:
    """Where the distillation step's extra time goes: per region, forward (own time) and backward
    (autograd nodes charged to the region that created them), ms per step under the profiler."""
    if not profiles:
        return
    names = list(profiles)
    regions = []
    for p in profiles.values():
        regions += [r for r in p["regions"] if r not in regions]
    order = ["batch", "targets", "student_image", "student_text", "ucmp", "intra_v", "intra_l", "level_weights",
             "compute_features"] + sorted(r for r in regions if r.startswith("loss:")) + ["losses", "optim",
             "accumulate_grad", "other"]
    # "forward" / "backward" are the step's phases: their own time is the finite-loss check (forward)
    # and the autograd engine outside the node evaluations (backward); shown as glue rows
    regions = [r for r in order if r in regions] + [r for r in regions if r not in order and r not in ("forward", "backward")]
    print(f"\nprofile ({args.profile_steps} steps each under torch.profiler, ms/step; fwd = the region's own time, "
          "bwd = autograd nodes created in it; compute_features / losses = their code outside the named parts; "
          "optim includes clip, AdamW and the float() of every logged term)")
    print(f"| {'region':<22} | " + " | ".join(f"{n + ' fwd':>10} | {n + ' bwd':>10}" for n in names) + " |")
    totals = {n: [0.0, 0.0] for n in names}
    for r in regions:
        cells = []
        for n in names:
            v = profiles[n]["regions"].get(r, {"forward_ms": 0.0, "backward_ms": 0.0})
            cells.append(f"{v['forward_ms']:>10.1f} | {v['backward_ms']:>10.1f}")
            totals[n][0] += v["forward_ms"]
            totals[n][1] += v["backward_ms"]
        print(f"| {r:<22} | " + " | ".join(cells) + " |")
    glue = {n: profiles[n]["regions"].get("forward", {}).get("forward_ms", 0.0) for n in names}
    print(f"| {'finite check, gather':<22} | " + " | ".join(f"{glue[n]:>10.1f} | {'':>10}" for n in names) + " |")
    print(f"| {'sum':<22} | " + " | ".join(f"{totals[n][0] + glue[n]:>10.1f} | {totals[n][1]:>10.1f}" for n in names) + " |")
    for n in names:
        p = profiles[n]
        ph = p["phases_ms"]
        print(f"{n}: {p['op_calls_per_step']:.0f} op calls/step; step {ph.get('total', 0):.0f} ms under the profiler "
              f"(batch {ph.get('batch', 0):.0f}, forward {ph.get('forward', 0):.0f}, backward {ph.get('backward', 0):.0f}, "
              f"optim {ph.get('optim', 0):.0f})")
    # the operators whose time grows most from plain to cached
    if "plain" in profiles and "cached" in profiles:
        a, b = profiles["plain"]["ops_per_step"], profiles["cached"]["ops_per_step"]
        diff = sorted(((b.get(k, {}).get("self_cpu_ms", 0.0) - a.get(k, {}).get("self_cpu_ms", 0.0), k) for k in set(a) | set(b)),
                      reverse=True)
        print("operators with the largest extra self CPU time, cached - plain (ms/step, calls/step plain -> cached):")
        for d, k in diff[:15]:
            print(f"  {d:+8.1f}  {k}  ({a.get(k, {}).get('calls', 0):.0f} -> {b.get(k, {}).get('calls', 0):.0f})")
    print(f"operator tables and chrome traces: {args.profile}/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--data", default="data/processed/emojiscenes")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--cache", default="data/cache/teacher")
    ap.add_argument("--run", default="stage3", choices=["stage1", "stage2", "stage3", "stage4a", "stage4b"],
                    help="which CMAPKD run's levels/phase to time (stage3: all levels, the costliest of 1-3)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of plain, cached, online, each optionally with what-if patches: "
                         + "; ".join(f"+{k}: {v}" for k, v in PATCHES.items()))
    ap.add_argument("--batch-size", type=int, default=0, help="default: params distill.batch_size")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    ap.add_argument("--cache-images", type=int, default=512)
    ap.add_argument("--cache-rounds", type=int, default=3)
    ap.add_argument("--no-cache-bench", action="store_true", help="skip the cache write benchmark")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="also torch.profile plain and cached; traces and op tables go to DIR")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v.split("+")[0] not in VARIANTS or not set(v.split("+")[1:]) <= set(PATCHES)]
    if bad:
        ap.error(f"unknown variants {bad}; known: {list(VARIANTS)}, each with optional +patches {sorted(PATCHES)}")
    for p in (args.data, args.teacher) + ((args.cache,) if any(v.startswith("cached") for v in args.variants) else ()):
        if not Path(p).exists():
            ap.error(f"{p} not found: run `dvc repro cache_teacher` first")

    import torch

    params = _load_params(args)
    bs = args.batch_size or params.distill.batch_size
    args.batch_size = bs
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": args.threads or torch.get_num_threads(), "python": platform.python_version(),
               "load_before": _loadavg()}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    ctx = mp.get_context("spawn")
    print(f"bench_distill: {args.variants}, run {args.run}, batch {bs}, {args.warmup}+{args.steps} steps, "
          f"device {args.device}, load average {machine['load_before']}", flush=True)
    res = run_steps(args, ctx)
    rows = summarize(args, res, bs)
    cache = None
    if not args.no_cache_bench:
        print(f"  cache write benchmark: {args.cache_images} images, {args.cache_rounds} rounds ...", flush=True)
        w = Worker(ctx, _cache_worker, "cache", args)
        cache = w.recv()
        w.join()
    sizes = cache_bytes(Path(args.cache)) if (Path(args.cache) / "identity.json").is_file() else None
    machine["load_after"] = _loadavg()
    print_report(args, machine, bs, rows, cache, sizes)
    if args.profile:
        print_profile(args, res["profiles"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "run": args.run, "batch_size": bs, "steps": args.steps, "warmup": args.warmup,
                   "device": args.device, "variants": rows, "cache_write": cache, "cache_size": sizes,
                   "profile": {n: {k: v for k, v in p.items() if k != "table"} for n, p in res["profiles"].items()}}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
