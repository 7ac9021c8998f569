"""Parameter and FLOP counts of a linear layer; latency bookkeeping."""

import torch
from torch import nn

from cmapkd.eval.efficiency import count_flops, count_params, measure_latency


def test_params_and_flops_of_linear():
    layer = nn.Linear(32, 10)
    assert count_params(layer) == 32 * 10 + 10
    layer.bias.requires_grad_(False)
    assert count_params(layer, trainable_only=True) == 32 * 10
    flops = count_flops(layer, torch.randn(8, 32))
    assert flops.total == 2 * 32 * 10 * 8  # 2 FLOPs per multiply-add; the bias is not counted
    assert flops.batch_size == 8 and flops.per_item == 2 * 32 * 10


def test_latency_reports_median_and_device():
    layer = nn.Linear(64, 64)
    x = torch.randn(16, 64)
    r = measure_latency(layer, (x,), warmup=2, repeats=5)
    assert r.median_ms > 0 and r.throughput > 0
    assert r.device == "cpu" and r.num_threads == torch.get_num_threads()
    assert len(r.times_ms) == 5 and r.batch_size == 16
    assert abs(r.throughput - 16 / (r.median_ms / 1e3)) < 1e-6 * r.throughput
    assert set(r.as_dict()) >= {"median_ms", "throughput", "device", "num_threads"}
