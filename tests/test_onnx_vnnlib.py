"""ONNX models and VNN-LIB queries: round trips, the reader on benchmark-style files, benchmark folders.

scripts/setup.sh installs the onnx extra, so these tests run in CI (no skip).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bounds.certify import BoundEngine
from certkd.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.commands.compare import CompareJob, reuse_records
from certkd.data import dataset_info, load_dataset
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.onnx_io import convert_onnx, export_onnx, onnx_forward, read_onnx, session_of
from certkd.planted import fit_classifier, planted_folder
from certkd.queries import export_queries, import_results
from certkd.runs import read_log
from certkd.verify import VerifyOptions, read_results, run_instances, verify_instance
from certkd.vnnlib import parse_vnnlib, read_vnnlib, robustness_spec, write_vnnlib

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry mlp (32 hidden units) trained briefly on digits, saved as a certkd checkpoint."""
    torch.manual_seed(0)
    meta = dataset_info("digits")
    data = load_dataset("digits", "train", None)
    x, y = data.batch(list(range(len(data))))
    model = fit_classifier(create_model("mlp", num_classes=10, input_shape=meta.input_shape, hidden=[32]), x, y, 60)
    path = tmp_path_factory.mktemp("onnx") / "mlp.ckpt.pt"
    save_checkpoint(make_checkpoint(model, "mlp", {"hidden": [32]}, meta), path)
    return path


def _digits_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", "test", None)
    return data.batch(list(range(n)))


# --------------------------------------------------------------------------- models in

