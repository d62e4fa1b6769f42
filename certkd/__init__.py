"""certkd: certified-robustness analysis for knowledge distillation.

RobustBench-style entry points: ``load_model(ckpt)`` and ``benchmark(...)``.
"""

__version__ = "0.1.0"

from certkd.checkpoint import load_model  # noqa: E402

__all__ = ["__version__", "load_model"]
