"""The paper's model: official parameter counts, any head count, the attention formulas, no stored positions,
no weight decay on the Gaussians, exact centres, the capture contract and a short training run."""

from __future__ import annotations

import math

import pytest
import torch

from common.inspect.capture import record_attention
from common.registry import ArgumentError, create_model
from common.train.optim import parameter_groups
from sa_conv.attention import GaussianScores
from tests.helpers import assert_learns

OFFICIAL = {"sa_quadratic": 12_086_844, "sa_learned": 12_278_682, "sa_learned_content": 29_484_282}
VARIANTS = ["sa_quadratic", "sa_quadratic_aniso", "sa_learned", "sa_learned_content"]


def tiny(name="sa_quadratic", **kwargs):
    torch.manual_seed(0)
    return create_model(name, **{**dict(layers=2, heads=4, hidden=16, intermediate=16, image_size=32), **kwargs})


def paper_size(name: str):
    with torch.device("meta"):  # full size without allocating 12-29M parameters
        return create_model(name, num_classes=10)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_are_the_official_ones(name):
    params = sum(p.numel() for p in paper_size(name).parameters())
    official = OFFICIAL.get(name, OFFICIAL["sa_quadratic"] + 6 * 9 * 3)  # aniso: a 2x2 S instead of s per head
    assert abs(params - official) <= 0.005 * official
    assert params == official  # in fact exact


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoints_hold_no_position_tables(name):
    model = paper_size(name)
    state = model.state_dict()
    assert set(state) == {n for n, _ in model.named_parameters()}  # no buffers at all
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())
    # nothing indexed by query or key position (16 x 16 = 256 of each): the public code keeps a
    # (16, 16, 16, 16, ...) table per layer, ~750 MB per checkpoint
    assert not any(256 in t.shape or t.dim() > 3 for t in state.values())
    positional = (".row", ".col", ".w_row", ".w_col", ".centres", ".spreads")
    assert sum(t.numel() for name, t in state.items() if name.endswith(positional)) <= 6 * 2 * (31 + 9) * 400


@pytest.mark.parametrize("heads", [1, 4, 9, 16])
@pytest.mark.parametrize("attention", ["quadratic", "quadratic_aniso", "learned", "learned_query", "learned_content"])
def test_any_head_count_runs_forward_and_backward(heads, attention):
    model = tiny("sa_conv", attention=attention, heads=heads, layers=1, hidden=8)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_options_are_argument_errors():
    with pytest.raises(ArgumentError, match="attention must be one of"):
        create_model("sa_conv", attention="gauss")
    with pytest.raises(ArgumentError, match="embedding_size must be hidden/2"):
        create_model("sa_conv", attention="learned_content", hidden=16, embedding_size=4)
    with pytest.raises(ArgumentError, match="image_size"):
        create_model("sa_quadratic", image_size=31)


def test_learned_tables_refuse_a_larger_grid_than_built_for():
    model = tiny("sa_learned", layers=1, image_size=16)
    with pytest.raises(ValueError, match="larger than the 8x8 grid"):
        model(torch.randn(1, 3, 32, 32))
    assert tiny("sa_quadratic", layers=1, image_size=16)(torch.randn(1, 3, 40, 24)).shape == (1, 10)  # any grid


def _maps(model, x, **kwargs):
    model.eval()
    with torch.no_grad(), record_attention(model, **kwargs) as maps:
        model(x)
    return maps


def test_capture_contract_shapes_and_key_stride():
    model = tiny("sa_quadratic", heads=9)
    maps = _maps(model, torch.randn(2, 3, 32, 32))
    assert [m.name for m in maps] == ["layers.0.attention", "layers.1.attention"]
    for m in maps:
        assert m.weights.shape == (2, 9, 16, 16, 16, 16)
        assert m.key_stride == (2.0, 2.0)
        assert torch.allclose(m.weights.sum((-2, -1)), torch.ones(2, 9, 16, 16))


def test_gaussian_attention_is_the_formula():
    model = tiny("sa_quadratic")
    scores = model.layers[0].attention.scores
    w = _maps(model, torch.randn(1, 3, 12, 10))[0].weights[0]  # (heads, 6, 5, 6, 5)
    for h in range(scores.heads):
        for qy, qx in [(0, 0), (3, 2), (5, 4)]:
            cy, cx = scores.centres[h].tolist()
            s2 = scores.spreads[h].item() ** 2
            logits = torch.tensor([[-0.5 * s2 * ((ky - qy - cy) ** 2 + (kx - qx - cx) ** 2) for kx in range(5)]
                                   for ky in range(6)])
            assert torch.allclose(w[h, qy, qx], logits.flatten().softmax(0).reshape(6, 5), atol=1e-6)


