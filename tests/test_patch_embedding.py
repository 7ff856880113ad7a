"""Tests of the generic patch embedding used by the modality plugins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from umbrella_core.model.patch import PatchEmbedding, patchify


def test_3d_token_count_and_gradients() -> None:
    embed = PatchEmbedding(2, (16, 24, 8), (8, 8, 4), hidden_size=12)
    assert embed.grid == (2, 3, 2) and embed.num_tokens == 12
    x = torch.randn(3, 2, 16, 24, 8, requires_grad=True)
    out = embed(x)
    assert out.shape == (3, 12, 12)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.parameters())


def test_4d_token_count() -> None:
    embed = PatchEmbedding(1, (8, 8, 8, 6), (4, 4, 8, 3), hidden_size=5)
    assert embed.num_tokens == 2 * 2 * 1 * 2
    assert embed(torch.randn(2, 1, 8, 8, 8, 6)).shape == (2, 8, 5)


@pytest.mark.parametrize(
    "shape, bad",
    [((8, 8, 8), (2, 1, 8, 8, 4)), ((8, 8, 8), (2, 2, 8, 8, 8)), ((8, 8, 8, 4), (2, 1, 8, 8, 8))],
)
def test_wrong_input_shape_names_expected_and_got(shape: tuple, bad: tuple) -> None:
    embed = PatchEmbedding(1, shape, (4,) * len(shape), hidden_size=4)
    expected = ", ".join(map(str, (1, *shape)))
    with pytest.raises(
        ValueError, match=rf"expected input \(B, {expected}\), got \({', '.join(map(str, bad))}\)"
    ):
        embed(torch.zeros(bad))


def test_bad_geometry_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        PatchEmbedding(1, (10, 8, 8), (4, 4, 4), hidden_size=4)
    with pytest.raises(ValueError, match="3 or 4 entries"):
        PatchEmbedding(1, (8, 8), (4, 4), hidden_size=4)


def test_4d_path_equals_a_hand_computed_patchify() -> None:
    torch.manual_seed(0)
    shape, patch = (4, 2, 2, 4), (2, 1, 2, 2)
    embed = PatchEmbedding(2, shape, patch, hidden_size=3, norm=False)
    with torch.no_grad():
        embed.position.zero_()
    x = torch.randn(1, 2, *shape)
    expected = []
    # Tokens in order of the grid, first axis slowest; features ordered (c, px, py, pz, pt).
    for gx in range(2):
        for gy in range(2):
            for gz in range(1):
                for gt in range(2):
                    features = [
                        x[0, c, gx * 2 + px, gy + py, gz * 2 + pz, gt * 2 + pt]
                        for c in range(2)
                        for px in range(2)
                        for py in range(1)
                        for pz in range(2)
                        for pt in range(2)
                    ]
                    expected.append(embed.proj(torch.stack(features)))
    torch.testing.assert_close(embed(x)[0], torch.stack(expected))


def test_4d_linear_equals_a_strided_convolution_over_space_when_time_is_one_patch() -> None:
    # With one time patch, the 4D embedding is a Conv3d whose channels are (c, t).
    torch.manual_seed(1)
    embed = PatchEmbedding(1, (4, 4, 4, 2), (2, 2, 2, 2), hidden_size=3, norm=False)
    with torch.no_grad():
        embed.position.zero_()
    x = torch.randn(2, 1, 4, 4, 4, 2)
    conv = nn.Conv3d(2, 3, 2, stride=2)
    with torch.no_grad():
        weight = embed.proj.weight.reshape(3, 1, 2, 2, 2, 2)  # (out, c, px, py, pz, pt)
        conv.weight.copy_(weight[:, 0].permute(0, 4, 1, 2, 3))  # time becomes the input channel
        conv.bias.copy_(embed.proj.bias)
    reference = conv(x[:, 0].permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(x), reference)


def test_3d_token_order_matches_patchify() -> None:
    torch.manual_seed(2)
    embed = PatchEmbedding(1, (4, 6, 2), (2, 2, 2), hidden_size=4, norm=False)
    with torch.no_grad():
        embed.position.zero_()
    x = torch.randn(2, 1, 4, 6, 2)
    linear = embed.proj.weight.reshape(4, -1)
    torch.testing.assert_close(embed(x), patchify(x, (2, 2, 2)) @ linear.T + embed.proj.bias)


def test_position_embedding_distinguishes_identical_patches() -> None:
    embed = PatchEmbedding(1, (8, 8, 8), (4, 4, 4), hidden_size=16)
    out = embed(torch.ones(1, 1, 8, 8, 8))[0]
    assert torch.cdist(out, out).fill_diagonal_(1.0).min() > 0
    assert isinstance(embed.position, nn.Parameter) and embed.position.shape == (1, 8, 16)


def test_optional_layer_norm() -> None:
    embed = PatchEmbedding(1, (8, 8, 8), (4, 4, 4), hidden_size=16, norm=True)
    with torch.no_grad():
        embed.position.zero_()
    out = embed(torch.randn(2, 1, 8, 8, 8) * 50)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
