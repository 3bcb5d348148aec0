"""(V-)BRA in 3D and 2D against a plain reference: dense attention over all tokens with a routing mask built
by loops."""
import itertools
import math

import pytest
import torch
from torch import nn

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, region_grid


def reference_vbra(m: VBRA, x: torch.Tensor) -> torch.Tensor:
    """Obviously-correct (V-)BRA, any dimension: region of every voxel by loops, masked dense attention,
    no padding."""
    b, c, *spatial = x.shape
    _, rsize = region_grid(spatial, m.n_regions, m.region_size)
    grid = [-(-s // r) for s, r in zip(spatial, rsize)]
    coords = list(itertools.product(*(range(s) for s in spatial)))  # raster order == x.flatten(2)

    def region(p):
        r = 0
        for a, i in enumerate(p):
            r = r * grid[a] + i // rsize[a]
        return r

    region_of = torch.tensor([region(p) for p in coords])
    n_reg = math.prod(grid)
    assert set(region_of.tolist()) == set(range(n_reg)), "every region must contain a real voxel"
    topk = min(m.topk, n_reg)

    tok = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = m.qkv(tok).chunk(3, dim=-1)
    heads, hd = m.num_heads, c // m.num_heads
    out = torch.zeros_like(q)
    for bi in range(b):
        q_r = torch.stack([q[bi, region_of == r].mean(0) for r in range(n_reg)])
        k_r = torch.stack([k[bi, region_of == r].mean(0) for r in range(n_reg)])
        routed = torch.topk(q_r @ k_r.T, topk, dim=-1).indices
        allowed = torch.zeros(len(coords), len(coords), dtype=torch.bool)
        for i in range(len(coords)):
            for r in routed[region_of[i]].tolist():
                allowed[i, region_of == r] = True
        for hi in range(heads):
            sl = slice(hi * hd, (hi + 1) * hd)
            logits = (q[bi, :, sl] @ k[bi, :, sl].T) * hd ** -0.5
            logits = logits.masked_fill(~allowed, float("-inf"))
            out[bi, :, sl] = logits.softmax(-1) @ v[bi, :, sl]
    out = out.transpose(1, 2).reshape(b, c, *spatial)
    if m.lepe is not None:
        out = out + m.lepe(v.transpose(1, 2).reshape(b, c, *spatial))
    return m.proj(out.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, *spatial)


def dense_attention(m: VBRA, x: torch.Tensor) -> torch.Tensor:
    """Global multi-head attention over all tokens with the module's weights (no LePE)."""
    b, c, *spatial = x.shape
    tok = x.flatten(2).transpose(1, 2)
    q, k, v = (t.view(b, -1, m.num_heads, m.head_dim).transpose(1, 2) for t in m.qkv(tok).chunk(3, dim=-1))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return m.proj(out.transpose(1, 2).reshape(b, -1, c)).transpose(1, 2).reshape(x.shape)


def test_region_grid_never_makes_empty_regions():
    assert region_grid((16, 16, 8), n_regions=(4, 4, 2)) == ((4, 4, 2), (4, 4, 4))
    # 5 tokens in 4 regions: region size 2 -> 3 regions (a 4th would be pure padding)
    assert region_grid((5, 7, 9), n_regions=4) == ((3, 4, 3), (2, 2, 3))
    assert region_grid((5, 7, 2), region_size=(4, 4, 4)) == ((2, 2, 1), (4, 4, 2))
    assert region_grid((1, 3, 2), n_regions=4) == ((1, 3, 2), (1, 1, 1))
    # 2D: the same rule per axis
    assert region_grid((32, 24), n_regions=8) == ((8, 8), (4, 3))
    assert region_grid((5, 9), n_regions=4) == ((3, 3), (2, 3))
    assert region_grid((7, 2), region_size=(4, 4)) == ((2, 1), (4, 2))


def test_dimension_comes_from_conv_op():
    m2, m3 = VBRA(8, 2, conv_op=nn.Conv2d), VBRA(8, 2)
    assert (m2.ndim, m3.ndim) == (2, 3) and isinstance(m2.lepe, nn.Conv2d) and isinstance(m3.lepe, nn.Conv3d)
    assert (m2.n_regions, m3.n_regions) == (8, 4)  # 64 regions either way
    with pytest.raises(AssertionError):
        VBRA(8, 2, n_regions=(2, 2, 2), conv_op=nn.Conv2d)  # per-axis values must match the dimension
    with pytest.raises(AssertionError):
        m2(torch.randn(1, 8, 4, 4, 4))


CASES_3D = [
    ((8, 8, 8), dict(n_regions=2, topk=2)),                 # divides the grid
    ((5, 7, 9), dict(n_regions=(2, 3, 2), topk=2)),         # pads all three axes, by different amounts
    ((3, 8, 6), dict(region_size=(2, 4, 4), topk=1)),       # pads D and W only
    ((6, 5, 4), dict(region_size=(4, 2, 3), topk=3)),       # anisotropic regions
]
CASES_2D = [
    ((12, 16), dict(n_regions=4, topk=3)),                  # divides the grid
    ((13, 11), dict(n_regions=(3, 4), topk=2)),             # pads both axes, by different amounts
    ((8, 7), dict(region_size=(4, 2), topk=1)),             # pads W only
    ((9, 10), dict(region_size=(2, 5), topk=4)),            # pads H only, anisotropic regions
    ((6, 9), dict(n_regions=3, topk=1000)),                 # top-k capped at the region count
]


@pytest.mark.parametrize("shape,kwargs", CASES_3D + CASES_2D)
def test_matches_reference_float64(shape, kwargs):
    torch.manual_seed(0)
    conv_op = nn.Conv3d if len(shape) == 3 else nn.Conv2d
    m = VBRA(16, num_heads=4, lepe_kernel_size=3, conv_op=conv_op, **kwargs).double()
    x = torch.randn(2, 16, *shape, dtype=torch.float64)
    ours, ref = m(x), reference_vbra(m, x)
    assert ours.shape == x.shape
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape,conv_op,n_regions", [((5, 6, 7), nn.Conv3d, (2, 2, 3)), ((9, 14), nn.Conv2d, (3, 4))])
def test_float32_matches_float64_reference(shape, conv_op, n_regions):
    torch.manual_seed(1)
    m = VBRA(32, num_heads=8, n_regions=n_regions, topk=2, conv_op=conv_op)
    x = torch.randn(1, 32, *shape)
    ref = reference_vbra(m.double(), x.double()).float()
    assert torch.allclose(m.float()(x), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape,conv_op", [((7, 5, 6), nn.Conv3d), ((11, 7), nn.Conv2d)])
def test_topk_all_regions_is_dense_attention(shape, conv_op):
    torch.manual_seed(2)
    m = VBRA(16, num_heads=2, n_regions=3, topk=1000, lepe_kernel_size=0, conv_op=conv_op).double()
    x = torch.randn(1, 16, *shape, dtype=torch.float64)
    assert torch.allclose(m(x), dense_attention(m, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape,conv_op,n_regions", [((5, 4, 7), nn.Conv3d, (2, 2, 2)), ((7, 9), nn.Conv2d, (3, 2))])
@pytest.mark.parametrize("kv_chunks", [1, 3, 100])  # one pass; recomputed chunks; one region per chunk
def test_gradients_match_reference_and_reach_all_parameters(kv_chunks, shape, conv_op, n_regions):
    torch.manual_seed(3)
    m = VBRA(16, num_heads=4, n_regions=n_regions, topk=3, lepe_kernel_size=3, kv_chunks=kv_chunks,
             conv_op=conv_op).double()
    x = torch.randn(1, 16, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 16, *shape, dtype=torch.float64)
    g_ours = torch.autograd.grad((m(x) * w).sum(), [x, *m.parameters()])
    g_ref = torch.autograd.grad((reference_vbra(m, x) * w).sum(), [x, *m.parameters()])
    for a, r in zip(g_ours, g_ref):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        assert torch.allclose(a, r, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape,conv_op", [((6, 6, 6), nn.Conv3d), ((6, 7), nn.Conv2d)])
def test_padded_keys_do_not_leak(shape, conv_op):
    """With masking, a map padded up to the region grid (6^3 -> 8^3, 6x7 -> 8x8) equals attention over
    exactly its own tokens: padding never receives attention."""
    torch.manual_seed(4)
    m = VBRA(8, num_heads=2, region_size=4, topk=8, lepe_kernel_size=0, conv_op=conv_op)
    x = torch.randn(1, 8, *shape)
    assert torch.allclose(m(x), dense_attention(m, x), rtol=0, atol=1e-5)


def test_2d_bra_is_the_3d_block_on_a_single_slice():
    """Same weights, one-slice volume, one region along D: 2D BRA == 3D V-BRA (the LePE kernel's middle
    plane is the 2D kernel), padding included."""
    torch.manual_seed(5)
    m2 = VBRA(16, num_heads=4, n_regions=(3, 2), topk=2, lepe_kernel_size=3, conv_op=nn.Conv2d).double()
    m3 = VBRA(16, num_heads=4, n_regions=(1, 3, 2), topk=2, lepe_kernel_size=3).double()
    with torch.no_grad():
        for name in ("qkv", "proj"):
            getattr(m3, name).load_state_dict(getattr(m2, name).state_dict())
        m3.lepe.weight.zero_()
        m3.lepe.weight[:, :, 1] = m2.lepe.weight
        m3.lepe.bias.copy_(m2.lepe.bias)
    x = torch.randn(2, 16, 7, 5, dtype=torch.float64)
    assert torch.allclose(m2(x), m3(x[:, :, None])[:, :, 0], rtol=0, atol=1e-12)