def test_anisotropic_with_scaled_identity_equals_isotropic():
    iso, aniso = GaussianScores(4), GaussianScores(4, anisotropic=True)
    with torch.no_grad():
        aniso.centres.copy_(iso.centres)
        aniso.spreads.copy_(iso.spreads[:, None, None] * torch.eye(2))
    x = torch.zeros(1, 5, 7, 1)
    assert torch.allclose(iso(x), aniso(x), atol=1e-5)


@torch.no_grad()
def test_learned_scores_are_the_formula():
    model = tiny("sa_conv", attention="learned", layers=1, heads=3, hidden=8, image_size=16)
    scores = model.layers[0].attention.scores
    w = _maps(model, torch.randn(1, 3, 10, 16))[0].weights[0]  # grid 5 x 8 inside the declared 8 x 8
    g = 8
    for h in range(3):
        for qy, qx in [(0, 0), (2, 5)]:
            logits = torch.tensor([[scores.w_row[h] @ scores.row[ky - qy + g - 1]
                                    + scores.w_col[h] @ scores.col[kx - qx + g - 1] for kx in range(8)]
                                   for ky in range(5)])
            assert torch.allclose(w[h, qy, qx], logits.flatten().softmax(0).reshape(5, 8), atol=1e-6)


@torch.no_grad()
def test_content_scores_are_the_formula():
    model = tiny("sa_conv", attention="learned_content", layers=1, heads=2, hidden=8, image_size=12)
    attention = model.layers[0].attention
    s = attention.scores
    x = torch.randn(2, 5, 6, 8)
    attention.eval()
    with torch.no_grad(), record_attention(attention) as maps:
        attention(x)
    w = maps[0].weights
    q, k = s.query(x).reshape(2, 5, 6, 2, 8), s.key(x).reshape(2, 5, 6, 2, 8)
    for b, h, qy, qx in [(0, 0, 0, 0), (1, 1, 2, 3), (0, 1, 4, 5)]:
        logits = torch.tensor([[q[b, qy, qx, h] @ (k[b, ky, kx, h] + torch.cat([s.row[ky - qy + 5],
                                                                               s.col[kx - qx + 5]]))
                                for kx in range(6)] for ky in range(5)]) / math.sqrt(8)
        assert torch.allclose(w[b, h, qy, qx], logits.flatten().softmax(0).reshape(5, 6), atol=1e-6)


@pytest.mark.parametrize("name", ["sa_quadratic", "sa_quadratic_aniso"])
def test_no_weight_decay_on_centres_and_spreads(name):
    model = tiny(name)
    decay, no_decay = (set(map(id, g["params"])) for g in parameter_groups(model, 1e-4))
    for layer in model.layers:
        scores = layer.attention.scores
        assert id(scores.centres) in no_decay and id(scores.spreads) in no_decay
        assert id(layer.attention.value.weight) in decay


def test_argmax_of_each_head_is_its_rounded_centre():
    model = tiny("sa_quadratic", heads=9)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.scores.centres.copy_(torch.empty(9, 2).uniform_(-6.4, 6.4, generator=gen))
            layer.attention.scores.spreads.copy_(torch.empty(9).uniform_(0.3, 2.0, generator=gen))
    maps = _maps(model, torch.randn(1, 3, 32, 32), queries=[(16, 16)])  # image pixel (16, 16): grid cell (8, 8)
    for m, layer in zip(maps, model.layers):
        w = m.weights[0, :, 0]  # (heads, 16, 16)
        flat = w.flatten(1).argmax(1)
        want = 8 + layer.attention.scores.centres.detach().round().long()
        assert torch.equal(torch.stack([flat // 16, flat % 16], 1), want)


def test_gaussian_init_as_the_paper():
    scores = GaussianScores(2000)
    assert abs(scores.centres.std().item() - 2.0) < 0.1
    assert abs(scores.spreads.mean().item() - 1.0) < 1e-3 and scores.spreads.std().item() < 0.02


def test_one_sgd_step_moves_the_centres_and_spreads():
    from common.config import OptimizerConfig
    from common.train.optim import build_optimizer

    model = tiny("sa_quadratic_aniso")
    optimizer = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4))
    scores = model.layers[0].attention.scores
    centres, spreads = scores.centres.detach().clone(), scores.spreads.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    assert not torch.equal(scores.centres, centres) and not torch.equal(scores.spreads, spreads)


def test_short_training_run_logs_the_contours_each_epoch_and_draws_its_checkpoints(write_config, tmp_path):
    from common import tasks
    from common.config import load_config
    from sa_conv.gauss_viz import draw_checkpoints

    cfg = load_config(write_config({
        "model": {"name": "sa_quadratic", "layers": 2, "heads": 4, "hidden": 16, "intermediate": 16,
                  "image_size": 16},
        "data": {"synthetic": {"train_size": 64, "test_size": 16, "image_size": 16}},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"weight_decay": 1.0e-4}},
        "log": {"tensorboard": True},
    }))
    summary = tasks.train(cfg, output=str(tmp_path / "run"))
    assert math.isfinite(summary["best_val_acc"])
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert events and b"gaussian_heads" in b"".join(p.read_bytes() for p in events)
    model = create_model("sa_quadratic", layers=2, heads=4, hidden=16, intermediate=16, image_size=16)
    pngs = draw_checkpoints(model, [tmp_path / "run"], tmp_path / "viz", dpi=30)  # last.ckpt == best.ckpt
    assert [p.name for p in pngs] == ["gauss_epoch_0001.png"]


