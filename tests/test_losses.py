"""Tests for distill.losses against independent float64 NumPy/SciPy references."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax as np_log_softmax

import distill.losses.fused_kl as _fused_kl
import distill.losses as losses
from distill.losses import fused_dist as _fused_dist
from distill.losses import (
    DistillLoss, ce_loss, cwd_loss, dist_loss, dist_loss_reference, kd_loss, kd_loss_reference,
)

CHUNKS = [None, 1, 2]


@pytest.fixture(params=["loop", "dense"])
def kd_path(request, monkeypatch):
    """Run a kd_loss test through each kernel: the per-class loop used for large chunks and the
    vectorised one used for small chunks (test tensors are small, so the switch is forced)."""
    monkeypatch.setattr(_fused_kl, "_LOOP_MIN_PIXELS", 0 if request.param == "loop" else 10**12)
    return request.param


# --------------------------------------------------------------------------- independent references
def np_kd(s, t, temperature, target=None, ignore_index=255):
    """float64 NumPy KL(teacher || student) per pixel, masked mean, times T^2."""
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    log_ps = np_log_softmax(s / temperature, axis=1)
    log_pt = np_log_softmax(t / temperature, axis=1)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    valid = np.ones(kl.shape, bool) if target is None else np.asarray(target) != ignore_index
    if not valid.any():
        return 0.0
    return float(kl[valid].mean() * temperature**2)


def np_cwd(s, t, temperature):
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n, c = s.shape[:2]
    log_ps = np_log_softmax(s.reshape(n, c, -1) / temperature, axis=-1)
    log_pt = np_log_softmax(t.reshape(n, c, -1) / temperature, axis=-1)
    return float((np.exp(log_pt) * (log_pt - log_ps)).sum() * temperature**2 / (n * c))


def np_cwd_masked(s, t, temperature, target, ignore_index=255):
    """CWD with each sample's void positions removed before the spatial softmax."""
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        keep = np.asarray(target[i]).reshape(-1) != ignore_index
        if not keep.any():
            continue
        log_ps = np_log_softmax(s[i].reshape(c, -1)[:, keep] / temperature, axis=-1)
        log_pt = np_log_softmax(t[i].reshape(c, -1)[:, keep] / temperature, axis=-1)
        total += (np.exp(log_pt) * (log_pt - log_ps)).sum()
    return float(total * temperature**2 / (n * c))


def np_dist(s, t, temperature, target, ignore_index=255):
    """DIST from its definition: 1 - Pearson over classes (per pixel) and over pixels (per class)."""
    s = np.moveaxis(np.asarray(s, dtype=np.float64), 1, -1)
    t = np.moveaxis(np.asarray(t, dtype=np.float64), 1, -1)
    keep = np.asarray(target) != ignore_index
    p_s = np.exp(np_log_softmax(s[keep] / temperature, axis=1))
    p_t = np.exp(np_log_softmax(t[keep] / temperature, axis=1))
    inter = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t)])
    intra = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s.T, p_t.T)])
    return float(((1 - inter) + (1 - intra)) * temperature**2)


