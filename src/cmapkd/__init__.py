"""CMAPKD: Adaptive Pyramid-Based Cross-Modal Knowledge Distillation for Vision-Language Models."""

__version__ = "0.1.0"
