"""Zoo families load public state_dicts strictly: written-out layouts (key names and shapes), round trips,
reference forwards, and one-line refusals naming the key that does not fit."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from external_models import AdvertorchLeNet5
from torch import nn

from certkd.checkpoint import load_checkpoint, save_checkpoint, save_model
from certkd.cli import main
from certkd.convert import wrap_state_dict
from certkd.data import dataset_info
from certkd.errors import CertkdError, CheckpointError
from certkd.models import MODELS, create_model, register_model


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    """The five state_dict entries of a BatchNorm2d(c) named ``prefix``."""
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def wrn_block(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {**bn(f"{prefix}.bn1", cin), f"{prefix}.conv1.weight": (cout, cin, 3, 3), **bn(f"{prefix}.bn2", cout),
            f"{prefix}.conv2.weight": (cout, cout, 3, 3)}
    if cin != cout:
        keys[f"{prefix}.convShortcut.weight"] = (cout, cin, 1, 1)
    return keys


def preact_block(prefix: str, cin: int, cout: int, stride: int) -> dict[str, tuple[int, ...]]:
    keys = {**bn(f"{prefix}.bn1", cin), f"{prefix}.conv1.weight": (cout, cin, 3, 3), **bn(f"{prefix}.bn2", cout),
            f"{prefix}.conv2.weight": (cout, cout, 3, 3)}
    if stride != 1 or cin != cout:
        keys[f"{prefix}.shortcut.0.weight"] = (cout, cin, 1, 1)
    return keys


PREACT18 = {"conv1.weight": (64, 3, 3, 3)}
for _stage, (_cin, _cout) in enumerate(((64, 64), (64, 128), (128, 256), (256, 512)), start=1):
    PREACT18 |= preact_block(f"layer{_stage}.0", _cin, _cout, 1 if _stage == 1 else 2)
    PREACT18 |= preact_block(f"layer{_stage}.1", _cout, _cout, 1)
PREACT18 |= {"linear.weight": (10, 512), "linear.bias": (10,)}

# (arch, kwargs, dataset, the public layout: key -> shape), written out from the published definitions
LAYOUTS = [
    ("lenet5", {}, "mnist", {  # advertorch.test_utils.LeNet5
        "conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,), "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
        "linear1.weight": (200, 3136), "linear1.bias": (200,), "linear2.weight": (10, 200), "linear2.bias": (10,)}),
    ("small_cnn", {}, "mnist", {  # TRADES models/small_cnn.py SmallCNN
        "feature_extractor.conv1.weight": (32, 1, 3, 3), "feature_extractor.conv1.bias": (32,),
        "feature_extractor.conv2.weight": (32, 32, 3, 3), "feature_extractor.conv2.bias": (32,),
        "feature_extractor.conv3.weight": (64, 32, 3, 3), "feature_extractor.conv3.bias": (64,),
        "feature_extractor.conv4.weight": (64, 64, 3, 3), "feature_extractor.conv4.bias": (64,),
        "classifier.fc1.weight": (200, 1024), "classifier.fc1.bias": (200,),
        "classifier.fc2.weight": (200, 200), "classifier.fc2.bias": (200,),
        "classifier.fc3.weight": (10, 200), "classifier.fc3.bias": (10,)}),
    ("cnn_4layer", {}, "mnist", {  # auto_LiRPA cnn_4layer(in_ch=1, in_dim=28, width=2, linear_size=256)
        "conv1.weight": (8, 1, 4, 4), "conv1.bias": (8,), "conv2.weight": (16, 8, 4, 4), "conv2.bias": (16,),
        "fc1.weight": (256, 784), "fc1.bias": (256,), "fc2.weight": (10, 256), "fc2.bias": (10,)}),
    ("cnn_7layer", {"width": 4, "linear_size": 32}, "cifar10", {  # auto_LiRPA cnn_7layer, narrow
        "0.weight": (4, 3, 3, 3), "0.bias": (4,), "2.weight": (4, 4, 3, 3), "2.bias": (4,),
        "4.weight": (8, 4, 3, 3), "4.bias": (8,), "6.weight": (8, 8, 3, 3), "6.bias": (8,),
        "8.weight": (8, 8, 3, 3), "8.bias": (8,), "11.weight": (32, 2048), "11.bias": (32,),
        "13.weight": (10, 32), "13.bias": (10,)}),
    ("dm_small", {}, "mnist", {
        "0.weight": (16, 1, 4, 4), "0.bias": (16,), "2.weight": (32, 16, 4, 4), "2.bias": (32,),
        "5.weight": (100, 3200), "5.bias": (100,), "7.weight": (10, 100), "7.bias": (10,)}),
    ("dm_medium", {}, "cifar10", {
        "0.weight": (32, 3, 3, 3), "0.bias": (32,), "2.weight": (32, 32, 4, 4), "2.bias": (32,),
        "4.weight": (64, 32, 3, 3), "4.bias": (64,), "6.weight": (64, 64, 4, 4), "6.bias": (64,),
        "9.weight": (512, 1600), "9.bias": (512,), "11.weight": (512, 512), "11.bias": (512,),
        "13.weight": (10, 512), "13.bias": (10,)}),
    ("dm_large", {}, "mnist", {  # CROWN-IBP IBP_large(in_ch=1, in_dim=28)
        "0.weight": (64, 1, 3, 3), "0.bias": (64,), "2.weight": (64, 64, 3, 3), "2.bias": (64,),
        "4.weight": (128, 64, 3, 3), "4.bias": (128,), "6.weight": (128, 128, 3, 3), "6.bias": (128,),
        "8.weight": (128, 128, 3, 3), "8.bias": (128,), "11.weight": (512, 25088), "11.bias": (512,),
        "13.weight": (10, 512), "13.bias": (10,)}),
    ("robustbench_wrn", {"depth": 16, "widen": 1}, "cifar10", {  # RobustBench WideResNet(depth=16, widen_factor=1)
        "conv1.weight": (16, 3, 3, 3), **wrn_block("block1.layer.0", 16, 16), **wrn_block("block1.layer.1", 16, 16),
        **wrn_block("block2.layer.0", 16, 32), **wrn_block("block2.layer.1", 32, 32),
        **wrn_block("block3.layer.0", 32, 64), **wrn_block("block3.layer.1", 64, 64),
        **bn("bn1", 64), "fc.weight": (10, 64), "fc.bias": (10,)}),
    ("robustbench_wrn", {"depth": 10, "widen": 2}, "cifar10", {
        "conv1.weight": (16, 3, 3, 3), **wrn_block("block1.layer.0", 16, 32), **wrn_block("block2.layer.0", 32, 64),
        **wrn_block("block3.layer.0", 64, 128), **bn("bn1", 128), "fc.weight": (10, 128), "fc.bias": (10,)}),
    ("preact_resnet18", {}, "cifar10", PREACT18),  # RobustBench PreActResNet18()
    ("preact_resnet18", {"bn_before_fc": True, "shortcut_from": "activation"}, "cifar10", PREACT18 | bn("bn", 512)),
]
IDS = [f"{arch}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}" for arch, kwargs, _, _ in LAYOUTS]


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


@pytest.mark.parametrize(("arch", "kwargs", "dataset", "layout"), LAYOUTS, ids=IDS)
def test_zoo_layout_is_the_public_one_and_round_trips_strictly(tmp_path, arch, kwargs, dataset, layout):
    meta = dataset_info(dataset)
    body = create_model(arch, meta.num_classes, meta.input_shape, **kwargs)[1]
    assert {k: tuple(v.shape) for k, v in body.state_dict().items()} == layout
    state = random_state(layout)
    ckpt = wrap_state_dict(arch, kwargs, dataset, state, "public.pt", normalization="identity")
    rebuilt = load_checkpoint(save_checkpoint(ckpt, tmp_path / "c.pt")).build_model()[1]
    for key, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("defect", ["key", "shape"])
@pytest.mark.parametrize(("arch", "kwargs", "dataset", "layout"), [LAYOUTS[0], LAYOUTS[7]], ids=[IDS[0], IDS[7]])
def test_one_wrong_key_or_shape_is_exit_2_naming_it(tmp_path, arch, kwargs, dataset, layout, defect):
    state = random_state(layout)
    victim = sorted(k for k in layout if k.endswith("weight"))[1]
    if defect == "key":
        state[victim.replace("weight", "wieght")] = state.pop(victim)
    else:
        state[victim] = torch.zeros(*(s + 1 for s in layout[victim]))
    weights = tmp_path / "public.pt"
    torch.save(state, weights)
    result = CliRunner().invoke(main, ["convert", "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--dataset",
                                       dataset, "--weights", str(weights), "--out", str(tmp_path / "c.pt")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line and victim in line
    assert ("missing keys" if defect == "key" else "shape mismatches") in line
    assert not (tmp_path / "c.pt").exists()


class RobustBenchBlock(nn.Module):
    """RobustBench wide_resnet.BasicBlock forward, as published."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RobustBenchWRN(nn.Module):
    def __init__(self, depth=16, widen=1, num_classes=10):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for b in range(3):
            block = nn.Module()
            block.layer = nn.Sequential(*[RobustBenchBlock(ch[b] if i == 0 else ch[b + 1], ch[b + 1],
                                                           (1 if b == 0 else 2) if i == 0 else 1) for i in range(n)])
            setattr(self, f"block{b + 1}", block)
        self.bn1, self.relu, self.fc = nn.BatchNorm2d(ch[3]), nn.ReLU(), nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for b in (self.block1, self.block2, self.block3):
            out = b.layer(out)
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(out.size(0), -1))


