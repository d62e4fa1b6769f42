"""Memory planning from one measured probe pass, and progress output that suits logs."""

import io

import pytest
import torch

from certkd.errors import CertkdError
from certkd.memory import HEADROOM, MIN_COST_BYTES, default_budget, measure_peak, parse_memory, plan_batch
from certkd.progress import Progress

MB = 1 << 20


@pytest.mark.parametrize(("text", "expected"), [("4G", 4 << 30), ("512M", 512 * MB), ("2.5GiB", int(2.5 * (1 << 30))),
                                                ("1e9", 10**9), ("300 mb", 300 * MB), (1234, 1234)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "4X"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(CertkdError, match="memory must be"):
        parse_memory(text)


def allocate(points: int, per_point: int = 48 * MB) -> float:
    """A pass whose transient peak is ``points * per_point`` bytes (touched, so resident)."""
    block = torch.ones(points * per_point // 4)
    return float(block[-1])


def test_measure_peak_sees_a_transient_allocation():
    with measure_peak() as used:
        allocate(2)
    assert 2 * 48 * MB * 0.9 <= used["bytes"] <= 2 * 48 * MB * 1.5


def test_plan_batch_sizes_passes_to_the_budget_from_the_measured_cost():
    plan = plan_batch(allocate, probe_size=2, cap=1000, budget_bytes=480 * MB)
    assert 48 * MB * 0.9 * HEADROOM <= plan.per_point_bytes <= 48 * MB * 1.5 * HEADROOM
    assert plan.batch_size == 480 * MB // plan.per_point_bytes and 5 <= plan.batch_size <= 9
    with measure_peak() as used:  # the chosen batch stays within the budget
        allocate(plan.batch_size)
    assert used["bytes"] <= 480 * MB
    assert plan_batch(allocate, 2, cap=3, budget_bytes=480 * MB).batch_size == 3
    tiny = plan_batch(lambda n: None, 2, cap=10**6, budget_bytes=64 * MB)
    assert tiny.per_point_bytes == MIN_COST_BYTES and tiny.batch_size == 64
    assert plan_batch(allocate, 1, cap=8, budget_bytes=MB).batch_size == 1  # never below one point
    assert "bound batch" in plan.describe() and plan.to_dict()["batch_size"] == plan.batch_size
    assert 0 < default_budget() < 1 << 50


@pytest.mark.usefixtures("lirpa")
def test_progress_in_a_log_is_one_line_per_stage_and_silent_when_disabled():
    log = io.StringIO()
    with Progress(3, "certify", "batch", stream=log) as bar:
        bar.note("bound batch 4")
        for _ in range(3):
            bar.update(status="crown")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[0] == "bound batch 4"
    assert len(lines) == 2 and lines[1].startswith("certify: 3/3 batches in ")
    quiet = io.StringIO()
    with Progress(3, "certify", "batch", enabled=False, stream=quiet) as bar:
        bar.note("x")
        bar.update(3)
    assert quiet.getvalue() == ""
    failed = io.StringIO()
    with pytest.raises(RuntimeError), Progress(2, "train", "epoch", stream=failed):
        raise RuntimeError("boom")
    assert failed.getvalue() == ""


@pytest.mark.usefixtures("lirpa")
def test_certified_gamma_passes_chunked_by_batch_size_give_the_same_bounds():
    from bounds.linearity import MARGIN, LinearityBounder
    from certkd.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 8, 8), hidden=[16]).eval()
    bounder = LinearityBounder(model, (1, 8, 8), "crown", "inf")
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    slope = torch.randn(5, 9, 1, 8, 8)
    whole = bounder.bounds(x, y, 0.05, MARGIN, slope)
    bounder.batch_size = 2
    chunked = bounder.bounds(x, y, 0.05, MARGIN, slope)
    for a, b in ((whole.lower, chunked.lower), (whole.upper, chunked.upper), (whole.center, chunked.center)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_max_memory_sets_the_recorded_bound_batch_and_bad_sizes_are_one_line(tmp_path):
    import json

    from click.testing import CliRunner

    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.cli import main
    from certkd.data import dataset_info
    from certkd.models import create_model

    meta = dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("cnn4", meta.num_classes, meta.input_shape, meta.mean, meta.std, width=4, linear=16)
    ckpt = save_checkpoint(make_checkpoint(model, "cnn4", {"width": 4, "linear": 16}, meta), tmp_path / "c.pt")
    runner = CliRunner()
    result = runner.invoke(main, ["certify", str(ckpt), "-n", "6", "--batch-size", "6", "--pgd-steps", "0",
                                  "--max-memory", "1M", "--no-progress", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "s.json").read_text())["provenance"]["memory_plan"]
    assert plan["batch_size"] == 1 and plan["budget_bytes"] == MB and plan["per_point_bytes"] >= MIN_COST_BYTES
    assert "bound batch 1 (measured" in result.output and "certify: " not in result.output
    bad = runner.invoke(main, ["certify", str(ckpt), "--max-memory", "lots"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--max-memory" in bad.output


class _FailsAboveEngine:
    """A stand-in engine whose relaxation fails (auto_LiRPA assertion) above ``limit``; refuses on ``refuse``."""

    def __init__(self, limit: float, refuse: bool = False) -> None:
        self.limit, self.refuse, self.device, self.batch_size, self.asked = limit, refuse, "cpu", None, []

    def margin_bounds(self, x, y, eps, norm, method):
        from bounds.errors import UnsupportedModelError

        self.asked.append(eps)
        if self.refuse:
            raise UnsupportedModelError("cannot bound this operator")
        if eps > self.limit:
            raise UnsupportedModelError("relaxation failed") from AssertionError("reciprocal of a negative")
        return torch.zeros(len(x))


@pytest.mark.usefixtures("lirpa")
def test_probe_steps_below_a_failing_relaxation_but_not_below_a_refusal():
    """A box-covering probe radius where the relaxation fails is probed lower; a refusal stays a refusal."""
    from bounds.errors import UnsupportedModelError
    from certkd.memory import plan_engine

    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    engine = _FailsAboveEngine(limit=0.1)
    plan = plan_engine(engine, x, y, 1.0, "inf", "crown", cap=8)
    assert engine.asked == [1.0, 0.25, 0.0625] and engine.batch_size == plan.batch_size >= 1
    with pytest.raises(UnsupportedModelError, match="cannot bound"):
        plan_engine(_FailsAboveEngine(limit=0.1, refuse=True), x, y, 1.0, "inf", "crown", cap=8)
