"""End to end on the real reference model (SmolLM2-135M-Instruct), with small calibration and two windows."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anybit  # noqa: F401 - registers anybit's format with transformers
from anybit.config import QuantConfig
from anybit.data import eval_windows, load_corpus, tokenize_corpus
from anybit.eval import evaluate
from anybit.generate import _native_tokens
from anybit.methods import get_method
from anybit.model import load_model
from anybit.pipeline import configure_runtime, quantize_to_dir
from anybit.runtime.native import NativeDecoder
from anybit.runtime.qlinear import set_kernel

pytestmark = pytest.mark.real_model


def test_smollm2_gptq_end_to_end(tmp_path) -> None:
    original = load_model("smollm2-135m")
    assert original.model.config.num_hidden_layers == 30
    ids = tokenize_corpus(original.tokenizer, load_corpus("wikitext2"))
    assert ids.numel() // 2048 == 147  # the reference protocol's window count
    windows = eval_windows(ids, 2048, max_windows=2)
    fp = evaluate(original.model, windows, progress=False)
    # pinned: measured 19.0186 on the first two windows (float32, AMD EPYC AVX2); 0.5 % covers other CPUs' rounding
    assert fp.ppl == pytest.approx(19.0186, rel=0.005), fp
    n_unquantized = sum(p.numel() for n, p in original.model.named_parameters() if "layers" not in n or "norm" in n)

    config = QuantConfig(method="gptq", bits=4, group_size=64, nsamples=4, seqlen=512)
    outcome = quantize_to_dir("smollm2-135m", config, tmp_path / "q", loaded=original, progress=False)
    assert outcome.bits_per_weight == pytest.approx(4 + 20 / 64, abs=1e-4)
    counted_bytes = outcome.meta["storage_bits"] // 8
    header = outcome.file_bytes - counted_bytes - 2 * n_unquantized  # the rest is fp16
    assert 0 < header < 100_000, header

    reloaded = load_model(str(tmp_path / "q"))
    in_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.inference_mode():
        expected = original.model(windows[:1, :256]).logits
        assert torch.equal(expected, reloaded.model(windows[:1, :256]).logits)
        assert torch.equal(expected, in_transformers(windows[:1, :256]).logits)
    del in_transformers
    set_kernel(reloaded.model, "exact")  # the stored values: what the quality figures measure
    q = evaluate(reloaded.model, windows, progress=False)
    # pinned: 24.2886 at these settings on an AMD EPYC, 25.2579 on an Intel Xeon (GPTQ on 2048 calibration
    # tokens follows the CPU's float32 rounding that far); the band, 2 % beyond both, still catches a 5 %
    # regression of the recipe or the protocol on the Intel machine and a 7 % one on the AMD
    assert 24.2886 * 0.98 < q.ppl < 25.2579 * 1.02, (fp.ppl, q.ppl)

    # The fast CPU path (rounded activations; exact uniform grids) and the native decoder on the real model
    configure_runtime(reloaded, "fast", "int8")
    fast = evaluate(reloaded.model, windows, progress=False)
    assert fast.ppl == pytest.approx(q.ppl, rel=0.005), (q.ppl, fast.ppl)  # the bound: 0.5 %
    prompt = windows[0, :32]
    decoder = NativeDecoder(reloaded.model, 64)
    native = _native_tokens(decoder, prompt[None], 16, 0.0, set(), None)
    with torch.inference_mode():
        eager = reloaded.model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[
            0, 32:
        ].tolist()
    assert native == eager


# Measured at the settings below (first window, float32, AMD EPYC AVX2): fp 15.2331; each recipe's perplexity
# and counted bits. 2 % on the perplexity catches a 5 % regression; the counted bits are exact.
EVERY_METHOD = [
    ("rtn", 4, 19.8628, 4.312516),
    ("kmeans", 4, 17.1814, 4.375016),
    ("squeezellm", 4, 16.8301, 4.531743),
    ("claq", 4, 17.4894, 4.707018),
    ("slim", 4, 19.1867, 4.312544),
    ("skim", 4.25, 17.5759, 4.249393),
    ("anybit", 4.25, 17.7681, 4.250000),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,bits,ppl,counted", EVERY_METHOD, ids=[row[0] for row in EVERY_METHOD])
def test_smollm2_every_method(tmp_path, method: str, bits: float, ppl: float, counted: float) -> None:
    """Every recipe on the real model, small calibration, one window: its pinned quality and counted bits."""
    loaded = load_model("smollm2-135m")
    windows = eval_windows(tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2")), 2048, max_windows=1)
    fp = evaluate(loaded.model, windows, progress=False)
    assert fp.ppl == pytest.approx(15.2331, rel=0.005)
    groups = {"group_size": 64} if get_method(method).takes("group_size") else {}
    config = QuantConfig(method=method, bits=bits, nsamples=4, seqlen=512, fisher_nsamples=2, **groups)
    outcome = quantize_to_dir("smollm2-135m", config, tmp_path / "q", loaded=loaded, progress=False)
    q = evaluate(load_model(str(tmp_path / "q")).model, windows, progress=False)
    assert q.ppl == pytest.approx(ppl, rel=0.02), (method, fp.ppl, q.ppl)
    assert outcome.bits_per_weight == pytest.approx(counted, abs=1e-6)
