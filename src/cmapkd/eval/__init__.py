"""Evaluation: retrieval, zero-shot, VQA probe, efficiency.

Modules (import what you need; nothing is imported here): `retrieval` (recall@k, CLIP_benchmark
protocol), `zeroshot` (template-averaged class weights, top-1/top-5/mean per-class recall),
`vqa` (official VQA accuracy and the answer-head probe), `efficiency` (params, FLOPs, latency).
Protocols: docs/evaluation.md.
"""
