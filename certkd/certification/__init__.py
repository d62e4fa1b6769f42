"""Certification of one model: methods (``methods``), what decides and holds the records
(``records``) and their summary (``summary``); theory.md §2. The run is ``certkd certify``'s
(``certkd.commands.certify``).

Reading order for a newcomer: ``methods`` (how each method judges a batch; a new
method is one decorated function), ``records`` (one JSON record per
``(index, method, eps)``), ``summary``, then the run (``certkd.commands.certify``).
"""

from certkd.certification import apgd as _apgd  # noqa: F401  (registers the apgd method)
from certkd.certification.methods import (
    CERTIFIED,
    ESTIMATE,
    LEGEND,
    METHODS,
    MODEL,
    NORMS,
    PGD,
    SMOOTHED,
    CertifyOptions,
    Context,
    Method,
    MethodOutput,
    certify_methods,
    check_norm,
    evaluate_batch,
    get_method,
    prepare_methods,
    register_method,
)
from certkd.certification.records import (
    COMMAND,
    CertifyJob,
    canonical_order,
    expected_keys,
    method_records,
    parse_eps_list,
    read_per_example,
    record_key,
)
from certkd.certification.summary import eps_label, format_summary, summarize

__all__ = ["CERTIFIED", "COMMAND", "ESTIMATE", "LEGEND", "METHODS", "MODEL", "NORMS", "PGD",
           "SMOOTHED", "CertifyJob", "CertifyOptions", "Context", "Method", "MethodOutput", "canonical_order",
           "certify_methods", "check_norm", "eps_label", "evaluate_batch", "expected_keys", "format_summary",
           "get_method", "method_records", "parse_eps_list", "prepare_methods", "read_per_example", "record_key",
           "register_method", "summarize"]
