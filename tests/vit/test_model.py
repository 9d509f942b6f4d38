"""ViT: shapes, pooling, SPT and LSA, attention probabilities, the capture contract, presets."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.inspect.capture import record_attention
from common.registry import MODELS, check_model_args, create_model
from vit.model import DropPath, VisionTransformer
from vit.tokens import ShiftedPatchTokenization, patchify, shift_image

TINY = dict(dim=16, depth=2, heads=2, num_classes=5)


def tiny(**options) -> VisionTransformer:
    torch.manual_seed(0)
    return create_model("vit", **{**TINY, **options})


@pytest.mark.parametrize("image_size, patch_size", [(32, 4), (32, 8), (28, 7), ((16, 24), 8), (12, 2)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_for_image_and_patch_sizes(image_size, patch_size, pool):
    model = tiny(image_size=image_size, patch_size=patch_size, pool=pool).eval()
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid = (h // patch_size, w // patch_size)
    assert model.grid == grid
    assert model.pos_embed.shape == (1, grid[0] * grid[1] + (pool == "cls"), 16)
    x = torch.randn(3, 3, h, w)
    assert model.forward_tokens(x).shape == (3, grid[0] * grid[1] + (pool == "cls"), 16)
    assert model(x).shape == (3, 5)


def test_size_errors_say_what_to_set():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny(image_size=30, patch_size=4)
    with pytest.raises(UserError, match=r"built for 32x32 images and got 16x16: set model.image_size: 16"):
        tiny()(torch.randn(1, 3, 16, 16))


def test_cls_pooling_reads_the_cls_token_and_mean_pooling_averages_patches():
    x = torch.randn(2, 3, 32, 32)
    cls_model, mean_model = tiny(pool="cls").eval(), tiny(pool="mean").eval()
    assert cls_model.cls_token is not None and mean_model.cls_token is None
    tokens = cls_model.forward_tokens(x)
    assert torch.allclose(cls_model(x), cls_model.head(tokens[:, 0]), atol=1e-6)
    tokens = mean_model.forward_tokens(x)
    assert torch.allclose(mean_model(x), mean_model.head(tokens.mean(1)), atol=1e-6)
    # With CLS pooling the logits move when the CLS token does; mean pooling has no such parameter.
    before = cls_model(x)
    with torch.no_grad():  # not a constant shift, which every LayerNorm would remove
        cls_model.cls_token.add_(torch.randn_like(cls_model.cls_token))
    assert not torch.allclose(before, cls_model(x), atol=1e-4)


def test_shift_image_moves_content_and_fills_zeros():
    x = torch.arange(1, 17.0).view(1, 1, 4, 4)
    shifted = shift_image(x, 1, -1)  # out[i, j] = x[i + 1, j - 1]
    assert torch.equal(shifted[0, 0, :3, 1:], x[0, 0, 1:, :3])
    assert shifted[0, 0, 3].abs().sum() == 0 and shifted[0, 0, :, 0].abs().sum() == 0


def test_patchify_is_row_major_patches():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches[:, 4].view(2, 4, 4, 3), x[:, :, 4:8, 4:8].permute(0, 2, 3, 1))


@pytest.mark.parametrize("directions, shift, pixel, seen", [
    ("diagonal", 2, (5, 5), True),  # x[i + 2, j + 2] for i = j = 3
    ("diagonal", 2, (4, 1), True),  # x[i + 2, j - 2] for i = 2, j = 3
    ("diagonal", 2, (6, 0), False),  # beyond the shift
    ("diagonal", 2, (2, 6), False),  # beyond the shift along one axis
    ("cardinal", 1, (4, 1), True),  # x[i + 1, j] for i = 3
    ("cardinal", 1, (4, 4), False),  # a cardinal copy moves one coordinate
])
def test_spt_tokens_see_pixels_just_outside_their_patch(directions, shift, pixel, seen):
    """Patch (0, 0) of a 4x4-patch grid covers pixels 0..3; SPT lets its token see the shifted copies too."""
    torch.manual_seed(0)
    spt = ShiftedPatchTokenization(3, 8, 4, shift=shift, directions=directions)
    plain = tiny(patch_size=4).patch_embed
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[0, :, pixel[0], pixel[1]] += 1.0
    assert (not torch.allclose(spt(x)[0, 0], spt(y)[0, 0])) == seen
    assert torch.allclose(plain(x)[0, 0], plain(y)[0, 0])  # the plain embedding sees its own patch only


def test_spt_default_shift_is_half_a_patch():
    assert ShiftedPatchTokenization(3, 8, 4).shift == 2
    assert ShiftedPatchTokenization(3, 8, 2).shift == 1
    with pytest.raises(ValueError, match="spt_directions"):
        ShiftedPatchTokenization(3, 8, 4, directions="sideways")


@pytest.mark.parametrize("variant", ["spt", "lsa"])
def test_spt_and_lsa_each_change_the_output_and_keep_gradients(variant):
    x = torch.randn(4, 3, 32, 32)
    base = tiny().eval()
    model = tiny(**{variant: True}).eval()
    if variant == "lsa":  # same weights: only the diagonal mask and the (equal at init) learned scale differ
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(name.endswith("attn.scale") for name in missing)
    assert not torch.allclose(model(x), base(x), atol=1e-4)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if variant == "lsa":
        assert all(block.attn.scale.grad.abs().min() > 0 for block in model.blocks)  # per-head temperatures learn
    else:
        assert model.patch_embed.norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lsa", [False, True])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_rows_sum_to_one_and_the_output_uses_them(lsa, pool):
    model = tiny(lsa=lsa, pool=pool).eval()
    attn = model.blocks[0].attn
    tokens = torch.randn(2, 64 + (pool == "cls"), 16)
    probs = attn.probabilities(tokens)
    n = tokens.shape[1]
    assert probs.shape == (2, 2, n, n)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, n), atol=1e-6)
    diagonal = probs.diagonal(dim1=-2, dim2=-1)
    if lsa:
        assert torch.equal(diagonal, torch.zeros_like(diagonal))  # LSA: no token attends to itself
    else:
        assert (diagonal > 0).all()
    # The fused SDPA path computes exactly these probabilities times the values.
    _, _, v = attn._scaled_qkv(tokens)
    expected = attn.proj((probs @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(attn(tokens), expected, atol=1e-5)


def test_lsa_scale_is_a_learned_per_head_temperature():
    model = tiny(lsa=True, heads=4)
    scale = model.blocks[0].attn.scale
    assert isinstance(scale, torch.nn.Parameter) and scale.shape == (4,)
    assert torch.allclose(scale, torch.full((4,), 4 ** -0.5))  # head_dim 16 / 4 = 4
    assert model.blocks[0].attn.epoch_metrics() == {"lsa_temperature": pytest.approx(2.0)}
    assert "blocks.0.attn.scale" not in tiny().state_dict()  # the plain scale is a constant, not saved


def test_recorded_maps_place_patches_on_the_image_and_include_the_cls_query():
    model = tiny(lsa=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record_attention(model) as maps:
        model(x)
    assert [m.name for m in maps] == ["blocks.0.attn", "blocks.0.attn[cls]", "blocks.1.attn", "blocks.1.attn[cls]"]
    patch_map, cls_map = maps[0], maps[1]
    assert patch_map.weights.shape == (2, 2, 8, 8, 8, 8) and patch_map.key_stride == (4.0, 4.0)
    assert cls_map.weights.shape == (2, 2, 1, 1, 8, 8) and cls_map.query_token == "cls"
    assert patch_map.query_token is None
    with torch.no_grad():
        tokens = model.pos_embed + torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1)
        probs = model.blocks[0].attn.probabilities(model.blocks[0].norm1(tokens))
    # Patch query (y, x) = token 1 + 8y + x; its map is its row over the patch keys (the CLS key left out).
    assert torch.allclose(patch_map.weights[:, :, 3, 5].flatten(-2), probs[:, :, 1 + 8 * 3 + 5, 1:], atol=1e-6)
    assert torch.allclose(cls_map.weights[:, :, 0, 0].flatten(-2), probs[:, :, 0, 1:], atol=1e-6)
    assert patch_map.weights[:, :, 3, 5, 3, 5].abs().max() == 0  # LSA's masked diagonal
    # Chosen query pixels: pixel (13, 22) lies in patch (3, 5); the CLS map comes along.
    with torch.no_grad(), record_attention(model, queries=[(13, 22)]) as chosen:
        model(x)
    assert torch.allclose(chosen[0].weights[:, :, 0], patch_map.weights[:, :, 3, 5], atol=1e-6)
    assert torch.allclose(chosen[1].weights[:, :, 0], cls_map.weights[:, :, 0, 0], atol=1e-6)


def test_mean_pooling_records_no_cls_map():
    model = tiny(pool="mean").eval()
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(1, 3, 32, 32))
    assert [m.name for m in maps] == ["blocks.0.attn", "blocks.1.attn"]
    assert torch.allclose(maps[0].weights.sum((-2, -1)), torch.ones(1, 2, 8, 8), atol=1e-6)


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(1000, 4, 3)
    assert drop.eval()(x) is x
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    rates = [b.drop_path.p for b in tiny(depth=5, drop_path=0.2, drop_path_mode="linear").blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert [b.drop_path.p for b in tiny(depth=3, drop_path=0.2).blocks] == [0.2] * 3


def test_presets_are_vit_with_other_defaults():
    # Lee et al.'s ViT: the count their code gives for CIFAR-10 (qkv without bias, LN + Linear head).
    assert sum(p.numel() for p in create_model("vit_cifar").parameters()) == 2_692_426
    model = create_model("vit_cifar_spt_lsa", num_classes=100)
    assert isinstance(model.patch_embed, ShiftedPatchTokenization) and model.blocks[0].attn.locality
    re_model = create_model("vit_re")
    assert re_model.grid == (16, 16) and len(re_model.blocks) == 6
    assert (re_model.blocks[0].attn.heads, re_model.blocks[0].attn.head_dim) == (9, 44)
    assert create_model("vit_re", pool="mean", depth=2).cls_token is None  # presets take every option
    with pytest.raises(UserError, match="did you mean 'patch_size'"):
        check_model_args("vit_cifar", {"patch": 4})
    import inspect
    assert inspect.signature(MODELS.get("vit_re")).parameters["dim"].default == 400


def test_official_init_is_lee_et_al():
    """init="official": models/vit.py init_weights (Xavier-normal Linear layers, the classifier and SPT's
    included, zero biases) and torch.randn position embedding and CLS token."""
    torch.manual_seed(0)
    official = create_model("vit_cifar_spt_lsa", dim=64, depth=2, heads=4, num_classes=10, init="official")
    assert abs(official.pos_embed.std().item() - 1.0) < 0.05 and abs(official.cls_token.std().item() - 1.0) < 0.3
    for linear in (official.head, official.patch_embed.proj, official.blocks[0].attn.qkv):
        fan_out, fan_in = linear.weight.shape
        assert linear.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.12)
    assert all(m.bias.abs().max() == 0 for m in official.modules() if isinstance(m, torch.nn.Linear)
               and m.bias is not None)
    ours = create_model("vit_cifar_spt_lsa", dim=64, depth=2, heads=4, num_classes=10)
    assert ours.head.weight.std().item() < 0.025 and ours.pos_embed.std().item() < 0.025  # small_head
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():  # initial logits: the official init starts far from ln(classes), ours at it
        assert official.eval()(x).std() > 5 * ours.eval()(x).std()
    with pytest.raises(ValueError, match="init"):
        create_model("vit_cifar", init="xavier")


@pytest.mark.parametrize("locality", [False, True])
def test_attention_flops_are_counted_on_the_cpu_kernel(locality):
    """torch 2.14 counts nothing for its CPU flash kernel; common.inspect.flops gives it torch's SDPA formula."""
    from common.inspect.timing import count_macs
    from vit.attention import TokenSelfAttention

    torch.manual_seed(0)
    dim, heads, head_dim, grid = 12, 2, 8, (3, 4)
    tokens = 1 + grid[0] * grid[1]
    layer = TokenSelfAttention(dim, heads, grid, head_dim=head_dim, locality=locality)
    linear = tokens * dim * 3 * heads * head_dim + tokens * heads * head_dim * dim  # qkv and the output projection
    attention = heads * tokens * tokens * 2 * head_dim  # q.k and the weighted sum of v, the masked diagonal too
    assert count_macs(layer, (tokens, dim)) == linear + attention
