"""V-BRA against a plain reference: dense attention over all tokens with a routing mask built by loops."""
import itertools

import pytest
import torch

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, region_grid


def reference_vbra(m: VBRA, x: torch.Tensor) -> torch.Tensor:
    """Obviously-correct V-BRA: region of every voxel by loops, masked dense attention, no padding."""
    b, c, d, hh, w = x.shape
    _, rsize = region_grid((d, hh, w), m.n_regions, m.region_size)
    grid = [-(-s // r) for s, r in zip((d, hh, w), rsize)]
    coords = list(itertools.product(range(d), range(hh), range(w)))
    region_of = torch.tensor([(z // rsize[0]) * grid[1] * grid[2] + (y // rsize[1]) * grid[2] + (xx // rsize[2])
                              for z, y, xx in coords])
    n_reg = grid[0] * grid[1] * grid[2]
    assert set(region_of.tolist()) == set(range(n_reg)), "every region must contain a real voxel"
    topk = min(m.topk, n_reg)

    tok = x.flatten(2).transpose(1, 2)  # (B, N, C), raster order == coords
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
    out = out.transpose(1, 2).reshape(b, c, d, hh, w)
    if m.lepe is not None:
        out = out + m.lepe(m.qkv(tok).chunk(3, dim=-1)[2].transpose(1, 2).reshape(b, c, d, hh, w))
    return m.proj(out.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, d, hh, w)


def test_region_grid_never_makes_empty_regions():
    assert region_grid((16, 16, 8), n_regions=(4, 4, 2)) == ((4, 4, 2), (4, 4, 4))
    # 5 tokens in 4 regions: region size 2 -> 3 regions (a 4th would be pure padding)
    assert region_grid((5, 7, 9), n_regions=4) == ((3, 4, 3), (2, 2, 3))
    assert region_grid((5, 7, 2), region_size=(4, 4, 4)) == ((2, 2, 1), (4, 4, 2))
    assert region_grid((1, 3, 2), n_regions=4) == ((1, 3, 2), (1, 1, 1))


@pytest.mark.parametrize("shape,kwargs", [
    ((8, 8, 8), dict(n_regions=2, topk=2)),                 # divides the grid
    ((5, 7, 9), dict(n_regions=(2, 3, 2), topk=2)),         # pads all three axes, by different amounts
    ((3, 8, 6), dict(region_size=(2, 4, 4), topk=1)),       # pads D and W only
    ((6, 5, 4), dict(region_size=(4, 2, 3), topk=3)),       # anisotropic regions
])
def test_matches_reference_float64(shape, kwargs):
    torch.manual_seed(0)
    m = VBRA(16, num_heads=4, lepe_kernel_size=3, **kwargs).double()
    x = torch.randn(2, 16, *shape, dtype=torch.float64)
    ours, ref = m(x), reference_vbra(m, x)
    assert ours.shape == x.shape
    assert (ours - ref).abs().max().item() < 1e-10


def test_float32_matches_float64_reference():
    torch.manual_seed(1)
    m = VBRA(32, num_heads=8, n_regions=(2, 2, 3), topk=2)
    x = torch.randn(1, 32, 5, 6, 7)
    ref = reference_vbra(m.double(), x.double()).float()
    assert (m.float()(x) - ref).abs().max().item() < 1e-4


def test_topk_all_regions_is_dense_attention():
    torch.manual_seed(2)
    m = VBRA(16, num_heads=2, n_regions=3, topk=1000, lepe_kernel_size=0).double()
    x = torch.randn(1, 16, 7, 5, 6, dtype=torch.float64)
    tok = x.flatten(2).transpose(1, 2)
    q, k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in m.qkv(tok).chunk(3, dim=-1))
    dense = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1) @ v
    dense = m.proj(dense.transpose(1, 2).reshape(1, -1, 16)).transpose(1, 2).reshape(x.shape)
    assert (m(x) - dense).abs().max().item() < 1e-10


@pytest.mark.parametrize("kv_chunks", [1, 3, 100])  # one pass; recomputed chunks; one region per chunk
def test_gradients_match_reference_and_reach_all_parameters(kv_chunks):
    torch.manual_seed(3)
    m = VBRA(16, num_heads=4, n_regions=(2, 2, 2), topk=3, lepe_kernel_size=3, kv_chunks=kv_chunks).double()
    x = torch.randn(1, 16, 5, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 16, 5, 4, 7, dtype=torch.float64)
    g_ours = torch.autograd.grad((m(x) * w).sum(), [x, *m.parameters()])
    g_ref = torch.autograd.grad((reference_vbra(m, x) * w).sum(), [x, *m.parameters()])
    for a, r in zip(g_ours, g_ref):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        assert (a - r).abs().max().item() < 1e-9


def test_padded_keys_do_not_leak():
    """Changing the input beyond a cropped border must not change anything: padding is masked."""
    torch.manual_seed(4)
    m = VBRA(8, num_heads=2, region_size=4, topk=8, lepe_kernel_size=0)
    x = torch.randn(1, 8, 6, 6, 6)
    # with masking, a 6^3 input (padded to 8^3) equals attention over exactly its 216 tokens
    tok = x.flatten(2).transpose(1, 2)
    q, k, v = (t.view(1, -1, 2, 4).transpose(1, 2) for t in m.qkv(tok).chunk(3, dim=-1))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dense = m.proj(dense.transpose(1, 2).reshape(1, -1, 8)).transpose(1, 2).reshape(x.shape)
    assert (m(x) - dense).abs().max().item() < 1e-5