def make(shape=(2, 5, 6, 7), dtype=torch.float64, seed=0, scale=2.0, ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    target[torch.rand(target.shape, generator=g) < ignore] = 255
    if target.numel():
        target.view(-1)[0] = 255  # at least one void pixel
    return s.to(dtype), t.to(dtype), target


def grad_of(fn, s, *args, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


# --------------------------------------------------------------------------- kd_loss values
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_matches_numpy(kd_path, temperature, chunk_size):
    s, t, y = make()
    expected = np_kd(s.numpy(), t.numpy(), temperature, y.numpy())
    got = kd_loss(s, t, temperature=temperature, target=y, chunk_size=chunk_size)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    ref = kd_loss_reference(s, t, temperature=temperature, target=y)
    assert ref.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_kd_float32_and_no_target_and_2d(kd_path):
    s, t, _ = make(dtype=torch.float32)
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(np_kd(s, t, 2.0), rel=1e-5)
    s2, t2, y2 = make(shape=(6, 4), ignore=0.3)  # [N, C] logits with [N] target
    assert kd_loss(s2, t2, temperature=1.5, target=y2, chunk_size=4).item() == pytest.approx(
        np_kd(s2, t2, 1.5, y2), rel=1e-10
    )


def test_kd_zero_when_equal_positive_otherwise_and_asymmetric(kd_path):
    s, t, y = make()
    same, g = grad_of(kd_loss, s, s.clone(), temperature=2.0, target=y)
    assert abs(same.item()) < 1e-12
    assert g.abs().max().item() < 1e-12
    st = kd_loss(s, t, temperature=2.0, target=y)
    ts = kd_loss(t, s, temperature=2.0, target=y)
    assert st.item() > 1e-3 and ts.item() > 1e-3
    assert st.item() != pytest.approx(ts.item(), rel=1e-3)
    # and the asymmetry is the right way round: it is KL(teacher || student)
    assert ts.item() == pytest.approx(np_kd(t, s, 2.0, y), rel=1e-10)


# --------------------------------------------------------------------------- kd_loss gradients
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_gradcheck(kd_path, chunk_size):
    s, t, y = make(shape=(3, 4, 3, 5))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, temperature=1.7, target=y, chunk_size=chunk_size), (s,)
    )
    # teacher at another resolution too
    t_small = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t_small, temperature=0.8, target=y, chunk_size=chunk_size), (s,)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-7)])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_grad_matches_reference(kd_path, dtype, tol, chunk_size):
    s, t, y = make(shape=(3, 6, 8, 9), dtype=dtype, scale=4.0)
    loss, g = grad_of(kd_loss, s, t, temperature=3.0, target=y, chunk_size=chunk_size)
    ref_loss, ref_g = grad_of(kd_loss_reference, s, t, temperature=3.0, target=y)
    assert g.dtype == dtype
    assert torch.allclose(loss, ref_loss, rtol=tol * 10, atol=0)
    assert (g - ref_g).abs().max().item() <= tol * max(ref_g.abs().max().item(), 1e-30) * 10
    void = (y == 255).unsqueeze(1).expand_as(g)
    assert torch.all(g[void] == 0)  # void pixels are not distilled


def test_kd_channels_last_student(kd_path):
    s, t, y = make(shape=(2, 5, 6, 7))
    s_cl = s.contiguous(memory_format=torch.channels_last)
    _, g = grad_of(kd_loss, s_cl, t, temperature=2.0, target=y)
    _, ref_g = grad_of(kd_loss_reference, s, t, temperature=2.0, target=y)
    assert torch.allclose(g, ref_g, rtol=1e-10, atol=1e-15)


def test_kd_upstream_grad_and_retain_graph(kd_path):
    s, t, y = make()
    _, g1 = grad_of(kd_loss, s, t, temperature=2.0, target=y)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, temperature=2.0, target=y)
    (3.0 * loss).backward(retain_graph=True)
    assert torch.allclose(x.grad, 3.0 * g1, rtol=1e-12)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradient must not have been mutated by earlier passes
    assert torch.allclose(x.grad, 5.0 * g1, rtol=1e-12)


def test_kd_default_kernel_choice(monkeypatch):
    calls = []
    for name in ("_kd_chunk", "_kd_chunk_dense"):
        fn = getattr(_fused_kl, name)
        monkeypatch.setattr(_fused_kl, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    s, t, _ = make(shape=(1, 3, 128, 128), dtype=torch.float32)  # 16384 pixels: lean loop
    kd_loss(s, t, temperature=1.0)
    kd_loss(s[..., :64], t[..., :64], temperature=1.0)
    assert calls == ["_kd_chunk", "_kd_chunk_dense"]


def test_kd_empty_batch_and_fp64_teacher():
    s, t, y = make(shape=(0, 3, 4, 5))
    assert kd_loss(s, t, temperature=1.0, target=y).item() == 0.0
    s, t, y = make(shape=(2, 3, 4, 5))
    loss, g = grad_of(kd_loss, s.float(), t, temperature=1.0, target=y)  # fp64 teacher wins
    assert loss.dtype == torch.float64 and g.dtype == torch.float32
    assert loss.item() == pytest.approx(np_kd(s.float(), t, 1.0, y), rel=1e-10)


def test_kd_teacher_gets_no_grad():
    s, t, y = make()
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, temperature=2.0, target=y).backward()
    assert s.grad is not None and t.grad is None


def test_kd_no_grad_mode_returns_value():
    s, t, y = make()
    s.requires_grad_(True)
    with torch.no_grad():
        v = kd_loss(s, t, temperature=2.0, target=y)
    assert not v.requires_grad
    assert v.item() == pytest.approx(np_kd(s.detach(), t, 2.0, y), rel=1e-10)


