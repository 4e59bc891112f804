"""`--dtype auto`: bfloat16 only where the hardware multiplies it natively."""

import pytest

from anybit import config as config_module
from anybit.config import QuantConfig, compute_dtype


@pytest.mark.parametrize("native,expected", [(False, "float32"), (True, "bfloat16")])
def test_auto_follows_the_cpu(monkeypatch, native: bool, expected: str) -> None:
    monkeypatch.setattr(config_module, "cpu_has_native_bfloat16", lambda: native)
    assert compute_dtype("auto") == expected
    assert compute_dtype("float16") == "float16"  # an explicit choice stays
    assert QuantConfig(method="rtn", bits=4).calib_dtype == expected  # recorded resolved in anybit.json


def test_cpu_flags_are_read(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(config_module, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse avx2 fma\n")
    assert not config_module.cpu_has_native_bfloat16()
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert config_module.cpu_has_native_bfloat16()
