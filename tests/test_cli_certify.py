"""``certkd certify`` / ``certkd merge``: records, summary, resume, shards, bad input, soundness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bounds.attack import pgd
from certkd.certification import read_per_example
from certkd.checkpoint import load_model, make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.data import DatasetInfo, load_dataset
from certkd.models import create_model

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"index", "label", "pred", "method", "kind", "norm", "eps", "certified", "margin_lb"}




pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def ckpts(digits_trio, tmp_path_factory) -> dict[str, Path]:
    """The PGD-AT cnn4 teacher of ``digits_trio`` and a briefly trained small ViT on digits."""
    data = load_dataset("digits", "train")
    kwargs = {"dim": 16, "depth": 1, "heads": 2}
    torch.manual_seed(0)
    vit = create_model("vit", 10, data.info.input_shape, data.info.mean, data.info.std, **kwargs)
    opt = torch.optim.Adam(vit.parameters(), lr=3e-3)
    for step in range(20):
        batch = slice(64 * step, 64 * step + 64)
        loss = torch.nn.functional.cross_entropy(vit(data.x[batch]), data.y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "vit.pt"
    save_checkpoint(make_checkpoint(vit.eval(), "vit", kwargs, data.info), path)
    return {"cnn4": digits_trio.teacher_path, "vit": path}


def certify(*args: str | Path) -> tuple[int, str, str]:
    """Run ``certkd certify`` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, ["certify", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _without_provenance(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "provenance"}


# --------------------------------------------------------------------------- contents and soundness

@pytest.fixture(scope="module")
def l2_run(ckpts, tmp_path_factory):
    """crown + lipschitz with radii under L2 on 24 points."""
    out = tmp_path_factory.mktemp("l2")
    code, stdout, stderr = certify(ckpts["cnn4"], "-n", 24, "--batch-size", 12, "--norm", "2",
                                   "--eps", "0.1,0.3", "--method", "crown", "--method", "lipschitz", "--radius",
                                   "--out", out / "s.json", "--per-example", out / "r.jsonl")
    assert code == 0, stderr
    config, records = read_per_example(out / "r.jsonl")
    return {"stdout": stdout, "config": config, "records": records,
            "summary": json.loads((out / "s.json").read_text())}


@pytest.mark.usefixtures("lirpa")
def test_records_have_fields_and_kinds(l2_run):
    records, config = l2_run["records"], l2_run["config"]
    assert config["methods"] == ["crown", "lipschitz"] and config["norm"] == "2" and config["radius"] is True
    assert len(records) == 24 * 3 * 2  # (pgd, crown, lipschitz) x 2 eps
    kinds = {"pgd": "estimate", "crown": "certified", "lipschitz": "certified"}
    for r in records:
        assert REQUIRED <= set(r), r
        assert r["kind"] == kinds[r["method"]]
        assert r["norm"] == "2"
        assert r["certified"] == (r["robust"] and r["kind"] == "certified")  # estimates are never "certified"
        if r["certified"]:
            assert r["pred"] == r["label"] and r["margin_lb"] > 0
        if r["method"] != "pgd":
            assert r["radius"] is not None and r["radius"] >= 0
            if r["pred"] != r["label"]:
                assert r["radius"] == 0
    crown = [r for r in records if r["method"] == "crown"]
    assert all(r["radius"] <= r["radius_upper"] + 1e-6 for r in crown)  # certified below attack
    assert any(r["certified"] for r in crown)  # the check below is about something


@pytest.mark.usefixtures("lirpa")
def test_summary_matches_records(l2_run):
    records, summary = l2_run["records"], l2_run["summary"]
    assert summary["config"] == l2_run["config"]  # the summary names the run its records belong to
    labels = {r["index"]: (r["label"], r["pred"]) for r in records}
    assert summary["num_examples"] == 24
    assert summary["clean_accuracy"]["accuracy"] == pytest.approx(sum(a == b for a, b in labels.values()) / 24)
    for row in summary["results"]:
        cell = [r for r in records if r["method"] == row["method"] and r["eps"] == row["eps"]]
        assert row["n"] == len(cell) == 24
        assert row["accuracy"] == pytest.approx(sum(r["robust"] for r in cell) / 24)
        assert row["kind"] == cell[0]["kind"]
    for row in summary["radius"]:
        radii = sorted({r["index"]: r["radius"] for r in records if r["method"] == row["method"]}.values())
        assert row["mean"] == pytest.approx(sum(radii) / len(radii))
        assert row["median"] == pytest.approx((radii[11] + radii[12]) / 2)
    assert summary["soundness"]["certified_checked_by_pgd"] > 0  # the gate ran and passed
    # the printed table labels every figure
    for line in ("clean accuracy", "pgd-20 accuracy", "estimate: empirical upper bound", "crown accuracy",
                 "lipschitz accuracy", "certified", "legend"):
        assert line in l2_run["stdout"]


@pytest.mark.parametrize("run", ["l2_run", "full_run"])
def test_certified_points_survive_pgd(run, request, ckpts):
    """Soundness: no (point, eps) the CLI lists as certified, nor any certified radius, is broken by PGD."""
    records = request.getfixturevalue(run)["records"]
    norm = records[0]["norm"]
    model = load_model(ckpts["cnn4"])
    data = load_dataset("digits", "test")
    checks = [(r["index"], r["eps"]) for r in records if r["certified"]]
    checks += sorted({(r["index"], r["radius"]) for r in records
                      if r["kind"] == "certified" and r.get("radius") is not None and r["radius"] > 0})
    assert checks
    idx = torch.tensor([i for i, _ in checks])
    eps = torch.tensor([e for _, e in checks])
    res = pgd(model, data.x[idx], data.y[idx], eps, norm=norm, steps=50, restarts=2,
              generator=torch.Generator().manual_seed(1))
    assert bool((res.margin > 0).all()), [checks[i] for i in torch.nonzero(res.margin <= 0).flatten()]


def test_per_example_radii_of_the_api_match_cli(l2_run, ckpts):
    """The Python API on tensors gives the radii the CLI wrote for the same points."""
    import certkd

    model = load_model(ckpts["cnn4"])
    data = load_dataset("digits", "test")
    result = certkd.certify(model, (data.x[:12], data.y[:12]), ["lipschitz"], [0.1], norm="2", radius=True,
                            batch_size=12, pgd_steps=0)
    radius = {r["index"]: r["radius"] for r in result.records if r["method"] == "lipschitz"}
    cli = {r["index"]: r["radius"] for r in l2_run["records"] if r["method"] == "lipschitz"}
    assert [radius[i] for i in range(12)] == pytest.approx([cli[i] for i in range(12)], rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- resume, shards, merge

RUN = ("-n", 12, "--batch-size", 4, "--eps", "2/255,0.05", "--method", "crown", "--radius", "--pgd-steps", 5,
       "--seed", 3)


@pytest.fixture(scope="module")
def full_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    code, _, stderr = certify(ckpts["cnn4"], *RUN, "--per-example", out / "r.jsonl", "--out", out / "s.json")
    assert code == 0, stderr
    return {"jsonl": out / "r.jsonl", "records": read_per_example(out / "r.jsonl")[1],
            "summary": json.loads((out / "s.json").read_text())}


def _record_set(path: Path) -> tuple[dict, list[str]]:
    config, records = read_per_example(path)
    return config, sorted(json.dumps(r, sort_keys=True) for r in records)


def test_resume_after_interruption_equals_one_run(ckpts, full_run, tmp_path):
    full_jsonl, full_summary = full_run["jsonl"], full_run["summary"]
    lines = full_jsonl.read_text().splitlines(keepends=True)
    torn = tmp_path / "r.jsonl"
    kept = "".join(lines[:1 + len(lines) // 3])  # header + a third of the records
    torn.write_text(kept + lines[1 + len(lines) // 3][:25])  # and a torn last line
    code, _, stderr = certify(ckpts["cnn4"], *RUN, "--per-example", torn, "--out", tmp_path / "s.json")
    assert code == 2 and "--resume" in stderr  # an existing file is never silently reused
    code, _, stderr = certify(ckpts["cnn4"], *RUN, "--per-example", torn, "--out", tmp_path / "s.json", "--resume")
    assert code == 0, stderr
    assert torn.read_text().startswith(kept)  # finished records are kept, not recomputed
    assert _record_set(torn) == _record_set(full_jsonl)
    assert _without_provenance(json.loads((tmp_path / "s.json").read_text())) == _without_provenance(full_summary)
    code, _, stderr = certify(ckpts["cnn4"], *RUN[:-1], "4", "--per-example", torn, "--resume")
    assert code == 2 and "seed" in stderr and len(stderr.strip().splitlines()) == 1


def test_shards_merge_to_one_run(ckpts, full_run, tmp_path):
    full_jsonl, full_summary = full_run["jsonl"], full_run["summary"]
    for k in (0, 1):
        code, _, stderr = certify(ckpts["cnn4"], *RUN, "--shard", f"{k}/2", "--per-example", tmp_path / f"s{k}.jsonl")
        assert code == 0, stderr
    shard_idx = [{r["index"] for r in read_per_example(tmp_path / f"s{k}.jsonl")[1]} for k in (0, 1)]
    assert shard_idx[0] and shard_idx[1] and not shard_idx[0] & shard_idx[1]
    runner = CliRunner()
    merged = runner.invoke(main, ["merge", str(tmp_path / "s1.jsonl"), str(tmp_path / "s0.jsonl"),
                                  "--out", str(tmp_path / "m.json"), "--per-example", str(tmp_path / "m.jsonl")])
    assert merged.exit_code == 0, merged.stderr
    assert _without_provenance(json.loads((tmp_path / "m.json").read_text())) == _without_provenance(full_summary)
    assert _record_set(tmp_path / "m.jsonl") == _record_set(full_jsonl)
    for bad in ([tmp_path / "s0.jsonl"], [tmp_path / "s0.jsonl", tmp_path / "s0.jsonl"],
                [tmp_path / "s0.jsonl", full_jsonl]):
        res = runner.invoke(main, ["merge", *map(str, bad), "--out", str(tmp_path / "bad.json")])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "bad.json").exists()


# --------------------------------------------------------------------------- any architecture

def test_vit_gets_clever_and_smoothing(ckpts, tmp_path):
    code, stdout, stderr = certify(ckpts["vit"], "-n", 4, "--method", "clever,smoothing", "--eps", "0.01",
                                   "--norm", "2", "--radius", "--clever-batches", 4, "--clever-samples", 8,
                                   "--n0", 8, "--n", 64, "--pgd-steps", 0, "--per-example", tmp_path / "v.jsonl",
                                   "--out", tmp_path / "v.json")
    assert code == 0, stderr
    _, records = read_per_example(tmp_path / "v.jsonl")
    clever = [r for r in records if r["method"] == "clever"]
    smooth = [r for r in records if r["method"] == "smoothing"]
    assert len(clever) == len(smooth) == 4
    assert all(r["kind"] == "estimate" and not r["certified"] and 0 <= r["radius"] for r in clever)
    assert all(r["kind"] == "certified" and r["target"] == "smoothed classifier" for r in smooth)
    for r in smooth:  # certified for the smoothed classifier exactly when it predicts y with radius > eps
        assert r["certified"] == (r["smoothed_pred"] == r["label"] and r["radius"] > r["eps"])
    assert "smoothed classifier" in stdout and "estimate" in stdout


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def misfit_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("misfit")
    out = {}
    for name, info in (("shape", DatasetInfo("digits", (1, 6, 6), 10, (0.3,), (0.4,))),
                       ("classes", DatasetInfo("digits", (1, 8, 8), 5, (0.3,), (0.4,)))):
        model = create_model("mlp", info.num_classes, info.input_shape, info.mean, info.std, hidden=[8])
        out[name] = save_checkpoint(make_checkpoint(model, "mlp", {"hidden": [8]}, info), root / f"{name}.pt")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    out["corrupt"] = root / "corrupt.pt"
    return out


def _bad_cases(ckpts, misfit) -> dict[str, tuple[list, str]]:
    cnn, vit = str(ckpts["cnn4"]), str(ckpts["vit"])
    return {
        "negative eps": ([cnn, "--eps=-0.1"], "eps"),
        "unknown method": ([cnn, "--method", "magic"], "magic"),
        "unknown norm": ([cnn, "--norm", "3"], "norm"),
        "input shape": ([str(misfit["shape"])], "shape"),
        "classes": ([str(misfit["classes"])], "classes"),
        "missing checkpoint": ([str(Path(cnn).with_name("nope.pt"))], "nope.pt"),
        "corrupt checkpoint": ([str(misfit["corrupt"])], "corrupt"),
        "vit with crown": ([vit, "--method", "crown"], "attention"),
        "resume without file": ([cnn, "--resume"], "--per-example"),
        "bad shard": ([cnn, "--shard", "2/2"], "shard"),
        "unknown device": ([cnn, "--device", "toaster"], "device"),
        "clever batches": ([cnn, "--method", "clever", "--clever-batches", "1"], "clever-batches"),
    }


NO_LIRPA = ("import sys; sys.modules['auto_LiRPA'] = None; from certkd.cli import main; "
            "main(['certify'] + sys.argv[1:])")


def _check_one_line(name: str, code: int, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, (name, stderr)
    assert len(lines) == 1 and lines[0].startswith("certkd: error:"), (name, stderr)
    assert expected in lines[0], (name, lines[0])


def test_bad_input_exits_2_with_one_line(ckpts, misfit_ckpts, tmp_path):
    """Each bad input: exit 2, exactly one line on stderr, no output file, not even a partial one."""
    for i, (name, (args, expected)) in enumerate(_bad_cases(ckpts, misfit_ckpts).items()):
        outputs = ["--out", tmp_path / f"{i}.json"]
        if name != "resume without file":
            outputs += ["--per-example", tmp_path / f"{i}.jsonl"]
        code, _, stderr = certify(*args, "-n", 4, *outputs)
        _check_one_line(name, code, stderr, expected)
    assert not list(tmp_path.iterdir())


def test_bad_input_through_python_m_certkd(ckpts, misfit_ckpts, tmp_path):
    """The same through real processes (``python -m certkd``), run concurrently, and without auto_LiRPA."""
    cases = _bad_cases(ckpts, misfit_ckpts)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = {}
    for name in ("negative eps", "vit with crown"):
        args, expected = cases[name]
        command = [sys.executable, "-m", "certkd", "certify", *args, "-n", "4"]
        procs[name] = (command, expected)
    procs["no auto_LiRPA"] = ([sys.executable, "-c", NO_LIRPA, str(ckpts["cnn4"]), "-n", "4"],
                              "pip install --no-deps auto-LiRPA==0.3")
    running = {name: subprocess.Popen([*command, "--out", str(tmp_path / f"{i}.json"), "--per-example",
                                       str(tmp_path / f"{i}.jsonl")], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, (name, (command, _)) in enumerate(procs.items())}
    for name, proc in running.items():
        _, stderr = proc.communicate(timeout=300)
        _check_one_line(name, proc.returncode, stderr, procs[name][1])
    assert not list(tmp_path.iterdir())