def test_init_torch_default_is_the_official_codes_and_bert_is_the_option():
    """The official BertImage applies no init: PyTorch's Linear init and N(0, 1) embedding tables. The initial
    positional logits are then O(1) (a non-uniform attention at step 0); BERT's N(0, 0.02) makes them ~1e-2."""
    torch.manual_seed(0)
    small = dict(layers=1, heads=4, hidden=64, intermediate=32)
    official = create_model("sa_learned", **small)  # the default
    bert = create_model("sa_learned", init="bert", **small)
    scores, bert_scores = official.layers[0].attention.scores, bert.layers[0].attention.scores
    assert abs(scores.row.std().item() - 1.0) < 0.1 and abs(bert_scores.row.std().item() - 0.02) < 0.004
    bound = 64 ** -0.5
    assert scores.w_row.abs().max() <= bound and scores.w_row.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.2)
    embed = official.embed  # nn.Linear(12, 64): PyTorch's U(-1/sqrt(12), 1/sqrt(12)), bias included
    assert embed.weight.abs().max() <= 12 ** -0.5 and embed.bias.abs().max() > 0
    assert bert.embed.bias.abs().max() == 0 and abs(bert.embed.weight.std().item() - 0.02) < 0.004
    x = torch.zeros(1, 16, 16, 64)
    with torch.no_grad():
        logit_std, bert_logit_std = scores(x).std().item(), bert_scores(x).std().item()
    assert 0.5 < logit_std < 1.2 and bert_logit_std < 0.02  # row + col terms, each ~U-weighted N(0, 1) sums
    gauss = create_model("sa_quadratic", **small).layers[0].attention.scores
    assert abs(gauss.centres.std().item() - 2.0) < 1.0 and (gauss.spreads - 1).abs().max() < 0.05  # unchanged
    with pytest.raises(ArgumentError, match="init"):
        create_model("sa_quadratic", init="xavier")


@pytest.mark.parametrize("mask", ["per_image", "shared"])
def test_attention_dropout_mask_per_image_or_shared_by_the_batch(mask):
    torch.manual_seed(0)
    model = create_model("sa_quadratic", layers=1, heads=2, hidden=16, intermediate=8, dropout=0.0,
                         attention_dropout=0.5, attention_dropout_mask=mask).train()
    attention = model.layers[0].attention
    x = torch.randn(1, 8, 8, 16).expand(4, -1, -1, -1).contiguous()  # four identical images
    out = attention(x)
    same = all(torch.allclose(out[0], out[i]) for i in range(1, 4))
    assert same == (mask == "shared")  # the official code's mask is one for the whole batch
    assert not torch.allclose(out[0], attention.eval()(x)[0])  # and dropout did act
    learned_content = create_model("sa_learned_content", layers=1, heads=2, hidden=16, intermediate=8,
                                   attention_dropout=0.5, attention_dropout_mask="shared").train()
    y = learned_content.layers[0].attention(x)  # content scores have a batch axis: per image regardless
    assert not all(torch.allclose(y[0], y[i]) for i in range(1, 4))


def test_the_gaussian_attention_model_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "sa_quadratic", "layers": 2, "heads": 4, "hidden": 16,
                                           "intermediate": 32, "image_size": 16})
