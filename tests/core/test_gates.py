"""Hard-concrete gates (docs/design.md §1) and their offsets (docs/design.md §2).

The float64 formulas are written out here, independently of ``l0kernels._gates``; only the raw
uniforms come from ``philox_uniform`` (tested bit for bit against ``tl.rand`` in test_philox.py).
"""
import math

import pytest
import torch

import l0kernels as l0k
from l0kernels import philox_uniform
from l0kernels._gates import GateConfig, gates_from_uniform

BETA, GAMMA, ZETA, EPS = 2.0 / 3.0, -0.1, 1.1, 1e-6
CONSTS = [(BETA, GAMMA, ZETA), (0.5, -0.2, 1.05), (0.9, -0.05, 1.3)]


# ---- the contract's formulas (docs/design.md §1), float64 -------------------------------------------------------------------------
def spec_s(log_alpha, u_raw, beta=BETA):
    u = u_raw.double().clamp(EPS, 1 - EPS)
    return torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha.double()) / beta)


def spec_z(log_alpha, u_raw, beta=BETA, gamma=GAMMA, zeta=ZETA):
    s_bar = spec_s(log_alpha, u_raw, beta) * (zeta - gamma) + gamma
    return s_bar.clamp(0.0, 1.0)


def spec_dz(log_alpha, u_raw, beta=BETA, gamma=GAMMA, zeta=ZETA):
    s = spec_s(log_alpha, u_raw, beta)
    s_bar = s * (zeta - gamma) + gamma
    inside = (s_bar > 0) & (s_bar < 1)
    return torch.where(inside, (zeta - gamma) * s * (1 - s) / beta, torch.zeros_like(s))


def spec_z_eval(log_alpha, gamma=GAMMA, zeta=ZETA):
    return (torch.sigmoid(log_alpha.double()) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def spec_p_open(log_alpha, beta=BETA, gamma=GAMMA, zeta=ZETA):
    return torch.sigmoid(log_alpha.double() - beta * math.log(-gamma / zeta))


def rand_log_alpha(shape, gen, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ---- sampled gates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("consts", CONSTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 17, 2**32 + 5, 2**63 - 1])
def test_sample_gates_batch_shape_G(seed, dtype, consts):
    beta, gamma, zeta = consts
    gen = torch.Generator().manual_seed(seed % 997)
    la = rand_log_alpha((37,), gen, dtype)
    z = l0k.sample_gates(la, seed, beta=beta, gamma=gamma, zeta=zeta)
    assert z.shape == (37,) and z.dtype == dtype
    u = philox_uniform(seed, torch.arange(37))  # offset g
    ref = spec_z(la, u, beta, gamma, zeta)
    assert (z.double() - ref).abs().max() <= 1e-6
    assert bool((z >= 0).all() and (z <= 1).all())


@pytest.mark.parametrize("seed", [1, 2**40 + 3])
def test_sample_gates_per_example_shape_MG(seed):
    gen = torch.Generator().manual_seed(5)
    M, G = 13, 7
    la = rand_log_alpha((G,), gen)
    z = l0k.sample_gates(la, seed, (M, G))
    assert z.shape == (M, G)
    off = torch.arange(M)[:, None] * G + torch.arange(G)[None, :]  # m*G + g
    ref = spec_z(la[None, :], philox_uniform(seed, off))
    assert (z.double() - ref).abs().max() <= 1e-6
    # rows differ (fresh noise per example) and row 0 equals the batch draw
    assert not torch.equal(z[0], z[1])
    assert (z[0] - l0k.sample_gates(la, seed)).abs().max() <= 1e-6


@pytest.mark.parametrize("seed", [2, 2**62 + 1])
def test_sample_gates_weight_shape_NK(seed):
    gen = torch.Generator().manual_seed(6)
    N, K = 5, 11
    la = rand_log_alpha((N, K), gen)
    z = l0k.sample_gates(la, seed)
    off = torch.arange(N)[:, None] * K + torch.arange(K)[None, :]  # n*K + k
    ref = spec_z(la, philox_uniform(seed, off))
    assert z.shape == (N, K)
    assert (z.double() - ref).abs().max() <= 1e-6
    # explicit shape equal to log_alpha's gives the same tensor
    assert torch.equal(z, l0k.sample_gates(la, seed, (N, K)))


def test_sample_gates_half_dtypes_match_formula():
    gen = torch.Generator().manual_seed(8)
    la64 = rand_log_alpha((29,), gen, torch.float64)
    u = philox_uniform(77, torch.arange(29))
    for dt, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        la = la64.to(dt)
        z = l0k.sample_gates(la, 77)
        assert z.dtype == dt
        # the gate is computed in float32 from the half log_alpha, then rounded to the half type
        assert (z.double() - spec_z(la, u)).abs().max() <= tol


def test_sample_gates_differ_across_seeds_and_repeat_for_same_seed():
    la = torch.zeros(64)
    a = l0k.sample_gates(la, 10)
    assert torch.equal(a, l0k.sample_gates(la, 10))
    assert not torch.equal(a, l0k.sample_gates(la, 11))


@pytest.mark.parametrize("consts", CONSTS)
def test_sample_gates_gradient_is_spec_derivative(consts):
    beta, gamma, zeta = consts
    gen = torch.Generator().manual_seed(9)
    M, G = 9, 31
    la = rand_log_alpha((G,), gen, torch.float64, scale=3.0).requires_grad_()
    seed = 4242
    z = l0k.sample_gates(la, seed, (M, G), beta=beta, gamma=gamma, zeta=zeta)
    w = torch.randn(M, G, generator=gen, dtype=torch.float64)
    (z * w).sum().backward()
    u = philox_uniform(seed, torch.arange(M * G).reshape(M, G))
    dz = spec_dz(la.detach()[None], u, beta, gamma, zeta)
    assert torch.allclose(la.grad, (w * dz).sum(0), rtol=1e-10, atol=1e-12)
    # the sample includes clamped gates, and their derivative is 0
    zd = z.detach()
    clamped = (zd == 0) | (zd == 1)
    assert clamped.any() and (~clamped).any()
    assert (dz[clamped] == 0).all()


# ---- derivative on the clamped region, boundaries included ------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("target", [0.0, 1.0])
def test_derivative_zero_at_exact_clamp_boundary(dtype, target):
    # gamma=-0.5, zeta=1.5, beta=1, u=0.5: s_bar = 2*sigmoid(log_alpha) - 0.5 is computed exactly, so a
    # sweep of log_alpha across sigmoid^-1(1/4) (or 3/4) one ulp at a time lands exactly on s_bar == 0 (or 1).
    cfg = GateConfig(beta=1.0, gamma=-0.5, zeta=1.5)
    base = math.log(3.0) * (1 if target == 1.0 else -1)
    step = 2.0**-50 if dtype == torch.float64 else 2.0**-22
    la = (base + torch.arange(-300, 301, dtype=torch.float64) * step).to(dtype)
    u = torch.full_like(la, 0.5)
    s_bar = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / cfg.beta) * (cfg.zeta - cfg.gamma) + cfg.gamma
    on_boundary = s_bar == target
    assert on_boundary.any(), "the sweep should hit the boundary exactly"
    z, dz = gates_from_uniform(la, u, cfg)
    assert (z[on_boundary] == target).all()
    assert (dz[on_boundary] == 0).all()
    clamped = (s_bar <= 0) | (s_bar >= 1)
    assert (dz[clamped] == 0).all()
    assert (dz[~clamped] > 0).all()


