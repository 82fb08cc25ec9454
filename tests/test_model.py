import pytest
import torch

from flowpre.models.dit import DIT_MODELS, build_dit

# DiT paper (Peebles & Xie), 32x32x4 latents, 1000 classes
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_parameter_counts_match_paper(size):
    with torch.device("meta"):
        model = build_dit(f"DiT-{size}/2", in_channels=4, image_size=32, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PAPER_PARAMS[size] - 1) < 0.01, n


def test_registry_builds_the_papers_shapes():
    # (depth, hidden, heads) from the DiT paper's Table 1
    paper = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert len(DIT_MODELS) == 12
    for name in DIT_MODELS:
        size, patch = name[4:].split("/")
        with torch.device("meta"):
            m = build_dit(name, 4, 32, 1000)
        assert (m.depth, m.hidden, m.heads, m.patch) == (*paper[size], int(patch))
        assert m.grid ** 2 == (32 // int(patch)) ** 2 and len(m.blocks) == m.depth


def test_xl2_forward_flops_match_paper():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", 4, 32, 1000)
    assert abs(model.forward_flops() / 237e9 - 1) < 0.01  # TARGETS.md: 237 GFLOP forward


def test_adaln_zero_starts_at_zero_output_and_learns():
    torch.manual_seed(0)
    model = build_dit("DiT-2x64x4/4", in_channels=3, image_size=12, num_classes=5)
    x, sigma, cond = torch.randn(3, 3, 12, 12), torch.rand(3), torch.tensor([0, 4, 5])  # 5 = null class
    out = model(x, sigma, cond)
    assert out.shape == x.shape and torch.all(out == 0)  # zero-initialised output layer
    out.sum().backward()
    # at init only the output layer learns; the zero gates and zero output weights block the rest
    assert model.final.linear.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() == 0
    model.zero_grad()
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)
    torch.nn.init.normal_(model.blocks[0].ada[-1].weight, std=0.02)
    out = model(x, sigma, cond)
    assert out.abs().sum() > 0
    out2 = model(x, sigma, torch.tensor([1, 4, 5]))
    assert not torch.allclose(out[0], out2[0]) and torch.allclose(out[1:], out2[1:])


@pytest.mark.parametrize("channels,size,patch", [(1, 28, 4), (3, 16, 8), (4, 32, 2)])
def test_any_channel_count_and_size(channels, size, patch):
    model = build_dit(f"DiT-1x32x2/{patch}", channels, size, 10)
    torch.nn.init.normal_(model.final.linear.weight)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape


def test_bad_shapes_and_names_raise():
    with pytest.raises(ValueError, match="divisible"):
        build_dit("DiT-S/8", 1, 28, 10)
    with pytest.raises(ValueError, match="unknown model name"):
        build_dit("DiT-Q/2", 1, 28, 10)
    model = build_dit("DiT-1x32x2/4", 1, 28, 10)
    with pytest.raises(ValueError, match="expects inputs"):
        model(torch.randn(1, 3, 28, 28), torch.rand(1), torch.tensor([0]))
