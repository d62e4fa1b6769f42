"""The run layer (``certkd.runs``) under every command: resume is refused or recomputed after a config change,
never stale; shards (explicit, Slurm array, torchrun) merge into one run; engines are built once per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import train_natural

from certkd.checkpoint import make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.data import load_dataset
from certkd.errors import CertkdError
from certkd.io import read_jsonl
from certkd.models import create_model
from certkd.runs import RecordLog, batches, config_sha256, merge_logs, read_log, seed_stream, shard_from_env

REPO = Path(__file__).resolve().parents[1]
KWARGS = {"hidden": [16]}

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: object, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _one_line_refusal(code: int, stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def mlps(tmp_path_factory) -> dict[str, Path]:
    """Two small MLPs trained briefly on digits (a teacher and a student of other weights)."""
    root = tmp_path_factory.mktemp("runs")
    data = load_dataset("digits", "train")
    out = {}
    for name, seed, steps in (("teacher", 0, 40), ("student", 1, 15)):
        torch.manual_seed(seed)
        model = create_model("mlp", 10, data.info.input_shape, data.info.mean, data.info.std, **KWARGS)
        model = train_natural(model, data.x, data.y, epochs=steps, seed=seed)
        out[name] = save_checkpoint(make_checkpoint(model, "mlp", KWARGS, data.info), root / f"{name}.pt")
    return out


# --------------------------------------------------------------------------- the layer itself

def test_seed_stream_depends_on_every_key_only() -> None:
    def draw(*keys: object) -> list[float]:
        return torch.rand(3, generator=seed_stream(*keys)).tolist()  # type: ignore[arg-type]

    assert draw(0, 1, "crown") == draw(0, 1, "crown")
    assert len({tuple(draw(*k)) for k in ((0, 1, "crown"), (1, 1, "crown"), (0, 2, "crown"), (0, 1, "ibp"))}) == 4


def test_record_log_refuses_other_runs_and_overwrites_on_request(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    key = lambda r: (r["index"],)  # noqa: E731
    with RecordLog.open(path, "certify", {"seed": 0, "params": {"n": 1}}, key) as log:
        assert log.add([{"index": 0}, {"index": 1}, {"index": 0}]) == [{"index": 0}, {"index": 1}]
    head, records = read_log(path)
    assert head is not None and head["config_sha256"] == config_sha256({"seed": 0, "params": {"n": 1}})
    assert records == [{"index": 0}, {"index": 1}]
    with pytest.raises(CertkdError, match="--resume"):
        RecordLog.open(path, "certify", {"seed": 0, "params": {"n": 1}}, key)
    with pytest.raises(CertkdError, match=r"differs in params\.n"):
        RecordLog.open(path, "certify", {"seed": 0, "params": {"n": 2}}, key, resume=True)
    with pytest.raises(CertkdError, match="differs in command"):
        RecordLog.open(path, "compare", {"seed": 0, "params": {"n": 1}}, key, resume=True)
    assert read_log(path)[1] == records  # a refusal leaves the file alone
    resumed = RecordLog.open(path, "certify", {"seed": 0, "params": {"n": 1}}, key, resume=True)
    assert resumed.records == records and not resumed.missing([(0,), (1,)]) and resumed.missing([(2,)])
    resumed.close()
    RecordLog.open(path, "certify", {"seed": 1}, key, overwrite=True).close()
    head, records = read_log(path)
    assert head is not None and head["config"] == {"seed": 1} and records == []
    (tmp_path / "other.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(CertkdError, match="not a certkd record log"):
        RecordLog.open(tmp_path / "other.jsonl", "certify", {}, key, overwrite=True)


def test_shard_from_env_torchrun_and_slurm() -> None:
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == ((1, 2), "torchrun")
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}) == ((0, 3), "slurm")
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_STEP": "2",
                           "SLURM_ARRAY_TASK_COUNT": "3"}) == ((2, 3), "slurm")
    for env in ({}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(CertkdError):
            shard_from_env(env)


def test_shards_partition_the_batches() -> None:
    whole = batches(range(23), 4)
    parts = [batches(range(23), 4, (k, 3)) for k in range(3)]
    assert sorted(b for p in parts for b in p) == whole


def test_merge_logs_checks_shards(tmp_path: Path) -> None:
    def part(k: int, n: int, indices: list[int], **config: object) -> tuple[str, dict, list[dict]]:
        head = {"command": "x", "config": {"shard": [k, n], "seed": 0, **config}}
        return f"p{k}", head, [{"index": i} for i in indices]

    def expected(config: dict) -> set:
        return {(i,) for _, idx in batches(range(4), 1, tuple(config["shard"])) for i in idx}

    key = lambda r: (r["index"],)  # noqa: E731
    command, config, records = merge_logs([part(1, 2, [1, 3]), part(0, 2, [0, 2])], expected, key, "resume")
    assert command == "x" and config["shard"] is None and sorted(r["index"] for r in records) == [0, 1, 2, 3]
    for parts, needle in (([part(0, 2, [0, 2])], "missing shard"), ([part(0, 2, [0, 2]), part(0, 2, [0, 2])], "both"),
                          ([part(0, 2, [0]), part(1, 2, [1, 3])], "incomplete"),
                          ([part(0, 2, [0, 2]), part(1, 2, [1, 3], seed=1)], "differ in seed")):
        with pytest.raises(CertkdError, match=needle):
            merge_logs(parts, expected, key, "resume")


# --------------------------------------------------------------------------- certify

CERTIFY = ("-n", 12, "--batch-size", 4, "--eps", "0.01,0.03", "--method", "crown", "--radius", "--pgd-steps", 3)


def _records(path: Path) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in read_log(path)[1])


def _summary(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "provenance"}


@pytest.fixture(scope="module")
def certify_full(mlps, tmp_path_factory, lirpa) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("certify_full")
    code, _, stderr = run("certify", mlps["teacher"], *CERTIFY, "--per-example", out / "r.jsonl",
                          "--out", out / "s.json")
    assert code == 0, stderr
    return {"jsonl": out / "r.jsonl", "summary": out / "s.json"}


def test_certify_config_change_is_refused_or_recomputed(mlps, certify_full, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(certify_full["jsonl"].read_text())
    changed = [*CERTIFY[:5], "0.01,0.05", *CERTIFY[6:]]
    code, _, stderr = run("certify", mlps["teacher"], *changed, "--per-example", path, "--resume")
    _one_line_refusal(code, stderr, "eps", "--overwrite")
    assert _records(path) == _records(certify_full["jsonl"])  # untouched
    code, _, stderr = run("certify", mlps["teacher"], *changed, "--per-example", path, "--overwrite",
                          "--out", tmp_path / "s.json")
    assert code == 0, stderr
    fresh = tmp_path / "fresh.jsonl"
    code, _, stderr = run("certify", mlps["teacher"], *changed, "--per-example", fresh)
    assert code == 0, stderr
    assert _records(path) == _records(fresh)  # recomputed: nothing of the old run survives
    assert {r["eps"] for r in read_log(path)[1]} == {0.01, 0.05}


def test_certify_slurm_array_shards_merge_to_one_run(mlps, certify_full, tmp_path: Path) -> None:
    for k in (1, 2):  # an array --array=1-2: task ids from SLURM_ARRAY_TASK_MIN
        env = {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
        code, _, stderr = run("certify", mlps["teacher"], *CERTIFY, "--shard", "auto", "--per-example",
                              tmp_path / "r.jsonl", env=env)
        assert code == 0, stderr
    files = sorted(tmp_path.glob("r.shard*of2.jsonl"))
    assert [f.name for f in files] == ["r.shard0of2.jsonl", "r.shard1of2.jsonl"]
    code, _, stderr = run("merge", *files, "--out", tmp_path / "m.json", "--per-example", tmp_path / "m.jsonl")
    assert code == 0, stderr
    assert _summary(tmp_path / "m.json") == _summary(certify_full["summary"])
    assert _records(tmp_path / "m.jsonl") == _records(certify_full["jsonl"])


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed missing")
def test_certify_under_torchrun_gathers_on_rank0(mlps, certify_full, tmp_path: Path) -> None:
    """2 local processes (gloo): each certifies its shard; rank 0 gathers, checks and writes one run."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "certkd", "certify", str(mlps["teacher"]), *map(str, CERTIFY), "--shard", "auto",
                           "--per-example", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "s.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("clean accuracy") == 1  # only rank 0 prints
    assert _summary(tmp_path / "s.json") == _summary(certify_full["summary"])
    assert _records(tmp_path / "r.jsonl") == _records(certify_full["jsonl"])
    head, _ = read_log(tmp_path / "r.jsonl")
    assert head is not None and head["config"]["shard"] is None
    assert sorted(p.name for p in tmp_path.glob("r.shard*")) == ["r.shard0of2.jsonl", "r.shard1of2.jsonl"]