def test_registry_model_round_trip_same_outputs_and_certified_accuracy(digits_mlp: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(digits_mlp)
    model = ckpt.build_model()
    export_onnx(model, ckpt.input_shape, tmp_path / "mlp.onnx")
    back = convert_onnx(tmp_path / "mlp.onnx", "digits")
    save_checkpoint(back, tmp_path / "back.ckpt.pt")
    loaded = load_checkpoint(tmp_path / "back.ckpt.pt")
    assert loaded.provenance["onnx_sha256"] == back.provenance["onnx_sha256"] and len(back.provenance["onnx_sha256"]) == 64
    rebuilt = loaded.build_model()
    x, y = _digits_test(40)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    certified = [BoundEngine(m, ckpt.input_shape).margin_bounds(x, y, 0.03).certified for m in (model, rebuilt)]
    assert 0 < int(certified[0].sum()) < len(x)  # the comparison is not vacuous
    assert torch.equal(certified[0], certified[1])


def test_hand_written_conv_net_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    export_onnx(net, (1, 8, 8), tmp_path / "conv.onnx")
    imp = read_onnx(tmp_path / "conv.onnx")
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(imp.model(x), net(x), atol=1e-5)
    assert [s["type"] for s in imp.layers][:3] == ["conv2d", "relu", "maxpool2d"]


def _matmul_net(path: Path, shape: list[int]) -> None:
    """A VNN-COMP-style net: (x - 0.3) / 0.5, Flatten, MatMul + Add, Relu, MatMul (no Gemm)."""
    rng = np.random.default_rng(0)
    d = int(np.prod(shape[1:]))
    w1, b1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((d, 8), (8,), (8, 3)))
    nodes = [helper.make_node("Sub", ["X", "m"], ["s"]), helper.make_node("Div", ["s", "sd"], ["n"]),
             helper.make_node("Flatten", ["n"], ["f"]), helper.make_node("MatMul", ["f", "W1"], ["h"]),
             helper.make_node("Add", ["h", "B1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["Y"])]
    inits = [numpy_helper.from_array(v, name) for v, name in
             ((w1, "W1"), (b1, "B1"), (w2, "W2"), (np.array(0.3, np.float32), "m"), (np.array([0.5], np.float32), "sd"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_input_range_gets_an_exact_affine_first_layer(tmp_path: Path) -> None:
    _matmul_net(tmp_path / "mm.onnx", [1, 5])
    ckpt = convert_onnx(tmp_path / "mm.onnx", input_range=(-1.0, 2.0))
    assert ckpt.config["input_affine"] == {"lower": -1.0, "upper": 2.0}
    assert ckpt.input_shape == (5, 1, 1) and ckpt.model_kwargs["layers"][0]["type"] == "affine"
    model = ckpt.build_model()
    u = torch.rand(6, 5, 1, 1)
    session = session_of((tmp_path / "mm.onnx").read_bytes(), onnx_ort())
    expected = onnx_forward(session, "X", (-1.0 + 3.0 * u).reshape(6, 5))
    with torch.no_grad():
        assert torch.allclose(model(u), expected, atol=1e-5)


def onnx_ort():  # type: ignore[no-untyped-def]
    import onnxruntime

    return onnxruntime


def test_unsupported_graph_is_one_sentence(tmp_path: Path) -> None:
    node = helper.make_node("Transpose", ["X"], ["Y"], perm=[0, 2, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "t.onnx"))
    with pytest.raises(CertkdError, match="operator Transpose"):
        read_onnx(tmp_path / "t.onnx")


def test_without_the_extra_one_line_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    result = CliRunner().invoke(main, ["convert", "--onnx", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "c.pt")])
    assert result.exit_code == 2
    assert "certkd[onnx]" in result.output and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- VNN-LIB

def test_written_query_reads_back_the_same(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 3)
    spec = robustness_spec(x, 0.05, 2, 4)
    back = read_vnnlib(write_vnnlib(tmp_path / "q.vnnlib", spec, comment="point 0\nlabel 2"))
    assert back.num_inputs == 9 and back.num_outputs == 4 and len(back.cases) == 1
    case, orig = back.cases[0], spec.cases[0]
    assert torch.equal(case.lower, orig.lower) and torch.equal(case.upper, orig.upper)
    assert [cl.A.tolist() for cl in case.clauses] == [cl.A.tolist() for cl in orig.clauses]
    assert [cl.b.tolist() for cl in case.clauses] == [cl.b.tolist() for cl in orig.clauses]
    c, d, rows = back.matrix()
    assert c.tolist() == [[-1, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]] and d.tolist() == [0, 0, 0]
    assert rows.tolist() == [0, 1, 2]


BOX = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n" + "".join(
    f"(declare-const Y_{j} Real)\n" for j in range(3))
BOUNDS = "(assert (<= X_0 0.5))\n(assert (>= X_0 -0.5))\n(assert (<= X_1 1))\n(assert (>= X_1 0))\n"


def test_benchmark_style_and_of_asserts_is_one_clause() -> None:
    # ACAS Xu property 3 style: several top-level asserts on the outputs are one conjunction
    spec = parse_vnnlib(BOX + BOUNDS + "(assert (<= Y_0 Y_1))\n(assert (<= Y_0 Y_2))\n")
    (case,) = spec.cases
    assert case.lower.tolist() == [-0.5, 0.0] and case.upper.tolist() == [0.5, 1.0]
    (clause,) = case.clauses
    assert clause.A.tolist() == [[1, -1, 0], [1, 0, -1]] and clause.b.tolist() == [0, 0]


def test_benchmark_style_or_of_ands_with_both_comparisons_and_constants() -> None:
    text = BOX + BOUNDS + """; an OR of ANDs, >= and <= forms, sums and products by numbers
(assert (or
    (and (>= Y_0 0.5) (<= Y_1 -0.25))
    (and (>= (+ Y_0 (* 2.0 Y_1)) Y_2))
    (and (<= (- Y_2 Y_1) 3))
))"""
    (case,) = parse_vnnlib(text).cases
    assert [cl.A.tolist() for cl in case.clauses] == [[[-1, 0, 0], [0, 1, 0]], [[-1, -2, 1]], [[0, -1, 1]]]
    assert [cl.b.tolist() for cl in case.clauses] == [[-0.5, -0.25], [0.0], [3.0]]
    c, d, rows = parse_vnnlib(text).matrix()
    assert c.shape == (4, 3) and rows.tolist() == [0, 0, 1, 2]


def test_input_disjunction_gives_one_case_per_box() -> None:
    text = BOX + """(assert (or
    (and (>= X_0 0) (<= X_0 0.5) (>= X_1 0) (<= X_1 1) (>= Y_0 Y_1))
    (and (>= X_0 0.5) (<= X_0 1) (>= X_1 0) (<= X_1 1) (>= Y_1 Y_0))))"""
    spec = parse_vnnlib(text)
    assert [c.lower.tolist() for c in spec.cases] == [[0, 0], [0.5, 0]]
    assert [c.clauses[0].A.tolist() for c in spec.cases] == [[[-1, 1, 0]], [[1, -1, 0]]]


@pytest.mark.parametrize("text, message", [
    (BOX + BOUNDS + "(assert (<= Y_0 Y_1)", "unbalanced"),
    (BOX + BOUNDS + "(assert (<= Y_7 Y_1))", "not a declared variable"),
    (BOX + BOUNDS + "(assert (<= (* Y_0 Y_1) 0))", "not linear"),
    (BOX + "(assert (<= X_0 1))(assert (<= Y_0 Y_1))", "no lower or upper bound"),
    (BOX + BOUNDS + "(assert (<= (+ X_0 Y_0) 0))", "mixing"),
])
def test_bad_queries_are_one_sentence(text: str, message: str) -> None:
    with pytest.raises(CertkdError, match=message):
        parse_vnnlib(text)


# --------------------------------------------------------------------------- benchmark folders

def _planted_folder(folder: Path) -> tuple[list[str], list[str]]:
    """``certkd.planted.planted_folder`` (which checks by a forward pass that each plant is real)."""
    bench = planted_folder(folder)
    return bench.planted, bench.clean


def test_benchmark_folder_planted_counterexamples_never_unsat(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    planted, clean = _planted_folder(bench)
    out = tmp_path / "out"
    summary = run_instances(bench / "instances.csv", out, VerifyOptions(), expected=bench / "expected_results.csv")
    answers = {v: r for (_, v), r in read_results(out / "results.csv").items()}
    assert all(answers[n] in ("sat", "unknown") for n in planted)
    assert all(answers[n] == "unsat" for n in clean)
    assert summary["soundness_failures"] == [] and summary["verified"] == len(clean)
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert [len(r) for r in rows] == [6] * 4 and rows[0][:3] == ["bench", "planted.onnx", "planted_a.vnnlib"]
    # every sat answer's counterexample lies in the box and satisfies the query on the ONNX model itself
    _, records = read_log(out / "records.jsonl")
    session = session_of((bench / "planted.onnx").read_bytes(), onnx_ort())
    for r in records:
        if r["result"] != "sat":
            continue
        values = dict(line.strip("() \n").split() for line in (out / r["counterexample"]).read_text().splitlines()[1:])
        xs = torch.tensor([float(values[f"X_{i}"]) for i in range(4)])
        case = read_vnnlib(bench / r["vnnlib"]).cases[0]
        assert bool(((xs.double() >= case.lower) & (xs.double() <= case.upper)).all())
        y = onnx_forward(session, "input", xs.view(1, 4)).flatten()
        assert y[1] >= y[0]
    assert any(r["result"] == "sat" for r in records)
    # resumable: a rerun with --resume computes nothing new and gives the same results
    before = (out / "results.csv").read_text()
    again = run_instances(bench / "instances.csv", out, VerifyOptions(), resume=True)
    assert (out / "results.csv").read_text().split("\n")[0].split(",")[4] == before.split("\n")[0].split(",")[4]
    assert again["instances"] == 4 and len(read_log(out / "records.jsonl")[1]) == 4
    with pytest.raises(CertkdError, match="different run"):
        run_instances(bench / "instances.csv", out, VerifyOptions(method="ibp"), resume=True)


def test_expected_sat_answered_unsat_is_a_soundness_failure(tmp_path: Path) -> None:
    from certkd.verify import summarize

    records = [{"onnx": "a.onnx", "vnnlib": "p.vnnlib", "result": "unsat", "prepare_time": 0.0, "run_time": 1.0,
                "counterexample": None}]
    summary = summarize(records, {("a.onnx", "p.vnnlib"): "sat"})
    assert summary["soundness_failures"] and summary["verified"] == 1


def test_cli_single_query_and_bad_input(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    _planted_folder(bench)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(bench / "planted.onnx"), str(bench / "planted_b.vnnlib"),
                              "--out", str(tmp_path / "ce.txt")])
    assert ok.exit_code == 0 and ok.output.startswith(("sat", "unknown"))
    if ok.output.startswith("sat"):
        assert (tmp_path / "ce.txt").read_text().startswith("sat\n((X_0 ")
    write_vnnlib(tmp_path / "five.vnnlib", robustness_spec(torch.rand(5), 0.1, 0, 2))
    (tmp_path / "broken.vnnlib").write_text("(declare-const X_0 Real")
    write_vnnlib(bench / "five.vnnlib", robustness_spec(torch.rand(5), 0.1, 0, 2))
    (bench / "mismatch.csv").write_text("planted.onnx,clean_a.vnnlib,10\nplanted.onnx,five.vnnlib,10\n")
    for args, message in (([str(bench / "planted.onnx"), str(tmp_path / "five.vnnlib")], "5 inputs"),
                          ([str(bench / "planted.onnx"), str(tmp_path / "broken.vnnlib")], "unbalanced"),
                          ([str(tmp_path / "none.onnx"), str(bench / "clean_a.vnnlib")], "no such file"),
                          (["--instances", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")], "no such"),
                          (["--instances", str(bench / "mismatch.csv"), "--out", str(tmp_path / "o")], "takes 4")):
        bad = runner.invoke(main, ["verify", *args])
        assert bad.exit_code == 2, bad.output
        assert message in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before any work or output


# --------------------------------------------------------------------------- queries out, answers back

def test_export_queries_run_them_and_import_the_answers(digits_mlp: Path, tmp_path: Path) -> None:
    info = export_queries(digits_mlp, tmp_path / "q", [0.03], num_examples=6)
    assert (tmp_path / "q" / "model.onnx").is_file() and len(info["queries"]) >= 4
    lines = (tmp_path / "q" / "instances.csv").read_text().splitlines()
    assert len(lines) == len(info["queries"]) and lines[0].startswith("model.onnx,prop_")
    run_instances(tmp_path / "q" / "instances.csv", tmp_path / "r", VerifyOptions(attack_steps=10))
    counts = import_results(tmp_path / "r" / "results.csv", tmp_path / "q", tmp_path / "complete.jsonl")
    head, records = read_log(tmp_path / "complete.jsonl")
    assert head is not None and head["command"] == "certify" and len(records) == 6  # misclassified ones too
    # the queries ask what certify asks: unsat exactly where CROWN certifies the checkpoint's points
    ckpt = load_checkpoint(digits_mlp)
    x, y = _digits_test(6)
    crown = BoundEngine(ckpt.build_model(), ckpt.input_shape).margin_bounds(x, y, 0.03).certified
    assert {r["index"] for r in records if r["certified"]} == {i for i in range(6) if bool(crown[i])}
    assert counts.get("unsat", 0) == sum(r["certified"] for r in records)
    assert all(r["radius"] == (0.03 if r["certified"] else 0.0) for r in records)
    # compare takes them as the certified part's radii (the checkpoint's own points, checked by its header)
    reused = reuse_records(tmp_path / "complete.jsonl", digits_mlp, CompareJob(), "digits", "test", 6)
    assert {i for i, (radius, correct) in reused.items() if radius > 0 and correct} == \
        {r["index"] for r in records if r["certified"]}
    with pytest.raises(CertkdError, match="checkpoint_sha256"):
        reuse_records(tmp_path / "complete.jsonl", tmp_path / "q" / "model.onnx", CompareJob(), "digits", "test", 6)
    assert json.loads((tmp_path / "q" / "queries.json").read_text())["eps"] == [0.03]
    assert math.isclose(records[0]["eps"], 0.03)


def test_verify_instance_timeout(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    _planted_folder(bench)
    verdict = verify_instance(bench / "planted.onnx", bench / "clean_a.vnnlib", timeout=1e-3)
    assert verdict.result == "timeout"


def test_verify_box_outside_the_unit_range(tmp_path: Path) -> None:
    """Inputs in [-2, -1.5] (an ACAS Xu-like range): the affine first layer maps certkd's unit box onto them."""
    _matmul_net(tmp_path / "mm.onnx", [1, 5])
    session = session_of((tmp_path / "mm.onnx").read_bytes(), onnx_ort())
    centre = torch.full((1, 5), -1.75)
    y = onnx_forward(session, "X", centre).flatten()
    top = int(y.argmax())
    box = "".join(f"(declare-const X_{i} Real)\n" for i in range(5)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(3))
    r = 1e-4
    box += "".join(f"(assert (>= X_{i} {-1.75 - r}))\n(assert (<= X_{i} {-1.75 + r}))\n" for i in range(5))
    others = [j for j in range(3) if j != top]
    (tmp_path / "robust.vnnlib").write_text(box + "(assert (or " + " ".join(
        f"(and (>= Y_{j} Y_{top}))" for j in others) + "))\n")
    # the output the centre already satisfies: a counterexample exists (the centre itself)
    (tmp_path / "holds.vnnlib").write_text(box + f"(assert (<= Y_{others[0]} Y_{top}))\n")
    assert verify_instance(tmp_path / "mm.onnx", tmp_path / "robust.vnnlib").result == "unsat"
    verdict = verify_instance(tmp_path / "mm.onnx", tmp_path / "holds.vnnlib")
    assert verdict.result == "sat" and verdict.counterexample is not None
    xs = [float(line.split()[1].rstrip(")")) for line in verdict.counterexample.splitlines()[1:6]]
    assert all(-1.7501 <= v <= -1.7499 for v in xs)
