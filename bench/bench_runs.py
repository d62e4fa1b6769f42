"""Cost of the run layer (certkd.runs), measured side by side.

(1) ``certkd compare S T`` divided by the sum of ``certkd certify S --radius`` and
    ``certkd certify T --radius`` on the same points (same method, eps, batch size, seed),
    all through the CLI in this process. Target: at most 1.15.
(2) ``certify_points`` (the run loop: record log with fsync'ed appends, done-keys, seed
    streams, records) divided by a bare loop over ``BoundEngine.margin_bounds`` on the same
    batches, on cnn7 (CIFAR-10 shape). Target: at most 1.02. Default method CROWN-IBP: full CROWN
    on cnn7 at 32x32 needs more memory than a shared CPU machine has (and takes minutes per batch
    even at 8x8 on CPU); ``--method crown`` on a GPU machine.

Measurements alternate (ABBA order) for ``--rounds`` rounds; each ratio is that of the fastest
round of each side (on a shared machine, load only ever adds time).

    python bench/bench_runs.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from click.testing import CliRunner

from bounds.certify import BoundEngine
from certkd.certification import COMMAND, CertifyJob, CertifyOptions, prepare_methods, record_key
from certkd.checkpoint import make_checkpoint, save_checkpoint
from certkd.cli import main as cli
from certkd.commands.certify import certify_points
from certkd.data import TensorPoints, load_dataset
from certkd.models import create_model
from certkd.runs import RecordLog


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def trained(arch: str, steps: int, seed: int, out: Path, **kwargs: object) -> Path:
    """A digits model after a few full-batch Adam steps (enough for non-trivial radii)."""
    data = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_model(arch, 10, data.info.input_shape, data.info.mean, data.info.std, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(make_checkpoint(model.eval(), arch, kwargs, data.info), out / f"{arch}.pt")


def side_by_side(a: Callable[[], object], b: Callable[[], object], rounds: int, name_a: str, name_b: str) -> float:
    """``min(time a) / min(time b)`` over ``rounds`` rounds run in ABBA order."""
    times: dict[str, list[float]] = {name_a: [], name_b: []}
    for r in range(rounds):
        order = [(name_a, a), (name_b, b)] if r % 2 == 0 else [(name_b, b), (name_a, a)]
        for name, fn in order:
            times[name].append(timed(fn))
        print(f"  round {r}: {name_a} {times[name_a][-1]:.2f}s   {name_b} {times[name_b][-1]:.2f}s")
    return min(times[name_a]) / min(times[name_b])


def run_cli(*args: object) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def bench_compare(rounds: int, examples: int, root: Path) -> float:
    student = trained("mlp", 40, 1, root, hidden=[64])
    teacher = trained("cnn4", 40, 0, root)
    common = ("-n", examples, "--method", "crown", "--eps", "0.02", "--batch-size", 32, "--seed", 0)
    def certify_both() -> None:
        run_cli("certify", student, *common, "--radius")
        run_cli("certify", teacher, *common, "--radius")

    def compare() -> None:
        run_cli("compare", student, teacher, *common, "--n-boot", 200)

    return side_by_side(compare, certify_both, rounds, "compare", "two certify --radius")


def bench_overhead(rounds: int, batches: int, batch_size: int, method: str, root: Path) -> float:
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = create_model("cnn7", 10, shape, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.rand(batches * batch_size, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the model predicts: every point is bounded
    eps = [1 / 255]
    job = CertifyJob(methods=[method], eps=eps, batch_size=batch_size, params=CertifyOptions(pgd_steps=0))
    ctx = prepare_methods(model, shape, [method], "inf", job.params)
    engine = ctx.bound_engine()  # the same engine for both loops
    points = TensorPoints(x, y)

    def bare() -> None:
        for start in range(0, len(y), batch_size):
            for e in eps:
                engine.margin_bounds(x[start:start + batch_size], y[start:start + batch_size], e, "inf", method)

    def layer(i: int) -> None:
        config = {"round": i, **job.to_config()}
        with RecordLog.open(root / f"r{i}.jsonl", COMMAND, config, record_key) as log:
            certify_points(ctx, points, range(len(y)), job, log)

    assert isinstance(engine, BoundEngine)
    bare()  # warm-up (auto_LiRPA caches)
    rounds_done = iter(range(10**6))
    return side_by_side(lambda: layer(next(rounds_done)), bare, rounds, "run layer", "bare BoundEngine loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64, help="points of the compare benchmark")
    parser.add_argument("--batches", type=int, default=4, help="cnn7 batches of the overhead benchmark")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--method", default="crown-ibp", help="bound method of the overhead benchmark")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("(1) compare versus two certify --radius runs (digits, CROWN)")
        r1 = bench_compare(args.rounds, args.examples, root)
        print(f"(2) run layer versus a bare BoundEngine loop (cnn7, {args.method})")
        r2 = bench_overhead(args.rounds, args.batches, args.batch_size, args.method, root)
    print(f"compare / (certify S + certify T): {r1:.3f}  (target <= 1.15)  {'OK' if r1 <= 1.15 else 'MISSED'}")
    print(f"run layer / bare BoundEngine loop: {r2:.3f}  (target <= 1.02)  {'OK' if r2 <= 1.02 else 'MISSED'}")


if __name__ == "__main__":
    main()