def test_kd_temperature_squared_keeps_gradient_scale(kd_path):
    # Small logits: p_s - p_t ~ (s - t) / (C T), so d KL/ds ~ 1/T^2; the T^2 factor cancels it.
    s, t, y = make(shape=(2, 5, 6, 7), scale=0.05)
    norms = {T: grad_of(kd_loss, s, t, temperature=T, target=y)[1].norm().item() for T in (1, 4)}
    assert 0.5 < norms[1] / norms[4] < 2.0
    # Without T^2 the same gradients would differ by ~16x: the check above discriminates.
    no_t2 = {T: norms[T] / T**2 for T in norms}
    assert no_t2[1] / no_t2[4] > 10.0


def test_kd_area_invariance(kd_path):
    s, t, y = make(shape=(2, 5, 6, 7), ignore=0.3)

    def tile(x, h_dim):  # the image twice along W, then twice along H
        return torch.cat([torch.cat([x, x], dim=h_dim + 1)] * 2, dim=h_dim)

    s4, t4, y4 = tile(s, 2), tile(t, 2), tile(y, 1)
    base = kd_loss(s, t, temperature=2.0, target=y)
    tiled = kd_loss(s4, t4, temperature=2.0, target=y4)
    assert tiled.item() == pytest.approx(base.item(), rel=1e-12)

    def batchmean(s_, t_, y_):  # sum over pixels / N: what F.kl_div(reduction="batchmean") does
        ls, lt = F.log_softmax(s_ / 2.0, 1), F.log_softmax(t_ / 2.0, 1)
        kl = (lt.exp() * (lt - ls)).sum(1) * (y_ != 255)
        return kl.sum() / s_.shape[0] * 4.0

    assert batchmean(s4, t4, y4).item() == pytest.approx(4 * batchmean(s, t, y).item(), rel=1e-12)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_all_ignored(kd_path, chunk_size):
    s, t, y = make()
    y.fill_(255)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, temperature=2.0, target=y, chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.all(x.grad == 0)
    x2 = s.clone().requires_grad_(True)
    ref = kd_loss_reference(x2, t, temperature=2.0, target=y)
    ref.backward()
    assert ref.item() == 0.0 and torch.all(x2.grad == 0)


def test_kd_large_logits_are_finite(kd_path):
    s, t, y = make(scale=1e4)
    expected = np_kd(s, t, 2.0, y)
    for dtype in (torch.float32, torch.bfloat16):
        loss, g = grad_of(kd_loss, s.to(dtype), t.to(dtype), temperature=2.0, target=y)
        assert torch.isfinite(loss) and torch.isfinite(g.float()).all()
        if dtype == torch.float32:
            assert loss.item() == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- shapes and errors
def test_kd_class_count_mismatch_names_both():
    s = torch.randn(2, 12, 4, 4)
    t = torch.randn(2, 19, 4, 4)
    for fn in (kd_loss, kd_loss_reference, cwd_loss):
        with pytest.raises(ValueError, match=r"12 classes.*19"):
            fn(s, t, temperature=1.0)


