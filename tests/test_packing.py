import pytest
import torch

from anybit.format.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 17), ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 4099])
def test_round_trip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == -(-n // 8) * bits
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_extremes_round_trip() -> None:
    for bits in range(1, 17):
        codes = torch.tensor([0, 2**bits - 1] * 13)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


def test_known_layout() -> None:
    # eight 1-bit values form one byte, value i in bit i
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    # two-bit values: byte 0 holds the low bits, byte 1 the high bits
    assert pack_codes(torch.tensor([3, 2, 1, 0, 0, 0, 0, 0]), 2).tolist() == [0b101, 0b011]
    # ten-bit values: the same bit planes, bytes 8 and 9 holding bits 8 and 9
    assert pack_codes(torch.tensor([768, 0, 0, 0, 0, 0, 0, 1]), 10).tolist() == [0x80] + [0] * 7 + [1, 1]


def test_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="1-16"):
        pack_codes(torch.tensor([0]), 17)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 8)
