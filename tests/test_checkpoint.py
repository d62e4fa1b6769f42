"""The checkpoint format: exact round trip, atomic saves, and refusal of every bad file."""

import hashlib
import os
import pickle

import pytest
import torch
from hostile import RunsCodeWhenUnpickled

import certkd.io
from certkd.checkpoint import (
    check_compatible,
    file_sha256,
    load_checkpoint,
    load_model,
    make_checkpoint,
    provenance,
    save_checkpoint,
)
from certkd.data import dataset_info
from certkd.errors import CheckpointError
from certkd.models import create_model

DIGITS = dataset_info("digits")
KWARGS = {"width": 4, "linear": 16}




def trained_like_model() -> torch.nn.Module:
    """A cnn7 with BatchNorm whose running statistics are no longer the defaults."""
    torch.manual_seed(0)
    model = create_model("cnn7", DIGITS.num_classes, DIGITS.input_shape, DIGITS.mean, DIGITS.std, **KWARGS)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *DIGITS.input_shape))
    return model.eval()


@pytest.fixture
def model():
    return trained_like_model()


@pytest.fixture
def ckpt_path(tmp_path, model):
    ckpt = make_checkpoint(model, "cnn7", KWARGS, DIGITS, config={"method": "natural", "epochs": 2},
                           metrics={"clean_accuracy": 0.5}, provenance_info=provenance(seed=3))
    return save_checkpoint(ckpt, tmp_path / "ckpt.pt")


def test_round_trip_gives_identical_outputs_and_metadata(model, ckpt_path):
    loaded = load_checkpoint(ckpt_path)
    rebuilt = loaded.build_model()
    x = torch.rand(8, *DIGITS.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert not rebuilt.training
    assert (loaded.model_name, loaded.model_kwargs, loaded.dataset) == ("cnn7", KWARGS, "digits")
    assert loaded.input_shape == DIGITS.input_shape and loaded.num_classes == 10
    assert loaded.config == {"method": "natural", "epochs": 2} and loaded.metrics == {"clean_accuracy": 0.5}
    assert loaded.provenance["seed"] == 3 and loaded.provenance["torch_version"] == str(torch.__version__)
    assert loaded.summary()["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(load_model(ckpt_path)(x), model(x))


@pytest.mark.parametrize("crash_in, exception, raised", [("fsync", OSError, CheckpointError),
                                                         ("replace", KeyboardInterrupt, KeyboardInterrupt)])
def test_crash_during_save_keeps_previous_file_and_leaves_no_partial_file(tmp_path, model, ckpt_path,
                                                                          monkeypatch, crash_in, exception, raised):
    before = ckpt_path.read_bytes()
    other = make_checkpoint(create_model("mlp", 10, DIGITS.input_shape, hidden=[8]), "mlp", {"hidden": [8]}, DIGITS)

    def crash(*args, **kwargs):
        raise exception("simulated crash")

    monkeypatch.setattr(certkd.io.os, crash_in, crash)
    with pytest.raises(raised):
        save_checkpoint(other, ckpt_path)
    monkeypatch.undo()
    assert ckpt_path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(ckpt_path).model_name == "cnn7"


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_callable_is_refused_and_never_runs(tmp_path, ckpt_path, writer):
    content = torch.load(ckpt_path, weights_only=True)
    marker = tmp_path / "marker.txt"
    content["config"] = {"payload": RunsCodeWhenUnpickled(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(content, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(content, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()

    # control: the same kind of file really does run code when loaded without weights_only
    control_marker = tmp_path / "control.txt"
    content["config"] = {"payload": RunsCodeWhenUnpickled(control_marker)}
    torch.save(content, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, model, bad_value):
    with torch.no_grad():
        model[1][0].weight[0, 0, 0, 0] = bad_value
    path = save_checkpoint(make_checkpoint(model, "cnn7", KWARGS, DIGITS), tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_checkpoint(path)


def test_unknown_model_is_refused(tmp_path, model):
    ckpt = make_checkpoint(model, "cnn7", KWARGS, DIGITS)
    ckpt.model_name = "no_such_model"
    path = save_checkpoint(ckpt, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown model 'no_such_model'"):
        load_model(path)


@pytest.mark.parametrize("change", ["drop", "extra", "reshape", "kwargs"])
def test_state_dict_that_does_not_fit_the_model_is_refused(tmp_path, model, change):
    ckpt = make_checkpoint(model, "cnn7", KWARGS, DIGITS)
    if change == "drop":
        del ckpt.state_dict["1.0.weight"]
    elif change == "extra":
        ckpt.state_dict["1.99.weight"] = torch.zeros(3)
    elif change == "reshape":
        ckpt.state_dict["1.0.bias"] = torch.zeros(5)
    else:
        ckpt.model_kwargs = {"width": 8, "linear": 16}
    path = save_checkpoint(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="weights do not match model 'cnn7'"):
        load_model(path)


def test_corrupted_weight_bytes_are_detected(tmp_path, model, ckpt_path):
    data = bytearray(ckpt_path.read_bytes())
    weight_bytes = model[1][0].weight.detach().numpy().tobytes()
    start = bytes(data).find(weight_bytes)
    assert start > 0, "the test must find the weight's bytes in the file"
    data[start + 5] ^= 0xFF
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)


@pytest.mark.parametrize("kind, match", [
    ("missing", "no such checkpoint file"),
    ("directory", "not a regular file"),
    ("empty", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    ("text", "not a readable checkpoint"),
    ("tensor", "not a certkd checkpoint"),
    ("state_dict", "not a certkd checkpoint"),
    ("newer", "format 99 is not one this certkd supports"),
    ("bad_field", "malformed field"),
    ("normalization", "differs from the model's Normalize layer"),
])
def test_bad_files_raise_one_sentence(tmp_path, model, ckpt_path, kind, match):
    path = tmp_path / f"{kind}.pt"
    content = torch.load(ckpt_path, weights_only=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(ckpt_path.read_bytes()[:-100])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind in ("newer", "bad_field", "normalization"):
        if kind == "newer":
            content["format_version"] = 99
        elif kind == "bad_field":
            content["input_shape"] = ["one", 8, 8]
        else:
            content["normalization"] = {"mean": [0.5], "std": [0.5]}
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_normalization_recorded_is_the_models_own(tmp_path):
    model = create_model("mlp", 10, DIGITS.input_shape, mean=[0.0], std=[1.0], hidden=[8])
    ckpt = make_checkpoint(model, "mlp", {"hidden": [8]}, DIGITS)
    assert (ckpt.mean, ckpt.std) == ([0.0], [1.0])
    path = save_checkpoint(ckpt, tmp_path / "identity.pt")
    x = torch.rand(4, *DIGITS.input_shape)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model(x))


def test_provenance_records_teacher_sha256_and_compatibility_check(tmp_path, ckpt_path):
    prov = provenance(seed=1, teacher=ckpt_path)
    assert prov["teacher_sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest() == file_sha256(ckpt_path)
    teacher = load_checkpoint(ckpt_path)
    other = make_checkpoint(create_model("mlp", 3, DIGITS.input_shape, hidden=[8]), "mlp", {"hidden": [8]},
                            dataset_info("digits"))
    other.num_classes = 3
    check_compatible(teacher, load_checkpoint(ckpt_path))
    with pytest.raises(CheckpointError, match="do not fit each other"):
        check_compatible(teacher, other)