def test_kd_target_shape_and_temperature_errors():
    s, t, _ = make(shape=(2, 3, 4, 5))
    bad = torch.zeros(2, 4, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 4, 6\).*\(2, 3, 4, 5\)"):
        kd_loss(s, t, temperature=1.0, target=bad)
    for T in (0.0, -1.5):
        with pytest.raises(ValueError, match=str(T)):
            kd_loss(s, t, temperature=T)
    with pytest.raises(ValueError, match="chunk_size"):
        kd_loss(s, t, temperature=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="batch"):
        kd_loss(s, t[:1], temperature=1.0)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_teacher_resized_bilinear(kd_path, chunk_size):
    s, _, y = make(shape=(2, 4, 8, 12))
    t_small = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    t_up = F.interpolate(t_small, size=(8, 12), mode="bilinear", align_corners=False)
    expected = np_kd(s, t_up, 2.0, y)
    loss, g = grad_of(kd_loss, s, t_small, temperature=2.0, target=y, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    _, g_up = grad_of(kd_loss, s, t_up, temperature=2.0, target=y)
    assert torch.allclose(g, g_up, rtol=1e-10, atol=1e-15)
    ref = kd_loss_reference(s, t_small, temperature=2.0, target=y)
    assert ref.item() == pytest.approx(expected, rel=1e-10)
    # nearest-neighbour resizing would have given a different value: the check discriminates
    t_nn = F.interpolate(t_small, size=(8, 12), mode="nearest")
    assert np_kd(s, t_nn, 2.0, y) != pytest.approx(expected, rel=1e-3)


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kd_bf16(kd_path, chunk_size):
    s, t, y = make(shape=(3, 6, 8, 9), dtype=torch.float32)
    s16, t16 = s.bfloat16(), t.bfloat16()
    loss, g = grad_of(kd_loss, s16, t16, temperature=3.0, target=y, chunk_size=chunk_size)
    assert torch.isfinite(loss) and g.dtype == torch.bfloat16
    # computed in fp32 from the bf16 values (T=3: dividing by a power of 2 would be exact in
    # bf16 and hide a bf16 computation): matches the fp32 result on those very values
    ref_loss, ref_g = grad_of(kd_loss, s16.float(), t16.float(), temperature=3.0, target=y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert torch.allclose(g.float(), ref_g, rtol=1e-2, atol=1e-2 * ref_g.abs().max().item())
    # and close to the fp32 loss of the unrounded logits
    assert loss.item() == pytest.approx(kd_loss(s, t, temperature=3.0, target=y).item(), rel=2e-2)


def test_kd_under_cpu_autocast_matches_fp32(kd_path):
    s, t, y = make(dtype=torch.float32)
    plain, g_plain = grad_of(kd_loss, s, t, temperature=2.0, target=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, g_amp = grad_of(kd_loss, s, t, temperature=2.0, target=y)
    assert amp.dtype == torch.float32 and g_amp.dtype == torch.float32
    assert amp.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(g_amp, g_plain, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- CE and CWD
def test_ce_matches_cross_entropy():
    s, _, y = make(dtype=torch.float32)
    w = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0])
    for weights in (None, w):
        loss, g = grad_of(ce_loss, s, y, class_weights=weights)
        ref, ref_g = grad_of(F.cross_entropy, s, y, weight=weights, ignore_index=255)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(g, ref_g, rtol=1e-5, atol=1e-8)
    y2 = y.masked_fill(y == 255, 7)
    assert ce_loss(s, y2, ignore_index=7).item() == pytest.approx(
        F.cross_entropy(s, y2, ignore_index=7).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="3 entries.*5 classes"):
        ce_loss(s, y, class_weights=torch.ones(3))


def test_ce_all_ignored_is_zero():
    s, _, y = make()
    y.fill_(255)
    x = s.clone().requires_grad_(True)
    loss = ce_loss(x, y, class_weights=torch.ones(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert torch.isnan(F.cross_entropy(s, y, ignore_index=255))  # what the wrapper protects from


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_matches_numpy(temperature):
    s, t, _ = make(shape=(2, 3, 5, 6))
    assert cwd_loss(s, t, temperature=temperature).item() == pytest.approx(
        np_cwd(s, t, temperature), rel=1e-10
    )
    t_small = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    t_up = F.interpolate(t_small, size=(5, 6), mode="bilinear", align_corners=False)
    assert cwd_loss(s, t_small, temperature=temperature).item() == pytest.approx(
        np_cwd(s, t_up, temperature), rel=1e-10
    )
    assert abs(cwd_loss(s, s.clone(), temperature=temperature).item()) < 1e-12
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: cwd_loss(a, t, temperature=temperature), (x,))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_leaves_void_pixels_out(temperature):
    s, t, y = make(shape=(3, 3, 5, 6), ignore=0.3)
    y[2] = 255  # one sample with no labelled pixel: contributes 0, not NaN
    got = cwd_loss(s, t, temperature=temperature, target=y)
    assert got.item() == pytest.approx(np_cwd_masked(s, t, temperature, y), rel=1e-9)
    s2, t2 = s.clone(), t.clone()
    void = (y == 255).unsqueeze(1).expand_as(s2)
    s2[void], t2[void] = 50.0, -50.0  # whatever sits on void pixels changes nothing
    assert cwd_loss(s2, t2, temperature=temperature, target=y).item() == pytest.approx(got.item(), rel=1e-12)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: cwd_loss(a, t, temperature=temperature, target=y), (x,))


def test_cwd_leaves_void_pixels_out_of_a_one_hot_teacher_too():
    # A teacher of +-1e4 logits (one-hot, a class map of hard labels) at T=1: the void fill must
    # sit below its real logits, or void positions share the spatial softmax.
    s, _, y = make(shape=(2, 3, 5, 6), ignore=0.3)
    hard = torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(1))  # class 2 nowhere
    t = torch.full_like(s, -1e4).scatter_(1, hard.unsqueeze(1), 1e4)
    assert cwd_loss(s, t, temperature=1.0, target=y).item() == pytest.approx(np_cwd_masked(s, t, 1.0, y), rel=1e-9)


@pytest.mark.parametrize("loss_fn", ["kd", "dist"])
def test_fused_gradients_survive_an_fp16_loss_scaler(loss_fn):
    # fp16 mixed precision: logits in fp16, the loss scaled by GradScaler's initial 65536 (inf in
    # fp16), and a per-pixel gradient divided by many pixels (below fp16's smallest numbers).
    s, t, y = make(shape=(2, 5, 96, 128), ignore=0.1)
    x = s.half().requires_grad_(True)
    fn = (lambda a, b: kd_loss(a, b, temperature=2.0, target=y)) if loss_fn == "kd" else \
        (lambda a, b: dist_loss(a, b, temperature=1.0, target=y))
    ref = (lambda a, b: kd_loss_reference(a, b, temperature=2.0, target=y)) if loss_fn == "kd" else \
        (lambda a, b: dist_loss_reference(a, b, temperature=1.0, target=y))
    (fn(x, t.float()) * 65536.0).backward()
    _, exact = grad_of(lambda a: ref(a, t) * 65536.0, x.detach().double())
    assert x.grad.dtype == torch.float16 and bool(torch.isfinite(x.grad).all())
    assert float((x.grad.double() - exact).norm() / exact.norm()) < 2e-3
    assert float((x.grad == 0).double().mean()) <= float((exact == 0).double().mean()) + 1e-3


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dist_matches_numpy(temperature):
    s, t, y = make(shape=(2, 4, 5, 6))
    assert dist_loss(s, t, temperature=temperature, target=y).item() == pytest.approx(
        np_dist(s, t, temperature, y), rel=1e-7  # the 1e-8 eps in the denominator
    )
    # Pearson ignores scale and shift of the student's probabilities: equal ones give 0.
    assert abs(dist_loss(t, t.clone(), temperature=temperature, target=y).item()) < 1e-4  # eps
    all_valid = torch.zeros_like(y)
    assert dist_loss(s, t, temperature=temperature).item() == pytest.approx(
        np_dist(s, t, temperature, all_valid), rel=1e-7
    )
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: dist_loss(a, t, temperature=temperature, target=y), (x,))


