"""Temporary device check for helper C (deleted after use)."""
import time

import torch

from bounds.clever import clever, fit_reverse_weibull
from bounds.lipschitz import lipschitz_bound, lipschitz_radius
from bounds.smoothing import smoothing_certify
from certkd.models import create_model

dev = torch.device("cuda")
print(torch.cuda.get_device_name(0), flush=True)
torch.manual_seed(0)
m = create_model("resnet_small", 10, (3, 32, 32), width=8).eval()
x = torch.rand(4, 3, 32, 32)
y = m(x).argmax(1)
t = time.time(); b_cpu = lipschitz_bound(m, (3, 32, 32)); t_cpu = time.time() - t
mg = m.to(dev)
lipschitz_bound(mg, (3, 32, 32))
torch.cuda.synchronize(); t = time.time(); b_gpu = lipschitz_bound(mg, (3, 32, 32)); torch.cuda.synchronize()
print(f"lipschitz resnet_small cpu {b_cpu.logits:.6f} ({t_cpu:.2f}s) gpu {b_gpu.logits:.6f} ({time.time() - t:.2f}s)",
      "margin max rel diff", float(((b_cpu.margin - b_gpu.margin.cpu()).abs() / b_cpu.margin.clamp_min(1e-9)).max()))
xd, yd = x.to(dev), y.to(dev)
r = lipschitz_radius(mg, xd, yd, "inf")
c = clever(mg, xd, yd, "2", 0.5, 20, 64)
s = smoothing_certify(mg, xd, 0.25, 50, 2000, 0.001, 1000)
print("devices", r.radius.device, c.score.device, s.radius.device)
print("clever", c.score.tolist(), "fallback frac", float(c.fallback.float().mean()))
print("smoothing", s.prediction.tolist(), s.radius.tolist(), flush=True)
for name, kw in [("resnet18", {}), ("cnn7", {})]:
    mm = create_model(name, 10, (3, 32, 32), **kw).eval().to(dev)
    torch.cuda.synchronize(); t = time.time(); b = lipschitz_bound(mm, (3, 32, 32)); torch.cuda.synchronize()
    print(f"{name} bound {b.logits:.4g} in {time.time() - t:.2f}s on gpu", flush=True)
gen = torch.Generator().manual_seed(0)
for samples, n in [(72, 50), (288, 100), (900, 500)]:
    mx = torch.rand(samples, n, generator=gen) ** 0.05
    for d in ("cuda", "cpu"):
        md = mx.to(d)
        fit_reverse_weibull(md[:2])
        torch.cuda.synchronize(); t = time.time(); f = fit_reverse_weibull(md); torch.cuda.synchronize()
        print(f"fit {samples} samples x {n} on {d}: {time.time() - t:.3f}s, fitted {float(f.fitted.float().mean()):.2f}",
              flush=True)