def engines_built(monkeypatch) -> list:
    """The models of the bound engines built from now on (``BoundEngine`` replaced by a recording subclass)."""
    import bounds.certify

    built = []
    original = bounds.certify.BoundEngine

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bounds.certify, "BoundEngine", Recording)
    return built


@pytest.mark.usefixtures("lirpa")
def test_certify_builds_one_engine_per_run(mlps, tmp_path: Path, monkeypatch) -> None:
    built = engines_built(monkeypatch)
    code, _, stderr = run("certify", mlps["teacher"], *CERTIFY)
    assert code == 0, stderr
    assert len(built) == 1  # 3 batches, 1 engine


# --------------------------------------------------------------------------- compare

COMPARE = ("--method", "crown", "-n", 12, "--batch-size", 4, "--eps", "0,0.01,0.03", "--n-boot", 100)


@pytest.fixture(scope="module")
def compare_full(mlps, tmp_path_factory, lirpa) -> Path:
    out = tmp_path_factory.mktemp("compare_full")
    code, _, stderr = run("compare", mlps["student"], mlps["teacher"], *COMPARE, "--out", out)
    assert code == 0, stderr
    return out


@pytest.mark.usefixtures("lirpa")
def test_compare_builds_each_engine_once(mlps, tmp_path: Path, monkeypatch) -> None:
    built = engines_built(monkeypatch)
    code, _, stderr = run("compare", mlps["student"], mlps["teacher"], *COMPARE)
    assert code == 0, stderr
    assert len(built) == 2 and built[0] is not built[1]  # one per model, for 3 batches


