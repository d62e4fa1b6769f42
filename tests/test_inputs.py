"""Every input a user can pass gets one sentence: through ``bounds``, ``certkd.certify``/``compare`` and the CLI.

Models returning a tuple, dict, list or one score per example, bfloat16 models, float64
models (bounded as their float32 copy, with a note), non-numeric eps, a wrong
``input_shape``, a batch size of 0 and NaN pixels: a ``BoundsError``/``CertkdError`` of one
line in Python, exit code 2 with one line on stderr and no result file from the CLI.
A refused alpha-CROWN call leaves the engine usable; auto_LiRPA prints and logs nothing;
auto_LiRPA's own failures name the operator.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import per_margin_attack, registered_models
from torch import nn

import certkd
from bounds.attack import ApgdConfig, apgd_ensemble, min_margin, pgd
from bounds.certify import BoundEngine, certified_radius, margin_bounds
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.lipschitz import lipschitz_bound
from certkd.errors import USER_ERRORS

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py

SHAPE = (1, 8, 8)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


class MultiOutput(nn.Module):
    """What researchers return besides logits: features, a dict of heads, a list, a single score."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = mlp()

    def forward(self, x):
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, x.flatten(1)
        if self.kind == "dict":
            return {"logits": logits, "features": x.flatten(1)}
        if self.kind == "list":
            return [logits]
        return logits[:, 0]  # "score": one value per example


# family -> (model, a word the sentence must contain)
BAD_MODELS = {
    "tuple": (lambda: MultiOutput("tuple"), "model(x)[0]"),
    "dict": (lambda: MultiOutput("dict"), "model(x)['logits']"),
    "list": (lambda: MultiOutput("list"), "model(x)[0]"),
    "score": (lambda: MultiOutput("score"), "torch.stack([-s, s], dim=1)"),
    "bfloat16": (lambda: mlp().to(torch.bfloat16), "bfloat16"),
}


def points(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)), torch.arange(n) % 10


def assert_sentence(exc: BaseException, *words: str) -> None:
    text = str(exc)
    assert isinstance(exc, USER_ERRORS) and "\n" not in text and "Traceback" not in text, text
    for word in words:
        assert word in text, text


