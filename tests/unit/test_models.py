"""Embedding models and the transformation h: shapes, parameter counts, BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fct.errors import FCTError
from fct.models import (
    EmbeddingModel,
    FoldedTransformation,
    Transformation,
    check_arch,
    fold_batchnorm,
    transformation_flops,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_h_params(d_old: int, d_new: int, d_side: int, hidden: int) -> int:
    """Parameters of the reference h, counted layer by layer from its description.

    A block is Linear without bias (in * out) + BatchNorm (gamma, beta: 2 * out); the last
    layer is a Linear with bias.
    """

    def block(d_in: int, d_out: int) -> int:
        return d_in * d_out + 2 * d_out

    s = d_side or d_old
    return (
        block(d_old, 2 * d_old)
        + block(2 * d_old, 2 * d_new)
        + block(s, 2 * s)
        + block(2 * s, 2 * d_new)
        + block(4 * d_new, hidden)
        + block(hidden, hidden)
        + hidden * d_new
        + d_new
    )


def randomize_bn(h: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in h.modules():
        if isinstance(m, nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.5)


# ------------------------------------------------------------------------------ h: structure


def test_h_parameter_count_matches_reference_at_128():
    h = Transformation(128, 128, 128)
    # 2 x 99,328 (branches) + 1,052,672 + 4,198,400 + 262,272 (mixer)
    assert n_params(h) == 5_712_000
    assert abs(n_params(h) - 5.71e6) / 5.71e6 < 0.01


@pytest.mark.parametrize(
    ("d_old", "d_new", "d_side", "hidden", "count"),
    [(64, 256, 32, 2048, 6_935_168), (128, 256, 0, 2048, None), (16, 24, 8, 64, None)],
)
def test_h_parameter_count_other_dims(d_old, d_new, d_side, hidden, count):
    h = Transformation(d_old, d_new, d_side, hidden=hidden)
    assert n_params(h) == expected_h_params(d_old, d_new, d_side, hidden)
    if count is not None:
        assert n_params(h) == count


def test_h_layer_widths_follow_reference():
    h = Transformation(64, 256, 32)
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    shapes = [tuple(m.weight.shape) for m in linears]
    assert shapes == [
        (128, 64),  # old: d_old -> 2 d_old
        (512, 128),  # old: -> 2 d_new
        (64, 32),  # side: d_side -> 2 d_side
        (512, 64),  # side: -> 2 d_new
        (2048, 1024),  # mixer: 4 d_new -> hidden
        (2048, 2048),
        (256, 2048),  # plain output layer
    ]
    # Biases only where no BatchNorm follows: the output layer.
    assert [m.bias is not None for m in linears] == [False] * 6 + [True]


def test_h_without_side_uses_old_for_both_branches():
    h = Transformation(12, 20, 0, hidden=32).eval()
    assert h.side_branch[0][0].in_features == 12
    old = torch.randn(5, 12)
    out = h(old)
    assert out.shape == (5, 20)
    # The side branch reads the old embedding: same result as feeding the branches by hand.
    manual = h.mixer(torch.cat([h.old_branch(old), h.side_branch(old)], dim=1))
    torch.testing.assert_close(out, manual)
    with pytest.raises(FCTError, match="without side-information"):
        h(old, torch.randn(5, 12))


def test_h_with_side_checks_inputs():
    h = Transformation(12, 20, 6, hidden=32)
    assert h(torch.randn(4, 12), torch.randn(4, 6)).shape == (4, 20)
    with pytest.raises(FCTError, match=r"side-information of shape \[N, 6\]"):
        h(torch.randn(4, 12))
    with pytest.raises(FCTError, match=r"old embeddings of shape \[N, 12\]"):
        h(torch.randn(4, 13), torch.randn(4, 6))


def test_freeze_bn_survives_train_and_keeps_statistics():
    h = Transformation(8, 8, 0, hidden=16)
    h.freeze_bn()
    h.train()
    bns = [m for m in h.modules() if isinstance(m, nn.BatchNorm1d)]
    assert h.training and all(not bn.training for bn in bns)
    before = [bn.running_mean.clone() for bn in bns]
    h(torch.randn(6, 8) + 3).sum().backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    # Affine parameters still learn while statistics are frozen (as the reference).
    assert bns[0].weight.grad is not None
    h.freeze_bn(False)
    assert all(bn.training for bn in bns)


# ------------------------------------------------------------------------------ h: folding


@pytest.mark.parametrize("d_side", [0, 24])
def test_folded_equals_eval(d_side):
    torch.manual_seed(0)
    h = Transformation(32, 48, d_side, hidden=96)
    randomize_bn(h, seed=d_side)
    h.train()
    state = {k: v.clone() for k, v in h.state_dict().items()}
    folded = fold_batchnorm(h)

    assert isinstance(folded, FoldedTransformation)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    # The original is untouched: same weights and still in training mode.
    assert h.training
    assert all(torch.equal(state[k], v) for k, v in h.state_dict().items())

    old = torch.randn(64, 32) * 2
    side = torch.randn(64, d_side) if d_side else None
    with torch.no_grad():
        expected = h.eval()(old, side)
        got = folded(old, side)
    scale = expected.abs().max()
    assert scale > 0.1  # a meaningful comparison, not two near-zero outputs
    assert (got - expected).abs().max() <= 1e-5 * scale
    torch.testing.assert_close(h.folded()(old, side), expected, rtol=1e-5, atol=1e-5 * scale)


def test_folded_is_differentiable_wrt_input():
    # addmm(out=...) cannot record autograd; the folded module must fall back, not crash.
    h = Transformation(8, 8, 4, hidden=16).eval()
    folded = h.folded()
    old = torch.randn(3, 8, requires_grad=True)
    side = torch.randn(3, 4)
    folded(old, side).sum().backward()
    expected = torch.autograd.grad(h(old, side).sum(), old)[0]
    torch.testing.assert_close(old.grad, expected, rtol=1e-4, atol=1e-5)


def test_transformation_flops_counts_every_gemm():
    assert transformation_flops(128, 128, 128) == 11_403_264
    for dims in [(64, 256, 32, 2048), (128, 256, 0, 512)]:
        h = Transformation(*dims)
        macs = sum(m.weight.numel() for m in h.modules() if isinstance(m, nn.Linear))
        assert transformation_flops(*dims) == 2 * macs


def test_transformation_rejects_bad_dims():
    with pytest.raises(FCTError, match="d_side"):
        Transformation(8, 8, -1)
    with pytest.raises(FCTError, match="d_new"):
        Transformation(8, 0)


# ------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize(
    ("arch", "in_chans", "size"),
    [
        ("resnet18", 1, 28),
        ("resnet18", 3, 32),
        ("vit_tiny_patch16_224", 3, 32),
        ("convnext_atto", 3, 32),
    ],
)
def test_embedding_model_shapes(arch, in_chans, size):
    torch.manual_seed(0)
    model = EmbeddingModel(
        arch, embedding_dim=16, num_classes=7, in_chans=in_chans, image_size=size
    )
    model.eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        embedding, logits = model(x)
        assert embedding.shape == (2, 16)
        assert logits.shape == (2, 7)
        torch.testing.assert_close(model.embed(x), embedding)
    assert (model.arch, model.embedding_dim, model.num_classes) == (arch, 16, 7)
    assert model.classifier.bias is None
    assert model.classifier.weight.shape == (7, 16)


def test_small_images_get_cifar_resnet_stem():
    model = EmbeddingModel("resnet18", 8, 3, in_chans=1, image_size=28)
    conv1 = model.backbone.conv1
    assert (conv1.in_channels, conv1.kernel_size, conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.backbone.maxpool, nn.Identity)
    # Spatial resolution kept: layer4 (three stride-2 stages) sees 28 -> 4, not 28 -> 1.
    feats = model.backbone.forward_features(torch.randn(1, 1, 28, 28))
    assert feats.shape[-2:] == (4, 4)
    big = EmbeddingModel("resnet18", 8, 3, image_size=224)
    assert big.backbone.conv1.stride == (2, 2)


def test_small_vit_uses_small_patches():
    model = EmbeddingModel("vit_tiny_patch16_224", 8, 3, image_size=32)
    assert tuple(model.backbone.patch_embed.grid_size) == (8, 8)


def test_relu_embedding_is_non_negative():
    model = EmbeddingModel("resnet18", 8, 3, image_size=32, embed_act="relu").eval()
    with torch.no_grad():
        assert (model.embed(torch.randn(2, 3, 32, 32)) >= 0).all()
    with pytest.raises(FCTError, match="embed_act"):
        EmbeddingModel("resnet18", 8, 3, image_size=32, embed_act="gelu")


def test_unknown_arch_names_closest():
    with pytest.raises(
        FCTError, match=r"unknown timm architecture 'resnet05' \(did you mean 'resnet50'\?\)"
    ):
        check_arch("resnet05")
    with pytest.raises(FCTError, match="unknown timm architecture"):
        EmbeddingModel("resnet05", 8, 3)
    assert check_arch("resnet50") == "resnet50"
    with pytest.raises(FCTError, match="use 'resnet50'"):
        check_arch("resnet50.a1_in1k")
