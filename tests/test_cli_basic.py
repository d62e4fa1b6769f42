"""The base CLI: `certkd info` on good and bad files (real subprocesses), `models`, `datasets`, `convert`."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hostile import RunsCodeWhenUnpickled

import certkd
from certkd.checkpoint import load_model, make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.data import dataset_info, list_datasets
from certkd.models import create_model, list_models

REPO = Path(__file__).resolve().parents[1]
DIGITS = dataset_info("digits")
KWARGS = {"width": 4}




def digits_model() -> torch.nn.Module:
    """A resnet_small with BatchNorm statistics that differ from the defaults."""
    torch.manual_seed(0)
    model = create_model("resnet_small", DIGITS.num_classes, DIGITS.input_shape, DIGITS.mean, DIGITS.std, **KWARGS)
    with torch.no_grad():
        model.train()(torch.rand(8, *DIGITS.input_shape))
    return model.eval()


def bad_files(folder: Path) -> dict[str, Path]:
    """One file per way a checkpoint can be wrong."""
    good = save_checkpoint(make_checkpoint(digits_model(), "resnet_small", KWARGS, DIGITS), folder / "good.pt")
    data = good.read_bytes()
    files = {"missing": folder / "missing.pt", "text": folder / "notes.pt", "tensor": folder / "tensor.pt",
             "truncated": folder / "truncated.pt", "corrupt": folder / "corrupt.pt", "callable": folder / "evil.pt"}
    files["text"].write_text("epoch 1 loss 0.3\n")
    torch.save(torch.zeros(4), files["tensor"])
    files["truncated"].write_bytes(data[: len(data) // 2])
    weight = torch.load(good, weights_only=True)["state_dict"]["1.stem.weight"].numpy().tobytes()
    corrupt = bytearray(data)
    corrupt[data.find(weight) + 3] ^= 0xFF
    files["corrupt"].write_bytes(bytes(corrupt))
    content = torch.load(good, weights_only=True)
    content["metrics"] = {"payload": RunsCodeWhenUnpickled(folder / "marker.txt")}
    torch.save(content, files["callable"])
    return files


EXPECTED = {"missing": "no such checkpoint file", "text": "not a readable checkpoint",
            "tensor": "not a certkd checkpoint", "truncated": "not a readable checkpoint",
            "corrupt": "weights are corrupt", "callable": "refused to load"}
THROUGH_SUBPROCESS = ("missing", "text", "truncated", "corrupt")
"""Each subprocess pays torch's import (~2 s of CPU); the other kinds run in-process through the same group."""


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_files")
    return bad_files(folder), folder


