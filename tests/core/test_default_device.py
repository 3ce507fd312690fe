"""CPU tensors keep working when the default device is something else (``torch.device(...)`` context
or ``torch.set_default_device``): the CPU kernels' buffers are allocated on the CPU explicitly.

Before the fix, every float32 CPU eval forward under ``torch.device("meta")`` crashed the process
(the C++ kernel wrote through the data pointer of a meta tensor), so the check runs in a subprocess.
"""
import subprocess
import sys

CODE = r"""
import torch, l0kernels as l0k
torch.manual_seed(0)
lin, conv = l0k.L0Linear(7, 5, gate="in"), l0k.L0Conv2d(3, 4, 3)
lin_w = l0k.L0Linear(7, 5, gate="weight")
x, xc = torch.randn(3, 7), torch.randn(2, 3, 6, 6)
la, off = torch.randn(6), torch.arange(9)
refs = []
def run():
    out = []
    for m in (lin, conv, lin_w):
        m.eval()
    out += [lin(x), conv(xc), lin_w(x)]
    for m in (lin, conv, lin_w):
        m.train()
    torch.manual_seed(1)
    y = lin(x).sum() + conv(xc).sum() + lin_w(x).sum()
    grads = torch.autograd.grad(y, [lin.log_alpha, conv.log_alpha, lin_w.log_alpha, lin.weight])
    out += [y.detach(), *grads]
    out += [l0k.philox_uniform(5, off), l0k.sample_gates(la, 3, (2, 6)), l0k.deterministic_gates(la),
            l0k.l0_linear(x, lin.weight, lin.log_alpha, lin.bias, seed=4, gate="in", training=True)]
    return out
refs = run()
with torch.device("meta"):
    got = run()
assert all(g.device.type == "cpu" for g in got), [g.device for g in got]
assert all(torch.equal(a, b) for a, b in zip(refs, got))
print("ok")
"""


def test_cpu_ops_under_a_meta_default_device():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-3000:])