ENTRY_POINTS = {
    "engine": lambda m, x, y: BoundEngine(m, SHAPE).margin_bounds(x, y, 0.01, "inf", "crown"),
    "margin_bounds_ibp": lambda m, x, y: margin_bounds(m, x, y, 0.01, "inf", "ibp"),
    "certified_radius": lambda m, x, y: certified_radius(m, x, y, "inf", "crown"),
    "pgd": lambda m, x, y: pgd(m, x, y, 0.01, steps=2),
    "apgd": lambda m, x, y: apgd_ensemble(m, x, y, 0.01, config=ApgdConfig(steps=2)),
    "lipschitz": lambda m, x, y: lipschitz_bound(m, SHAPE),
    "certkd.certify": lambda m, x, y: certkd.certify(m, (x, y), ["crown"], [0.01], pgd_steps=2),
    "certkd.compare": lambda m, x, y: certkd.compare(m, mlp(), (x, y), "crown", eps=[0.01], rule={"n_boot": 20}),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("family", list(BAD_MODELS))
def test_bad_models_get_one_sentence(family, entry, capfd):
    make, word = BAD_MODELS[family]
    x, y = points()
    if family == "bfloat16" and entry in ("pgd", "apgd"):  # an estimate: attacked in the model's own precision
        assert ENTRY_POINTS[entry](make(), x, y).margin.dtype == torch.bfloat16
        return
    with pytest.raises(USER_ERRORS) as info:
        ENTRY_POINTS[entry](make(), x, y)
    assert_sentence(info.value, word)
    assert capfd.readouterr().err == ""


def test_float64_model_bounded_as_float32_copy_with_a_note():
    """A float64 model: bounded (its float32 copy, noted), the bounds below the float64 model's own per-margin attack."""
    model = mlp().double()
    x, y = points(6)
    y = model(x.double()).argmax(1)
    engine = BoundEngine(model, SHAPE)
    assert engine.notes and "float32 copy" in engine.notes[0]
    assert next(model.parameters()).dtype == torch.float64  # the user's model is not modified
    for method in ("ibp", "crown-ibp", "crown"):
        lower = engine.margin_bounds(x, y, 0.03, "inf", method).lower
        attack = per_margin_attack(model, x.double(), y, 0.03, "inf", steps=20, restarts=1)
        assert bool((lower.double() <= attack + 1e-5).all()), method
    assert pgd(model, x, y, 0.03, steps=3).margin.dtype == torch.float64
    assert math.isfinite(lipschitz_bound(model, SHAPE).logits)
    res = certkd.certify(model, (x, y), ["crown"], [0.01], pgd_steps=2)
    assert res.data["notes"] == engine.notes


@pytest.mark.parametrize("eps", ["0.1", None, [0.1, "a"], b"1"])
def test_non_numeric_eps(eps):
    model = mlp()
    x, y = points()
    for call in (lambda: margin_bounds(model, x, y, eps), lambda: pgd(model, x, y, eps, steps=1),
                 lambda: certkd.certify(model, (x, y), ["crown"], eps)):
        with pytest.raises(USER_ERRORS) as info:
            call()
        assert_sentence(info.value, "eps")


def test_wrong_input_shape():
    model = mlp()
    for call in (lambda: BoundEngine(model, (1, 8, 9)), lambda: lipschitz_bound(model, (1, 8, 9))):
        with pytest.raises(BoundsError) as info:
            call()
        assert_sentence(info.value, "(1, 8, 9)", "input_shape")
    with pytest.raises(BoundsError) as info:
        BoundEngine(model, "1x8x8")
    assert_sentence(info.value, "input_shape")


def test_batch_size_zero():
    x, y = points()
    for call in (lambda: BoundEngine(mlp(), SHAPE, batch_size=0),
                 lambda: certkd.certify(mlp(), (x, y), ["crown"], [0.01], batch_size=0)):
        with pytest.raises(USER_ERRORS) as info:
            call()
        assert_sentence(info.value, "batch")


def test_nan_pixels_are_named():
    model = mlp()
    x, y = points()
    x[2, 0, 3, 3] = math.nan
    engine = BoundEngine(model, SHAPE)
    for call in (lambda: engine.margin_bounds(x, y, 0.01), lambda: engine.certified_radius(x, y),
                 lambda: pgd(model, x, y, 0.01, steps=1),
                 lambda: apgd_ensemble(model, x, y, 0.01, config=ApgdConfig(steps=1)),
                 lambda: certkd.certify(model, (x, y), ["crown"], [0.01], pgd_steps=2)):
        with pytest.raises(BoundsError) as info:
            call()
        assert_sentence(info.value, "NaN", "example 2")


def test_engine_usable_after_a_failed_alpha_crown_call():
    """alpha-CROWN failing mid-optimization (a test double raises inside its loss) leaves auto_LiRPA's
    activations in their optimization stage: without the reset, CROWN and CROWN-IBP on another batch
    size then fail; with it they give exactly a fresh engine's bounds."""
    x, y = points(3)
    engine = BoundEngine(mlp(), SHAPE)
    opts = engine.bounded.bound_opts["optimize_bound_args"]
    original = opts["loss_reduction_func"]

    def failing(_value):
        raise AssertionError("alpha-CROWN fails mid-optimization")

    opts["loss_reduction_func"] = failing
    with pytest.raises(UnsupportedModelError) as info:
        engine.margin_bounds(x, y, 0.05, "inf", "alpha-crown")
    assert_sentence(info.value, "alpha-crown")
    opts["loss_reduction_func"] = original
    fresh = BoundEngine(mlp(), SHAPE)
    for method in ("crown", "crown-ibp", "alpha-crown"):
        got = engine.margin_bounds(x[:2], y[:2], 0.05, "inf", method).lower
        assert torch.allclose(got, fresh.margin_bounds(x[:2], y[:2], 0.05, "inf", method).lower, atol=1e-6), method


class MidLogSoftmax(nn.Module):
    """log-softmax inside the network (not at the head, where it is dropped): no relaxation in 0.3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.log_softmax(self.fc1(x.flatten(1)), dim=1))


class ReflectPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))).flatten(1))


@pytest.mark.parametrize("make, operator", [(MidLogSoftmax, "log-softmax"), (ReflectPad, "Pad")])
def test_refusals_name_the_operator_and_print_nothing(make, operator, capfd):
    """Where auto_LiRPA itself fails (its list of unsupported operations, a missing argument), the sentence names
    the operator, and auto_LiRPA's log lines (``auto_LiRPA.utils`` keeps its own level) reach no stream."""
    x, y = points()
    try:
        engine = BoundEngine(make(), SHAPE)
        for method in ("ibp", "crown"):
            engine.margin_bounds(x, y, 0.01, "inf", method)
    except UnsupportedModelError as exc:
        assert_sentence(exc, operator)
    else:
        pytest.skip(f"this auto_LiRPA bounds {make.__name__}")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def cli_checkpoints(tmp_path_factory):
    """Checkpoints of registry builders (registered while the module's tests run), case -> path."""
    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.data import load_dataset
    from certkd.models import create_model

    makers = {"tuple": lambda: MultiOutput("tuple"), "score": lambda: MultiOutput("score"),
              "bfloat16": lambda: mlp().to(torch.bfloat16), "float64": lambda: mlp().double()}
    info = load_dataset("digits", "test").info
    out = tmp_path_factory.mktemp("inputs")
    with registered_models({f"inputs_{case}": make for case, make in makers.items()}):
        yield {case: save_checkpoint(make_checkpoint(create_model(f"inputs_{case}", 10, SHAPE), f"inputs_{case}",
                                                     {}, info), out / f"{case}.pt")
               for case in makers}


def _certify(path, method: str, out, *extra: str):
    from certkd.cli import main

    return CliRunner().invoke(main, ["certify", str(path), "-n", "4", "--method", method, "--eps", "0.01",
                                     "--pgd-steps", "2", "--out", str(out), *extra])


@pytest.mark.parametrize("method", ["crown", "ibp", "pgd", "lipschitz"])
@pytest.mark.parametrize("case", ["tuple", "score", "bfloat16"])
def test_cli_bad_models_exit_2_one_line(case, method, cli_checkpoints, tmp_path):
    result = _certify(cli_checkpoints[case], method, tmp_path / "s.json")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "s.json").exists()


