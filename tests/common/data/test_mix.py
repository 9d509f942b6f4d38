"""Mixup / CutMix of training batches: targets are probabilities that match the pixels, draws are resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.mix import MixedBatches, cutmix_box


class FixedBatches:
    """A loader yielding the same few batches every epoch (distinct images: image i is filled with i)."""

    def __init__(self, steps=6, batch=4, classes=5, device="cpu"):
        self.batches = [(torch.arange(s * batch, (s + 1) * batch, dtype=torch.float32, device=device)
                         .view(-1, 1, 1, 1).expand(-1, 3, 8, 10).clone(), torch.arange(batch, device=device) % classes)
                        for s in range(steps)]
        self.num_samples, self._start = steps * batch, 0

    def set_epoch(self, epoch, start_step=0):
        self._start = start_step

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        yield from self.batches[self._start:]
        self._start = 0


def batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_targets_are_probabilities_that_match_the_pixel_shares(mixup, cutmix):
    loader = MixedBatches(FixedBatches(steps=40), 5, mixup, cutmix, prob=1.0, seed=3)
    kinds = set()
    for (x, target), (x0, y0) in zip(batches(loader, 0), loader.loader.batches):
        assert target.shape == (4, 5) and torch.allclose(target.sum(1), torch.ones(4))
        # Sample i is mixed with sample 3 - i: the share of i's pixels is the weight of i's label.
        share = ((x - x0.flip(0)) / (x0 - x0.flip(0))).mean((1, 2, 3))
        lam = target[0, y0[0]].item() if y0[0] != y0[3] else None
        if lam is not None:
            assert share[0].item() == pytest.approx(lam, abs=1e-5)
        if torch.equal(x, x0):  # an empty CutMix box
            continue
        cut = bool(((x == x0) | (x == x0.flip(0))).all())  # every pixel from one of the two images
        kinds.add("cutmix" if cut else "mixup")
    assert kinds == ({"mixup"} if cutmix == 0 else {"cutmix"} if mixup == 0 else {"mixup", "cutmix"})


def test_mix_prob_zero_only_turns_labels_into_one_hot():
    loader = MixedBatches(FixedBatches(), 5, 1.0, 1.0, prob=0.0)
    for (x, target), (x0, y0) in zip(batches(loader, 0), loader.loader.batches):
        assert torch.equal(x, x0) and torch.equal(target.argmax(1), y0) and torch.equal(target.max(1).values,
                                                                                        torch.ones(4))


def test_draws_depend_on_seed_epoch_and_step_only():
    loader = MixedBatches(FixedBatches(), 5, 1.0, 1.0, prob=0.7, seed=1)
    first = batches(loader, 2)
    resumed = batches(loader, 2, start=3)
    for (xa, ta), (xb, tb) in zip(first[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    other_epoch = batches(loader, 3)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other_epoch))


def test_cutmix_box_area_and_bounds():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        for _ in range(50):
            top, left, h, w = cutmix_box((8, 10), lam, rng)
            assert 0 <= top and top + h <= 8 and 0 <= left and left + w <= 10
            assert h * w <= round((1 - lam) * 80) + 1


def test_needs_one_of_the_two():
    with pytest.raises(ValueError):
        MixedBatches(FixedBatches(), 5, 0.0, 0.0)


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0)])
def test_permutation_partners_are_drawn_per_batch_and_match_the_targets(mixup, cutmix):
    """partners="permutation": a torch.randperm-style partner per sample, as the official scripts draw them."""
    loader = MixedBatches(FixedBatches(steps=30, batch=6, classes=6), 6, mixup, cutmix, prob=1.0, seed=2,
                          partners="permutation")
    partners = set()
    for step, ((x, target), (x0, y0)) in enumerate(zip(batches(loader, 0), loader.loader.batches)):
        rng = np.random.default_rng((2, 0, step))  # replay this batch's draws: mix or not, lam, partners, box
        rng.random()
        lam = float(rng.beta(1.0, 1.0))
        partner = torch.from_numpy(rng.permutation(6))
        partners.add(tuple(partner.tolist()))
        if cutmix:
            top, left, h, w = cutmix_box(x.shape[-2:], lam, rng)
            lam = 1.0 - h * w / 80
            expected = x0.clone()
            expected[..., top:top + h, left:left + w] = x0[partner][..., top:top + h, left:left + w]
        else:
            expected = lam * x0 + (1 - lam) * x0[partner]
        assert torch.allclose(x, expected)
        one_hot = torch.eye(6)
        assert torch.allclose(target, lam * one_hot[y0] + (1 - lam) * one_hot[y0[partner]])
    assert len(partners) > 20  # a fresh permutation per batch, not a fixed pairing


def test_partners_option_is_checked():
    with pytest.raises(ValueError, match="partners"):
        MixedBatches(FixedBatches(), 5, 1.0, 0.0, partners="shuffle")
