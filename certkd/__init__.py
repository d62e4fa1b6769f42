"""certkd: certified-robustness analysis for knowledge distillation.

The Python API, RobustBench style (``certkd.api``)::

    import certkd
    model = certkd.load_model("student.pt")
    result = certkd.certify(model, certkd.load_dataset("digits"), ["crown"], [0.01], num_examples=100)
    print(result.summary()); frame = result.to_frame()
    verdict = certkd.compare("student.pt", "teacher.pt", "digits", num_examples=100,
                             rule=certkd.CompareRule(ci_level=0.9)).verdict
    certkd.benchmark(model, "digits", eps=[2 / 255])

The commands (``certkd --help``) run the same code; docs/theory.md fixes every formula.
"""

__version__ = "0.1.0"

from certkd.api import (  # noqa: E402
    CertifyResult,
    CompareResult,
    CompareRule,
    benchmark,
    certify,
    compare,
    load_dataset,
    load_model,
)

__all__ = ["CertifyResult", "CompareResult", "CompareRule", "__version__", "benchmark", "certify", "compare", "load_dataset",
           "load_model"]