def test_derivative_zero_deep_in_clamped_region():
    cfg = GateConfig()
    la = torch.tensor([-30.0, -8.0, 8.0, 30.0], dtype=torch.float64)
    u = torch.full_like(la, 0.5)
    z, dz = gates_from_uniform(la, u, cfg)
    assert z.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert dz.tolist() == [0.0, 0.0, 0.0, 0.0]
    # u_raw outside [eps, 1-eps] (0 and 1 exactly) is clamped, never log(0)
    z, dz = gates_from_uniform(torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), cfg)
    assert torch.isfinite(z).all() and torch.isfinite(dz).all() and z.tolist() == [0.0, 1.0]


# ---- deterministic gates -------------------------------------------------------------------------------
@pytest.mark.parametrize("consts", CONSTS)
def test_deterministic_gates_thresholds_float64(consts):
    beta, gamma, zeta = consts
    lo, hi = math.log(-gamma / zeta), math.log((1 - gamma) / (zeta - 1))
    la = torch.tensor([lo - 5, lo - 1e-6, lo, lo + 1e-6, 0.0, hi - 1e-6, hi, hi + 1e-6, hi + 5], dtype=torch.float64)
    z = l0k.deterministic_gates(la, beta=beta, gamma=gamma, zeta=zeta)
    assert z[:3].tolist() == [0.0, 0.0, 0.0]
    assert z[-3:].tolist() == [1.0, 1.0, 1.0]
    assert (z[3:6] > 0).all() and (z[3:6] < 1).all()
    assert torch.allclose(z, spec_z_eval(la, gamma, zeta), rtol=0, atol=1e-15)
    cfg = GateConfig(beta=beta, gamma=gamma, zeta=zeta)
    assert cfg.closed_threshold == pytest.approx(lo) and cfg.open_threshold == pytest.approx(hi)