def test_cli_float64_model_certifies_with_a_note(cli_checkpoints, tmp_path):
    result = _certify(cli_checkpoints["float64"], "crown", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert "float32 copy" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "s.json").exists()


@pytest.mark.parametrize("eps", ["abc", "nan", "-1"])
def test_cli_bad_eps_exit_2(eps, cli_checkpoints, tmp_path):
    from certkd.cli import main

    result = CliRunner().invoke(main, ["certify", str(cli_checkpoints["float64"]), "-n", "2", "--eps", eps,
                                       "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "s.json").exists()


def test_clean_margins_agree_after_float32_cast():
    """The float32 copy of a float64 model predicts like it on ordinary inputs (what the note promises)."""
    model = mlp().double()
    x, _ = points(16)
    copy32 = BoundEngine(model, SHAPE).view
    with torch.no_grad():
        y = model(x.double()).argmax(1)
        assert torch.allclose(min_margin(copy32(x).double(), y), min_margin(model(x.double()), y), atol=1e-5)


@pytest.mark.parametrize("case, word", [("uint8", "x.float() / 255"), ("labels_2d", "shape (B,)"),
                                        ("fractional_labels", "integers"), ("nan", "NaN")])
def test_api_tensor_data_checked(case, word):
    x, y = points()
    data = {"uint8": ((x * 255).to(torch.uint8), y), "labels_2d": (x, y.view(-1, 1)),
            "fractional_labels": (x, y + 0.5), "nan": (x.masked_fill(x > 0.98, math.nan), y)}[case]
    for call in (lambda: certkd.certify(mlp(), data, ["lipschitz"], [0.01], pgd_steps=0),
                 lambda: certkd.compare(mlp(), mlp(), data, "lipschitz", eps=[0.01], rule={"n_boot": 20})):
        with pytest.raises(USER_ERRORS) as info:
            call()
        assert_sentence(info.value, word)


def test_api_float64_data_and_float_labels_accepted():
    x, y = points()
    res = certkd.certify(mlp(), (x.double(), y.float()), ["crown"], [0.01], pgd_steps=2)
    assert res.data["num_examples"] == 4
