import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.packing import pack, packed_nbytes, plane_widths, unpack


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 13, 576 * 3 + 1])
def test_roundtrip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    data = pack(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack(data, bits, n).long(), codes)


@pytest.mark.parametrize("shape", [(5, 7), (3, 576), (1, 1), (17, 33)])
def test_roundtrip_odd_shapes_2d(shape):
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, shape)
        out = unpack(pack(codes, bits), bits, codes.numel()).view(shape)
        assert torch.equal(out.long(), codes)


def test_exact_size_and_planes():
    assert plane_widths(3) == [2, 1]
    assert plane_widths(16) == [8, 8]
    # 1000 3-bit codes: 250 bytes of 2-bit plane + 125 bytes of 1-bit plane = 3000 bits exactly
    assert packed_nbytes(1000, 3) == 375
    assert packed_nbytes(10, 4) == 5


def test_bad_inputs():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ConfigError):
        plane_widths(17)
    with pytest.raises(ValueError, match="flat uint8"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 100)


def test_pack_planes_equal_the_shift_and_sum_layout():
    """The bytes are those of the documented layout, written as the sum of shifted codes (the first implementation)."""
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 17):
        for n in (1, 7, 1001):
            codes = torch.randint(0, 1 << bits, (n,), generator=g)
            planes, shift = [], 0
            for w in plane_widths(bits):
                per = 8 // w
                v = (codes >> shift) & ((1 << w) - 1)
                v = torch.cat([v, v.new_zeros((-n) % per)]).view(-1, per)
                planes.append((v << (torch.arange(per) * w)).sum(1).to(torch.uint8))
                shift += w
            assert torch.equal(pack(codes, bits), torch.cat(planes))