@pytest.mark.parametrize("consts", CONSTS)
def test_deterministic_gates_float32(consts):
    beta, gamma, zeta = consts
    lo, hi = math.log(-gamma / zeta), math.log((1 - gamma) / (zeta - 1))
    la = torch.tensor([lo - 1e-3, lo - 1e-6, hi + 1e-6, hi + 1e-3], dtype=torch.float64).float()
    z = l0k.deterministic_gates(la, beta=beta, gamma=gamma, zeta=zeta)
    assert z.dtype == torch.float32 and z.tolist() == [0.0, 0.0, 1.0, 1.0]
    gen = torch.Generator().manual_seed(3)
    la = rand_log_alpha((101,), gen)
    z = l0k.deterministic_gates(la, beta=beta, gamma=gamma, zeta=zeta)
    assert (z.double() - spec_z_eval(la, gamma, zeta)).abs().max() <= 1e-6


def test_deterministic_gates_gradient():
    lo, hi = math.log(1 / 11), math.log(11)
    la = torch.tensor([lo - 1, lo, lo + 0.5, 0.0, 1.3, hi, hi + 1], dtype=torch.float64, requires_grad=True)
    l0k.deterministic_gates(la).sum().backward()
    s = torch.sigmoid(la.detach())
    ref = 1.2 * s * (1 - s)
    assert la.grad[[0, 1, 5, 6]].tolist() == [0.0, 0.0, 0.0, 0.0]  # clamped, boundaries included
    assert torch.allclose(la.grad[2:5], ref[2:5], rtol=1e-12)


# ---- P(open), expected L0 ------------------------------------------------------------------------------
@pytest.mark.parametrize("consts", CONSTS)
def test_prob_open_and_expected_l0_formula_and_gradient(consts):
    beta, gamma, zeta = consts
    gen = torch.Generator().manual_seed(11)
    la = rand_log_alpha((3, 17), gen, torch.float64, scale=3.0).requires_grad_()
    p = l0k.prob_open(la, beta=beta, gamma=gamma, zeta=zeta)
    ref = spec_p_open(la.detach(), beta, gamma, zeta)
    assert p.shape == la.shape
    assert torch.allclose(p.detach(), ref, rtol=1e-13, atol=0)
    e = l0k.expected_l0(la, beta=beta, gamma=gamma, zeta=zeta)
    assert e.dim() == 0 and e.item() == pytest.approx(float(ref.sum()), rel=1e-12)
    e.backward()
    assert torch.allclose(la.grad, ref * (1 - ref), rtol=1e-12)
    torch.autograd.gradcheck(lambda t: l0k.prob_open(t, beta=beta, gamma=gamma, zeta=zeta), (la.detach().requires_grad_(),))


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.7, 2.0])
def test_fraction_of_exact_zeros_is_one_minus_prob_open(log_alpha):
    # 20000 draws per gate from a single (M, G) noise tensor, plus 2000 seeds of a (G,) vector
    G = 3
    la = torch.full((G,), log_alpha)
    p_closed = 1.0 - float(l0k.prob_open(torch.tensor(log_alpha, dtype=torch.float64)))
    z = l0k.sample_gates(la, 123456789, (20000 // G + 1, G)).reshape(-1)[:20000]
    n = z.numel()
    tol = 4 * math.sqrt(p_closed * (1 - p_closed) / n) + 1e-9
    assert abs(float((z == 0).double().mean()) - p_closed) <= tol
    zs = torch.stack([l0k.sample_gates(la, seed) for seed in range(1000, 3000)]).reshape(-1)
    tol = 4 * math.sqrt(p_closed * (1 - p_closed) / zs.numel()) + 1e-9
    assert abs(float((zs == 0).double().mean()) - p_closed) <= tol
    # and exact ones: P(z = 1) = P(s_bar >= 1) = sigmoid(log_alpha - beta * log((1 - gamma) / (zeta - 1)))
    p_one = 1 / (1 + math.exp(-(log_alpha - BETA * math.log((1 - GAMMA) / (ZETA - 1)))))
    tol = 4 * math.sqrt(p_one * (1 - p_one) / n) + 1e-9
    assert abs(float((z == 1).double().mean()) - p_one) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2.0**-9), (torch.float16, 2.0**-12)], ids=str)
def test_deterministic_gates_half_dtypes_are_rounded_formula(dtype, tol):
    la = torch.linspace(-3, 3, 2001, dtype=torch.float64).to(dtype)
    z = l0k.deterministic_gates(la)
    assert z.dtype == dtype
    # float32 math, then one rounding to the half type: within half an ulp of the float64 formula
    assert (z.double() - spec_z_eval(la)).abs().max() <= tol
    assert torch.equal(z == 0, spec_z_eval(la) == 0)
    # and the same gates as the layers' eval path
    m = l0k.L0Linear(la.numel(), 1, dtype=dtype)
    with torch.no_grad():
        m.log_alpha.copy_(la)
    assert torch.equal(m.deterministic_gates(), z)
    la_g = la.clone().requires_grad_()
    l0k.deterministic_gates(la_g).float().sum().backward()
    assert la_g.grad.dtype == dtype and torch.isfinite(la_g.grad.float()).all()