def _trained_like(module: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics, then eval mode."""
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        module(torch.rand(8, 3, 32, 32))
    return module.eval()


def test_advertorch_lenet5_converts_and_reproduces_outputs_exactly(tmp_path):
    torch.manual_seed(1)
    reference = AdvertorchLeNet5().eval()
    weights = tmp_path / "advertorch_lenet5.pt"
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "lenet5.pt"
    result = CliRunner().invoke(main, ["convert", "--arch", "lenet5", "--dataset", "mnist", "--weights", str(weights),
                                       "--normalization", "identity", "--out", str(out)])
    assert result.exit_code == 0, result.output
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(out).build_model()(x), reference(x))


@pytest.mark.parametrize("widen", [1, 2])
def test_robustbench_wrn_matches_the_published_forward(tmp_path, widen):
    reference = _trained_like(RobustBenchWRN(depth=16 if widen == 1 else 10, widen=widen))
    depth = 16 if widen == 1 else 10
    ckpt = wrap_state_dict("robustbench_wrn", {"depth": depth, "widen": widen}, "cifar10", reference.state_dict(),
                           "rb.pt", normalization="identity")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build_model()(x), reference(x), rtol=1e-5, atol=1e-5)


def test_save_model_keeps_a_notebook_module_and_refuses_what_cannot_be_rebuilt(tmp_path):
    torch.manual_seed(0)
    module = AdvertorchLeNet5().eval()
    path = save_model(module, tmp_path / "nb.pt", dataset="mnist", arch="lenet5", normalization="identity")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).build_model()(x), module(x))

    class SameKeysOtherForward(AdvertorchLeNet5):
        def forward(self, x):
            return -super().forward(x)

    with pytest.raises(CertkdError, match="outputs differ"):
        save_model(SameKeysOtherForward().eval(), tmp_path / "other.pt", dataset="mnist", arch="lenet5",
                   normalization="identity")
    with pytest.raises(CheckpointError, match="do not fit lenet5"):
        save_model(nn.Linear(784, 10), tmp_path / "lin.pt", dataset="mnist", arch="lenet5")
    with pytest.raises(CertkdError, match="unknown model"):
        save_model(module, tmp_path / "x.pt", dataset="mnist", arch="no_such_arch")

    @register_model
    def notebook_only_net(num_classes, input_shape):
        """A builder registered from a notebook (no package)."""
        return AdvertorchLeNet5()

    try:
        with pytest.raises(CertkdError, match="registered at run time by module"):
            save_model(module, tmp_path / "nb2.pt", dataset="mnist", arch="notebook_only_net")
    finally:
        MODELS.remove("notebook_only_net")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.pt"]
