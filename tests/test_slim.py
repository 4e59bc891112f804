import pytest
import torch

from anybit.alloc.slim import group_bits, group_salience, output_kl, salience_allocation
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.methods.slim import clip_factors
from anybit.quant.gptq import HessianAccumulator, gptq_quantize, prepare_hessian
from anybit.quant.uniform import ClippedColumnQuantizer, UniformColumnQuantizer


def test_group_bits_keep_the_average() -> None:
    salience = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    widths = group_bits(salience, 3, 2)
    assert widths.tolist() == [3, 2, 4, 3, 4, 2]
    assert float(widths.float().mean()) == 3.0


def test_fractional_budget_raises_the_most_salient_groups() -> None:
    salience = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0])
    assert group_bits(salience, 2.25, 0).tolist() == [2, 2, 3, 2, 2, 2, 3, 2]
    widths = group_bits(salience, 2.25, 1)
    assert widths.tolist() == [2, 1, 4, 2, 2, 2, 3, 2]
    assert float(widths.float().mean()) == 2.25


def test_salience_allocation_prefers_salient_groups() -> None:
    torch.manual_seed(0)
    X = torch.randn(2048, 128)
    X[:, 64:80] *= 8  # one group of channels with large activations: its weights are salient
    acc = HessianAccumulator(128, sample_stride=4)
    acc.add_batch(X)
    W = torch.randn(32, 128)
    _, Hinv, _ = prepare_hessian(W, acc.hessian(), 0.01, act_order=False)
    sal = group_salience(W, Hinv, 16)
    assert int(sal.argmax()) == 4
    widths, kls = salience_allocation(W, Hinv, acc.input_sample(), 3, 16)
    assert len(kls) == 8 // 2 + 1  # p = 0 (uniform) to half the groups
    best = min(range(len(kls)), key=kls.__getitem__)
    assert best >= 1  # on these activations a mixed allocation beats uniform 3 bits
    assert torch.equal(widths, group_bits(sal, 3, best))  # the search returns its least-KL candidate
    assert widths[4] == 4 and float(widths.float().mean()) == 3.0  # the salient group gains a bit
    assert output_kl(acc.input_sample(), W, W) == pytest.approx(0.0, abs=1e-6)
    assert all(0 < k < float("inf") for k in kls)  # 3-bit round-to-nearest always loses something


def test_clipping_search_never_worse_than_minmax() -> None:
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    W[0, 3] = 9.0
    bitmap = torch.full((16, 1), 3, dtype=torch.uint8)
    ones = lambda Wg, g: torch.ones_like(Wg)  # noqa: E731
    clipped = ClippedColumnQuantizer(16, 64, 64, bitmap, torch.linspace(0.9, 1.1, 101), ones)
    plain = UniformColumnQuantizer(16, 64, 64, bitmap)
    for quantizer in (clipped, plain):
        quantizer.fit(W, 0)
    err = {}
    for name, quantizer in (("clipped", clipped), ("plain", plain)):
        err[name] = sum(float((quantizer.quantize(W[:, j], j) - W[:, j]).square().sum()) for j in range(64))
    assert err["clipped"] <= err["plain"] + 1e-6


def test_wider_clipping_range_helps_at_two_bits() -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    bitmap = torch.full((64, 2), 2, dtype=torch.uint8)
    ones = lambda Wg, g: torch.ones_like(Wg)  # noqa: E731
    errors = []
    for low in (0.9, 0.5):
        quantizer = ClippedColumnQuantizer(64, 128, 64, bitmap, clip_factors(low), ones)
        error = 0.0
        for group in range(2):
            quantizer.fit(W[:, group * 64 : (group + 1) * 64], group)
            error += sum(
                float((quantizer.quantize(W[:, j], j) - W[:, j]).square().sum())
                for j in range(64 * group, 64 * group + 64)
            )
        errors.append(error)
    assert errors[1] < 0.9 * errors[0]  # Gaussian weights at 2 bits want a range well inside min-max
    with pytest.raises(AnybitError, match="clip-min"):
        QuantConfig(method="slim", bits=3, clip_min=1.5)


def test_mixed_group_widths_in_gptq_decode_exactly() -> None:
    X = torch.randn(1024, 96)
    acc = HessianAccumulator(96)
    acc.add_batch(X)
    W = torch.randn(24, 96)
    bitmap = torch.tensor([2, 3, 4], dtype=torch.uint8)[None, :].expand(24, 3).contiguous()
    quantizer = UniformColumnQuantizer(24, 96, 32, bitmap)
    result = gptq_quantize(W, acc.hessian(), quantizer)
    qt = quantizer.to_qtensor((24, 96))
    assert torch.equal(qt.dequantize(), result.Q)
    # codes at 3 bits on average, fp16 scale + zero of the group's width per (row, group), and the
    # 3-bit width of each group (packed in blocks of eight values: 3 bytes)
    assert qt.storage_bits() == 24 * 96 * 3 + 24 * 3 * 16 + 24 * (2 + 3 + 4) + 24
