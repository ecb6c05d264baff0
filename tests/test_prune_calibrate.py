"""Calibration statistics: GEMM-form input columns, Wanda norms, Gram matrices and Taylor scores
against independent float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyhwp.prune import activation_norms, input_grams, taylor_scores
from pyhwp.prune.calibrate import gemm_columns
from tiny_models import single_thread, tiny_chain  # noqa: F401 (autouse fixture)

CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "pad-stride": dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, stride=2),
    "dilation-rect": dict(in_channels=2, out_channels=3, kernel_size=(3, 2), padding=(2, 1), dilation=(2, 1)),
    "same-reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect"),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise-1x1-stride": dict(in_channels=4, out_channels=4, kernel_size=1, stride=3, groups=4),
}


def _reference_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(groups, P, K) by slicing the padded input at every kernel offset: rows (n, oh, ow), columns
    (c, i, j) of each group: the GEMM form conv2d computes."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cg = conv.in_channels // conv.groups
    out = []
    for g in range(conv.groups):
        cols = []
        for c in range(g * cg, (g + 1) * cg):
            for i in range(kh):
                for j in range(kw):
                    patch = xp[:, c, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                    cols.append(patch.reshape(-1))
        out.append(torch.stack(cols, dim=1))
    return torch.stack(out)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_gemm_columns_match_slicing_and_conv(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[cfg]).double()
    x = torch.randn(3, conv.in_channels, 9, 8, dtype=torch.float64)
    cols = torch.cat(list(gemm_columns(conv, x)), dim=1)
    ref = _reference_columns(conv, x)
    torch.testing.assert_close(cols, ref, rtol=0, atol=0)
    # the columns times the GEMM-form weight are the conv itself
    y = conv(x)
    wg = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)
    gemm = torch.einsum("gpk,gok->gop", cols, wg).reshape(conv.out_channels, y.shape[0], -1).transpose(0, 1)
    torch.testing.assert_close(gemm + conv.bias[None, :, None], y.reshape(y.shape[0], conv.out_channels, -1))


def _loader(x, batch=2):
    return [x[i:i + batch] for i in range(0, x.shape[0], batch)]


@pytest.mark.parametrize("cfg", CONVS)
def test_activation_norms_and_grams_conv(cfg):
    torch.manual_seed(1)
    conv = nn.Conv2d(**CONVS[cfg])
    model = nn.Sequential(conv)
    x = torch.randn(5, conv.in_channels, 9, 8)
    ref = _reference_columns(conv, x)  # (groups, P, K)
    norms = activation_norms(model, _loader(x))["0"]
    ref_norms = ref.square().sum(1).sqrt()
    if conv.groups == 1:
        assert norms.shape == conv.weight.shape[1:]
        torch.testing.assert_close(norms, ref_norms[0].reshape(conv.weight.shape[1:]))
    else:
        assert norms.shape == conv.weight.shape
        per_out = ref_norms.repeat_interleave(conv.out_channels // conv.groups, 0)
        torch.testing.assert_close(norms, per_out.reshape(conv.weight.shape))
    gram = input_grams(model, _loader(x))["0"]
    aug = torch.cat([ref, torch.ones(*ref.shape[:2], 1, dtype=ref.dtype)], dim=2)
    torch.testing.assert_close(gram, aug.transpose(1, 2) @ aug)


def test_activation_norms_linear_3d_inputs_and_batches():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(7, 5, 6)
    norms = activation_norms(model, _loader(x, 3), batches=2)  # first 6 samples only
    torch.testing.assert_close(norms["0"], x[:6].double().reshape(-1, 6).square().sum(0).sqrt())
    hidden = torch.relu(model[0](x[:6])).double().reshape(-1, 4)
    torch.testing.assert_close(norms["2"], hidden.square().sum(0).sqrt())
    assert norms["0"].dtype == torch.float64


def test_calibration_leaves_model_state_alone():
    model = tiny_chain().train()
    bn = model[1]
    mean = bn.running_mean.clone()
    x = torch.randn(8, 3, 8, 8)
    activation_norms(model, [(x, torch.zeros(8))])
    input_grams(model, [x], layers=["5"])
    taylor_scores(model, [(x, torch.zeros(8, dtype=torch.long))], nn.functional.cross_entropy)
    assert model.training and torch.equal(bn.running_mean, mean)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_scores_sum_abs_w_grad_over_batches():
    model = tiny_chain()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    scores = taylor_scores(model, batches, nn.functional.cross_entropy)
    expected = {n: torch.zeros_like(m.weight, dtype=torch.float64)
                for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n in expected:
            w = model.get_submodule(n).weight
            expected[n] += (w.double() * w.grad.double()).abs()
    assert scores.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n])


def test_calibration_bad_arguments():
    model = tiny_chain()
    with pytest.raises(ValueError, match="batches must be"):
        activation_norms(model, [torch.randn(2, 3, 8, 8)], batches=0)
    with pytest.raises(TypeError, match="loader must yield"):
        activation_norms(model, ["not a tensor"])
    with pytest.raises(TypeError, match="needs \\(input, target\\)"):
        taylor_scores(model, [torch.randn(2, 3, 8, 8)], nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="no batches"):
        taylor_scores(model, [], nn.functional.cross_entropy)
    with pytest.raises(RuntimeError, match="never ran"):
        activation_norms(model, [])
    with pytest.raises(KeyError, match="no module named"):
        activation_norms(model, [], layers=["99"])