@pytest.mark.usefixtures("lirpa")
def test_compare_radii_are_those_of_certify(mlps, compare_full, certify_full) -> None:
    """Same seed, batch size and method: compare's teacher radii are certify --radius's."""
    rows = read_jsonl(compare_full / "per_example.jsonl")[1:]
    certify = {r["index"]: r["radius"] for r in read_log(certify_full["jsonl"])[1] if r["method"] == "crown"}
    assert [r["radius_teacher"] for r in sorted(rows, key=lambda r: r["index"])] == [certify[i] for i in range(12)]


def test_compare_config_change_is_refused_or_recomputed(mlps, compare_full, tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "per_example.jsonl").write_text((compare_full / "per_example.jsonl").read_text())
    code, _, stderr = run("compare", mlps["student"], mlps["teacher"], *COMPARE, "--seed", 1, "--out", out,
                          "--resume")
    _one_line_refusal(code, stderr, "seed")
    code, _, stderr = run("compare", mlps["student"], mlps["teacher"], *COMPARE, "--margin", 0.05, "--out", out,
                          "--overwrite")
    assert code == 0, stderr
    assert json.loads((out / "compare.json").read_text())["rule"]["margin"] == 0.05
    assert read_log(out / "per_example.jsonl")[0]["config"]["rule"]["margin"] == 0.05