def test_dist_with_no_labelled_pixel_is_zero_with_zero_grad():
    s, t, y = make(shape=(1, 3, 2, 2))
    x = s.clone().requires_grad_(True)
    loss = dist_loss(x, t, temperature=1.0, target=torch.full_like(y, 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("sweep_pixels", [65536, 40])  # one sweep; several, merged
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_dist_equals_the_autograd_reference(temperature, sweep_pixels, monkeypatch):
    monkeypatch.setattr(_fused_dist, "_SWEEP_PIXELS", sweep_pixels)  # 40: a sample per sweep
    s, t, y = make(shape=(4, 5, 6, 7), ignore=0.3)
    y[1] = 255  # a sweep with no labelled pixel merges as nothing
    for target in (y, None):
        loss, g = grad_of(dist_loss, s, t, temperature=temperature, target=target)
        ref, ref_g = grad_of(dist_loss_reference, s, t, temperature=temperature, target=target)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(g, ref_g, rtol=1e-9, atol=1e-15)
    t_small = torch.randn(4, 5, 3, 4, dtype=torch.float64)  # resized to the student's size
    loss, g = grad_of(dist_loss, s, t_small, temperature=temperature, target=y)
    ref, ref_g = grad_of(dist_loss_reference, s, t_small, temperature=temperature, target=y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and torch.allclose(g, ref_g, atol=1e-15)
    s2, t2 = s.clone(), t.clone()
    void = (y == 255).unsqueeze(1).expand_as(s2)
    s2[void], t2[void] = float("inf"), float("nan")  # whatever sits on void pixels changes nothing
    loss2, g2 = grad_of(dist_loss, s2, t2, temperature=temperature, target=y)
    loss, g = grad_of(dist_loss, s, t, temperature=temperature, target=y)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12) and torch.allclose(g2, g, atol=1e-15)


def test_fused_dist_works_in_the_channels_last_layout(monkeypatch):
    monkeypatch.setattr(_fused_dist, "_SWEEP_PIXELS", 40)
    s, t, y = make(shape=(3, 5, 6, 7))
    loss, g = grad_of(dist_loss, s, t, temperature=2.0, target=y)
    s_cl = s.contiguous(memory_format=torch.channels_last)
    loss_cl, g_cl = grad_of(dist_loss, s_cl, t, temperature=2.0, target=y)
    assert loss_cl.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(g_cl, g, atol=1e-15)
    assert g_cl.is_contiguous(memory_format=torch.channels_last)  # no layout change in backward


def test_fused_dist_keeps_the_variation_of_a_class_nobody_predicts(monkeypatch):
    # A class with probability ~1e-13 everywhere: in float32, p - 1/C rounds its variation away,
    # and sum x^2 - (sum x)^2 / M cancels it; its intra-class Pearson must still be the fp64 one.
    monkeypatch.setattr(_fused_dist, "_SWEEP_PIXELS", 64)
    s, t, y = make(shape=(3, 4, 8, 8), scale=3.0)
    s[:, 2] -= 30
    t[:, 2] -= 30
    exact, exact_g = grad_of(dist_loss_reference, s, t, temperature=1.0, target=y)
    loss, g = grad_of(dist_loss, s.float(), t.float(), temperature=1.0, target=y)
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    assert torch.allclose(g.double(), exact_g, rtol=1e-3, atol=1e-9)


def test_fused_dist_half_precision_and_no_grad():
    s, t, y = make(shape=(2, 3, 5, 6))
    x = s.to(torch.bfloat16).requires_grad_(True)
    loss = dist_loss(x, t.to(torch.bfloat16), temperature=1.0, target=y)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = dist_loss_reference(x.detach().double(), t.to(torch.bfloat16).double(), temperature=1.0, target=y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.no_grad():
        assert dist_loss(s, t, temperature=1.0, target=y).item() == pytest.approx(
            dist_loss_reference(s, t, temperature=1.0, target=y).item(), rel=1e-12)


# --------------------------------------------------------------------------- DistillLoss
def test_distill_loss_combines_parts():
    s, t, y = make(dtype=torch.float32)
    weights = [1, 2, 1, 1, 0.5]
    crit = DistillLoss(ce_weight=0.7, kd_weight=2.5, temperature=3.0, class_weights=weights)
    x = s.clone().requires_grad_(True)
    out = crit(x, y, t)
    assert set(out) == {"loss", "ce", "kd"}
    assert out["kd"].requires_grad and out["ce"].requires_grad
    combined = 0.7 * out["ce"].item() + 2.5 * out["kd"].item()
    assert out["loss"].item() == pytest.approx(combined, rel=1e-6)
    w = torch.tensor(weights)
    ce_ref = F.cross_entropy(s, y, weight=w, ignore_index=255)
    assert out["ce"].item() == pytest.approx(ce_ref.item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(np_kd(s, t, 3.0, y), rel=1e-5)
    out["loss"].backward()
    ce_g = grad_of(ce_loss, s, y, class_weights=w)[1]
    kd_g = grad_of(kd_loss, s, t, temperature=3.0, target=y)[1]
    assert torch.allclose(x.grad, 0.7 * ce_g + 2.5 * kd_g, rtol=1e-5, atol=1e-8)


def test_distill_loss_skips_kd_without_teacher_or_weight(monkeypatch):
    s, t, y = make(dtype=torch.float32)

    def boom(*args, **kwargs):
        raise AssertionError("kd must not be computed")

    monkeypatch.setattr(losses, "kd_loss", boom)
    out = DistillLoss(kd_weight=1.0)(s, y)
    assert out["kd"].item() == 0.0 and out["loss"].item() == pytest.approx(out["ce"].item())
    out = DistillLoss(kd_weight=0.0)(s, y, t)
    assert out["kd"].item() == 0.0


def test_distill_loss_cwd_kind():
    s, t, y = make()
    out = DistillLoss(ce_weight=0.0, kd_weight=1.0, temperature=2.0, kind="cwd")(s, y, t)
    assert out["kd"].item() == pytest.approx(np_cwd_masked(s, t, 2.0, y), rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["kd"].item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["kl", "cwd", "dist"])
def test_distill_loss_teacher_correct_pixels(kind):
    s, t, y = make(shape=(2, 4, 6, 8))
    t_small = torch.randn(2, 4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = {"kl": np_kd, "cwd": np_cwd_masked, "dist": np_dist}[kind]
    rel = 1e-6 if kind == "dist" else 1e-7  # DIST's 1e-8 in each Pearson denominator (np.corrcoef has none)
    for teacher in (t, t_small):
        t_full = F.interpolate(teacher, size=(6, 8), mode="bilinear", align_corners=False)
        masked = y.clone()
        masked[t_full.argmax(1) != y] = 255  # taught only where the teacher's top class is right
        assert 0 < int((masked != 255).sum()) < int((y != 255).sum())
        crit = DistillLoss(kd_weight=1.0, temperature=2.0, kind=kind, kd_pixels="teacher_correct")
        got = crit(s, y, teacher)["kd"].item()
        assert got == pytest.approx(reference(s, t_full, 2.0, masked), rel=rel)
        plain = DistillLoss(kd_weight=1.0, temperature=2.0, kind=kind)(s, y, teacher)["kd"].item()
        assert plain == pytest.approx(reference(s, t_full, 2.0, y), rel=rel)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"ce_weight": -1.0}, "-1.0"),
        ({"kd_weight": -0.25}, "-0.25"),
        ({"temperature": 0.0}, "0.0"),
        ({"temperature": -2.0}, "-2.0"),
        ({"kind": "mse"}, "mse"),
        ({"kd_pixels": "all"}, "kd_pixels must be one of"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"class_weights": [1.0, -3.0]}, "-3.0"),
    ],
)
def test_distill_loss_validation_names_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        DistillLoss(**kwargs)