@pytest.fixture(scope="module")
def subprocess_results(bad_checkpoints):
    """Run the `python -m certkd info BAD_FILE` processes (and --help) at once."""
    files, folder = bad_checkpoints
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    commands = {kind: ["info", str(files[kind])] for kind in THROUGH_SUBPROCESS}
    commands["help"] = ["--help"]
    procs = {kind: subprocess.Popen([sys.executable, "-m", "certkd", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=folder)
             for kind, args in commands.items()}
    return {kind: (*proc.communicate(timeout=300), proc.returncode) for kind, proc in procs.items()}


def assert_one_line_error(code: int, out: str, err: str, path: Path, expected: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("certkd: error: ") and str(path) in lines[0]
    assert expected in lines[0]


@pytest.mark.parametrize("kind", THROUGH_SUBPROCESS)
def test_bad_checkpoint_gives_exit_2_and_one_line_in_a_real_process(subprocess_results, bad_checkpoints, kind):
    out, err, code = subprocess_results[kind]
    assert_one_line_error(code, out, err, bad_checkpoints[0][kind], EXPECTED[kind])


@pytest.mark.parametrize("kind", ["tensor", "callable"])
def test_bad_checkpoint_gives_exit_2_and_one_line(bad_checkpoints, kind):
    files, folder = bad_checkpoints
    result = CliRunner().invoke(main, ["info", str(files[kind])])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, files[kind], EXPECTED[kind])
    assert not (folder / "marker.txt").exists()


def test_python_m_certkd_help_and_version(subprocess_results):
    out, _, code = subprocess_results["help"]
    assert code == 0 and "Usage: certkd" in out
    for command in ("info", "models", "datasets", "convert"):
        assert command in out
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"certkd, version {importlib.metadata.version('certkd')}"  # pyproject.toml


@pytest.fixture
def runner():
    return CliRunner()


def test_info_shows_model_dataset_parameters_and_provenance(tmp_path, runner):
    model = digits_model()
    ckpt = make_checkpoint(model, "resnet_small", KWARGS, DIGITS, config={"method": "pgd-at", "epochs": 3},
                           metrics={"clean_accuracy": 0.875})
    path = save_checkpoint(ckpt, tmp_path / "teacher.pt")
    n_params = sum(p.numel() for p in model.parameters())
    result = runner.invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    for text in ("resnet_small", '{"width": 4}', f"{n_params:,} parameters", "digits", "(1, 8, 8)", "10 classes",
                 "method=pgd-at", "clean_accuracy=0.875", "torch_version="):
        assert text in result.stdout
    result = runner.invoke(main, ["info", "--json", str(path)])
    summary = json.loads(result.stdout)
    assert summary["parameters"] == n_params and summary["model"] == {
        "name": "resnet_small", "kwargs": KWARGS, "provider": {"package": "certkd", "version": certkd.__version__}}
    assert summary["file"]["bytes"] == path.stat().st_size and summary["metrics"] == {"clean_accuracy": 0.875}


def test_models_and_datasets_list_the_registries(runner):
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list_models()
    assert {"mlp", "cnn4", "cnn7", "resnet18", "resnet_small", "wide_resnet", "mobilenet_v2", "vit"} <= set(listed)
    result = runner.invoke(main, ["datasets"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == list_datasets()
    assert "3x32x32" in result.stdout and "1x8x8" in result.stdout


@pytest.mark.parametrize("fmt", ["pt-nested", "pt", "safetensors"])
def test_convert_prefixed_body_weights_reproduces_outputs(tmp_path, runner, fmt):
    model = digits_model()
    body = {f"module.{k}": v for k, v in model[1].state_dict().items()}
    if fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        weights = tmp_path / "external.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in body.items()}, str(weights))
    else:
        weights = tmp_path / "external.pt"
        torch.save({"state_dict": body, "epoch": 7} if fmt == "pt-nested" else body, weights)
    out = tmp_path / "converted.pt"
    result = runner.invoke(main, ["convert", "--arch", "resnet_small", "--arch-kwargs", json.dumps(KWARGS),
                                  "--dataset", "digits", "--weights", str(weights), "--strip-prefix", "module.",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    x = torch.rand(6, *DIGITS.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_model(out)(x), model(x))


def test_convert_identity_normalization_for_raw_input_weights(tmp_path, runner):
    model = create_model("mlp", 10, DIGITS.input_shape, hidden=[8])  # trained on raw [0, 1] inputs
    torch.save(model[1].state_dict(), tmp_path / "raw.pt")
    out = tmp_path / "converted.pt"
    result = runner.invoke(main, ["convert", "--arch", "mlp", "--arch-kwargs", '{"hidden": [8]}', "--dataset",
                                  "digits", "--weights", str(tmp_path / "raw.pt"), "--normalization", "identity",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    x = torch.rand(4, *DIGITS.input_shape)
    with torch.no_grad():
        assert torch.equal(load_model(out)(x), model(x))


@pytest.mark.parametrize("defect, expected", [
    ("missing", "missing keys fc.weight, fc.bias"),
    ("unexpected", "unexpected keys extra.weight"),
    ("shape", "shape mismatches (weights vs model) fc.bias (3,) vs (10,)"),
    ("prefix", "try --strip-prefix module."),
    ("kwargs", "shape mismatches"),
])
def test_convert_reports_keys_that_do_not_fit(tmp_path, runner, defect, expected):
    body = dict(digits_model()[1].state_dict())
    strip = ["--strip-prefix", "module."]
    kwargs = KWARGS
    if defect == "missing":
        del body["fc.weight"], body["fc.bias"]
    elif defect == "unexpected":
        body["extra.weight"] = torch.zeros(2)
    elif defect == "shape":
        body["fc.bias"] = torch.zeros(3)
    elif defect == "prefix":
        strip = []
    else:
        kwargs = {"width": 8}
    torch.save({f"module.{k}": v for k, v in body.items()}, tmp_path / "external.pt")
    out = tmp_path / "converted.pt"
    result = runner.invoke(main, ["convert", "--arch", "resnet_small", "--arch-kwargs", json.dumps(kwargs),
                                  "--dataset", "digits", "--weights", str(tmp_path / "external.pt"), *strip,
                                  "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("error,code", [("Refused", 3), ("RunFailed", 1), ("DataError", 2)])
def test_exit_codes_tell_refusal_failure_and_bad_input_apart(error, code):
    import click

    from certkd import errors

    @click.command("raise-it")
    def raise_it() -> None:
        raise getattr(errors, error)("what went wrong")

    main.add_command(raise_it)
    try:
        result = CliRunner().invoke(main, ["raise-it"])
    finally:
        main.commands.pop("raise-it")
    assert result.exit_code == code
    assert result.stderr.strip() == "certkd: error: what went wrong"
    assert "Exit codes:" in CliRunner().invoke(main, ["--help"]).output


def test_ablate_help_lists_every_registered_method_and_parameter():
    """``ablate --help`` is generated from the registries: a method registered now appears in it."""
    import certkd.cli.ablate as ablate_cli
    from certkd.certification.methods import (
        ESTIMATE,
        METHODS,
        MODEL,
        CertifyOptions,
        MethodOutput,
        register_method,
    )

    @register_method("always-robust", ESTIMATE, MODEL, "a test method")
    def _always(ctx, x, y, eps, radius, generator):
        return MethodOutput(robust=torch.ones(len(y), len(eps), dtype=torch.bool))

    try:
        help_text = " ".join(ablate_cli._registries().split())
    finally:
        METHODS._entries.pop("always-robust")
    for name in [*METHODS.names(), "always-robust"]:
        assert f"{name} (" in help_text, name
    for name in CertifyOptions.names():
        assert name in help_text, name
    assert "Methods (study key" in " ".join(CliRunner().invoke(main, ["ablate", "--help"]).output.split())