def test_compare_shards_merge_to_one_run(mlps, compare_full, tmp_path: Path) -> None:
    for k in (0, 1):
        code, stdout, stderr = run("compare", mlps["student"], mlps["teacher"], *COMPARE, "--shard", f"{k}/2",
                                   "--out", tmp_path / f"s{k}")
        assert code == 0 and "certkd merge" in stdout, stderr
    code, stdout, stderr = run("merge", tmp_path / "s1" / "per_example.jsonl", tmp_path / "s0" / "per_example.jsonl",
                               "--out", tmp_path / "m")
    assert code == 0, stderr
    merged, full = (json.loads((d / "compare.json").read_text()) for d in (tmp_path / "m", compare_full))
    for key in ("verdict", "reason", "certified", "empirical", "rho", "coverage", "n"):
        assert merged[key] == full[key], key
    rows = sorted(read_jsonl(tmp_path / "m" / "per_example.jsonl")[1:], key=lambda r: r["index"])
    assert rows == sorted(read_jsonl(compare_full / "per_example.jsonl")[1:], key=lambda r: r["index"])
    code, _, stderr = run("merge", tmp_path / "s1" / "per_example.jsonl", "--out", tmp_path / "bad")
    _one_line_refusal(code, stderr, "missing shard")


# --------------------------------------------------------------------------- bounds

BOUNDS = ("--eps", "0.02", "-n", 6, "--batch-size", 3, "--steps", 3, "--restarts", 1)


def test_bounds_config_change_is_refused_or_recomputed(mlps, tmp_path: Path) -> None:
    out = tmp_path / "b"
    code, _, stderr = run("bounds", mlps["student"], mlps["teacher"], *BOUNDS, "--out", out)
    assert code == 0, stderr
    before = (out / "per_example.jsonl").read_text()
    code, _, stderr = run("bounds", mlps["student"], mlps["teacher"], *BOUNDS, "--steps", 4, "--out", out, "--resume")
    _one_line_refusal(code, stderr, "steps", "--overwrite")
    assert (out / "per_example.jsonl").read_text() == before
    code, _, stderr = run("bounds", mlps["student"], mlps["teacher"], *BOUNDS, "--steps", 4, "--out", out,
                          "--overwrite")
    assert code == 0, stderr
    head, records = read_log(out / "per_example.jsonl")
    assert head is not None and head["config"]["steps"] == 4 and len(records) == 6
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 4


# --------------------------------------------------------------------------- ablate and demo

def _study(path: Path, ckpt: Path, eps: str) -> Path:
    path.write_text(f"checkpoints: [{ckpt}]\nmethods: [crown, pgd]\nnorms: [inf]\neps: [{eps}]\nnum_examples: 8\n"
                    f"batch_size: 8\nparams: {{pgd_steps: 3, radius_tol: 0.01}}\n")
    return path


@pytest.mark.usefixtures("lirpa")
def test_ablate_after_a_study_edit_is_refused_or_recomputed(mlps, tmp_path: Path) -> None:
    from certkd.commands.ablate import read_cells

    out = tmp_path / "out"
    code, _, stderr = run("ablate", _study(tmp_path / "s.yaml", mlps["teacher"], "0.01, 0.02"), "--out", out)
    assert code == 0, stderr
    before = (out / "cells.csv").read_text()
    code, _, stderr = run("ablate", _study(tmp_path / "s.yaml", mlps["teacher"], "0.01, 0.04"), "--out", out)
    _one_line_refusal(code, stderr, "eps", "--overwrite")
    assert (out / "cells.csv").read_text() == before  # the old cells are not shown as the new study's
    code, _, stderr = run("ablate", tmp_path / "s.yaml", "--out", out, "--overwrite")
    assert code == 0, stderr
    assert sorted({r["eps"] for r in read_cells(out / "cells.csv")}) == [0.01, 0.04]


def test_demo_certification_after_a_settings_change_is_refused_or_recomputed(digits_trio, tmp_path) -> None:
    from certkd.commands.demo import DemoSettings, certify_trained

    data = load_dataset("digits", "test")
    path = tmp_path / "teacher.jsonl"
    first = certify_trained("teacher", digits_trio.teacher_path, data, 10, DemoSettings(eps_grid=[0.05]), path)
    changed = DemoSettings(eps_grid=[0.05, 0.1])
    with pytest.raises(CertkdError, match="eps"):
        certify_trained("teacher", digits_trio.teacher_path, data, 10, changed, path)
    again = certify_trained("teacher", digits_trio.teacher_path, data, 10, changed, path, overwrite=True)
    assert {r["eps"] for r in again.summary["results"]} == {0.05, 0.1}
    assert torch.equal(first.radius, again.radius)  # radii do not depend on the grid