def test_distill_loss_from_config():
    cfg = SimpleNamespace(
        ce_weight=0.5, kd_weight=2.0, temperature=4.0, kind="kl", class_weights=None, chunk_size=2
    )
    crit = DistillLoss.from_config(cfg, ignore_index=7)
    got = (crit.ce_weight, crit.kd_weight, crit.temperature, crit.kind, crit.chunk_size)
    assert got == (0.5, 2.0, 4.0, "kl", 2) and crit.ignore_index == 7
    with pytest.raises(ValueError, match="bogus"):
        DistillLoss.from_config(SimpleNamespace(kind="bogus"), ignore_index=255)
    crit = DistillLoss.from_config(SimpleNamespace(class_weights=[1.0, 2.0]), ignore_index=255)
    assert crit.class_weights is not None and crit.class_weights.tolist() == [1.0, 2.0]
    assert crit.to(torch.float64).class_weights.dtype == torch.float64  # buffer moves with .to()


@pytest.mark.parametrize("kd_pixels", ["labelled", "teacher_correct"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 1.0, 3.0]])
def test_share_makes_two_halves_average_to_the_whole_batch(kd_pixels, weights):
    # Two "processes" with very different numbers of labelled pixels: averaging their losses
    # (as DDP averages gradients) must give the whole batch's loss and gradient.
    s, t, y = make(shape=(4, 5, 6, 7), dtype=torch.float64)
    y[:2][torch.rand(y[:2].shape, generator=torch.Generator().manual_seed(1)) < 0.7] = 255
    crit = DistillLoss(ce_weight=0.6, kd_weight=1.5, temperature=2.0, class_weights=weights,
                       kd_pixels=kd_pixels)
    x = s.clone().requires_grad_(True)
    whole = crit(x, y, t)
    whole["loss"].backward()
    expected_grad, x.grad = x.grad.clone(), None

    # The counts an all-reduce would sum, computed here independently of the loss code.
    valid = y != 255
    w = torch.ones(5, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    ce_count = [(w[y[h].clamp(max=4)] * valid[h]).sum() for h in (slice(0, 2), slice(2, 4))]
    taught = valid & (t.argmax(1) == y) if kd_pixels == "teacher_correct" else valid
    kd_count = [taught[h].sum().double() for h in (slice(0, 2), slice(2, 4))]
    results = []
    for i, h in enumerate((slice(0, 2), slice(2, 4))):
        # The loss asks for its CE share first, then its KL share.
        shares = iter([ce_count[i] * 2 / sum(ce_count), kd_count[i] * 2 / sum(kd_count)])
        results.append(crit(x[h], y[h], t[h], share=lambda count: next(shares)))
    mean = {k: (results[0][k] + results[1][k]) / 2 for k in ("loss", "ce", "kd")}
    assert mean["ce"].item() == pytest.approx(whole["ce"].item(), rel=1e-12)
    assert mean["kd"].item() == pytest.approx(whole["kd"].item(), rel=1e-12)
    mean["loss"].backward()
    assert torch.allclose(x.grad, expected_grad, rtol=1e-10, atol=1e-14)
    # Without the share, the halves' plain mean differs: the test can fail.
    plain = (crit(s[:2], y[:2], t[:2])["loss"] + crit(s[2:], y[2:], t[2:])["loss"]) / 2
    assert abs(plain.item() - whole["loss"].item()) > 1e-3


def test_share_weights_the_pseudo_label_ce_too():
    # Unlabelled pixels (kd_target set, target void) pseudo-labelled where the teacher is sure:
    # the halves' weighted mean equals the whole batch's, loss and gradient.
    s, t, y = make(shape=(4, 5, 6, 7), dtype=torch.float64)
    t = t * 4  # confident enough that many pixels pass the threshold
    y[:3] = 255  # three unlabelled images, one labelled
    kd_target = torch.zeros_like(y)
    kd_target[0, :, :2] = 255  # padding of an unlabelled image: neither distilled nor pseudo-labelled
    crit = DistillLoss(ce_weight=1.0, kd_weight=0.5, pseudo_label_weight=2.0, pseudo_label_threshold=0.6)
    x = s.clone().requires_grad_(True)
    crit(x, y, t, kd_target=kd_target)["loss"].backward()
    expected_grad, x.grad = x.grad.clone(), None

    confident = torch.softmax(t, 1).amax(1) >= 0.6
    counts = {"ce": [], "kd": [], "pseudo": []}
    for h in (slice(0, 1), slice(1, 4)):
        counts["ce"].append((y[h] != 255).sum().double())
        counts["kd"].append((kd_target[h] != 255).sum().double())
        counts["pseudo"].append(((y[h] == 255) & (kd_target[h] != 255) & confident[h]).sum().double())
    assert min(counts["pseudo"]) > 0
    total = 0
    for i, h in enumerate((slice(0, 1), slice(1, 4))):
        shares = iter([c[i] * 2 / sum(c) for c in (counts["ce"], counts["kd"], counts["pseudo"])])
        total = total + crit(x[h], y[h], t[h], kd_target=kd_target[h], share=lambda count: next(shares))["loss"] / 2
    total.backward()
    assert torch.allclose(x.grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_a_teacher_logit_of_minus_infinity_counts_as_probability_zero():
    # A streamed teacher may mask classes out with -inf: KL counts them as p_t = 0 (F.kl_div's
    # convention), on the per-class loop path and on the vectorised one.
    for shape in ((2, 5, 4, 6), (2, 5, 128, 130)):
        s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        t = torch.randn(shape, dtype=torch.float64)
        t[:, 0] = -float("inf")
        p_t = torch.softmax(t / 2, 1)
        log_p_s = torch.log_softmax(s / 2, 1)
        expected = 4 * (p_t[:, 1:] * (p_t[:, 1:].log() - log_p_s[:, 1:])).sum(1).mean()
        loss = kd_loss(s, t, temperature=2.0)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
        loss.backward()
        grad, s.grad = s.grad.clone(), None
        expected.backward()
        assert torch.allclose(grad, s.grad, atol=1e-12)
        t[0, 1, 0, 0] = float("nan")  # a broken teacher is still seen as one
        assert torch.isnan(kd_loss(s.detach(), t, temperature=2.0))


def test_share_is_asked_with_the_local_counts():
    s, t, y = make(shape=(2, 5, 6, 7))
    asked = []
    DistillLoss(kd_weight=1.0, kd_pixels="teacher_correct")(s, y, t, share=lambda c: asked.append(c) or 1.0)
    valid = y != 255
    assert [int(c) for c in asked] == [int(valid.sum()), int((valid & (t.argmax(1) == y)).sum())]
    # With pseudo-labels, third: the unlabelled pixels where the teacher is confident.
    asked.clear()
    kd_target = torch.zeros_like(y)
    DistillLoss(kd_weight=1.0, pseudo_label_weight=1.0, pseudo_label_threshold=0.5)(
        s, y, t, kd_target=kd_target, share=lambda c: asked.append(c) or 1.0)
    confident = torch.softmax(t, 1).amax(1) >= 0.5
    assert [int(c) for c in asked] == [int(valid.sum()), int(kd_target.numel()), int((~valid & confident).sum())]


def test_a_feature_term_without_the_logit_term_is_still_added():
    # kd_weight 0 with a feature term (CE + hint): the recipe distils, so the feature term must
    # be in the loss, with the mask of the pixels the teacher sees.
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = 255
    seen = []

    def features(student_sizes, teacher_sizes, mask):
        seen.append(mask)
        return torch.tensor(0.25)

    loss = losses.DistillLoss(ce_weight=1.0, kd_weight=0.0, ignore_index=255, features=features, feature_weight=2.0)
    parts = loss(student, target, torch.randn(2, 3, 4, 4), feature_sizes=([[4, 4]] * 2, [[4, 4]] * 2))
    assert float(parts["kd"]) == 0.0 and float(parts["feature"]) == 0.25
    torch.testing.assert_close(parts["loss"], F.cross_entropy(student, target, ignore_index=255) + 0.5)
    assert torch.equal(seen[0], target)


def test_a_recipe_whose_weights_train_nothing_is_refused():
    from distill.config import RecipeError
    from helpers import tiny_recipe

    with pytest.raises(RecipeError, match="loss.ce_weight and loss.kd_weight are both 0"):
        tiny_recipe("run", teacher=True, **{"loss.ce_weight": 0.0, "loss.kd_weight": 0.0,
                                            "loss.feature": "{kind: hint, pairs: [[-1, -1]]}"})
