"""The 2-D adaptive span mask: the formula per ring, the ring offset, the window that holds it."""

from __future__ import annotations

import pytest
import torch

from adaptive_span import AdaptiveSpanMask
from adaptive_span.mask import chebyshev_rings


def mask_with(z, max_span=4, ramp=2.0, ring_offset=0):
    m = AdaptiveSpanMask(len(z), max_span, ramp, ring_offset=ring_offset).double()
    with torch.no_grad():
        m.z.copy_(torch.tensor(z, dtype=torch.double))
    return m


def formula(z, d, S, R, offset=0):
    return min(1.0, max(0.0, (S * z - (d - offset)) / R + 1))


def test_chebyshev_rings():
    assert chebyshev_rings(1).tolist() == [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    rings = chebyshev_rings(2)
    assert rings.shape == (5, 5) and rings[2, 2] == 0 and rings[0, 3] == 2 and rings[1, 3] == 1


@pytest.mark.parametrize("ring_offset", [0, 1])
@pytest.mark.parametrize("S, R", [(4, 2.0), (5, 1.0), (8, 3.0)])
def test_mask_equals_the_formula_at_every_offset(S, R, ring_offset):
    z = [0.0, 0.15, 0.5, 1.0]
    m = mask_with(z, S, R, ring_offset)
    mask = m(S)
    assert mask.shape == (4, 2 * S + 1, 2 * S + 1)
    for h, zh in enumerate(z):
        for dy in range(-S, S + 1):
            for dx in range(-S, S + 1):
                expected = formula(zh, max(abs(dy), abs(dx)), S, R, ring_offset)
                assert mask[h, dy + S, dx + S].item() == pytest.approx(expected, abs=1e-12)


def test_chosen_values_by_hand():
    # S = 4, R = 2, z = 0.5: S z = 2 -> rings 0..2 fully on, ring 3 at 0.5, ring 4 off
    assert mask_with([0.5]).ring_values(4)[0].tolist() == [1.0, 1.0, 1.0, 0.5, 0.0]
    # the public code's offset keeps ring 1 even at z = 0: rings 0, 1 on, ring 2 at 0.5
    assert mask_with([0.0], ring_offset=1).ring_values(4)[0].tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert mask_with([0.0], ring_offset=0).ring_values(4)[0].tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("z, ring_offset, radius", [
    ([0.0], 0, 1),          # S z + R = 2: ring 1 at 0.5, ring 2 exactly 0
    ([0.0], 1, 2),
    ([0.5, 0.1], 0, 3),     # the widest head decides: 2 + 2 = 4 -> rings < 4
    ([0.6], 0, 4),          # 2.4 + 2 = 4.4 -> ring 4 at 0.2
    ([1.0], 0, 4),          # capped at S: at z = 1 every ring <= S is fully on
    ([1.0], 1, 4),
])
def test_required_radius_is_the_smallest_window_holding_the_mask(z, ring_offset, radius):
    m = mask_with(z, ring_offset=ring_offset)
    assert m.required_radius() == radius
    values = m.ring_values(4)
    assert (values[:, radius] > 0).any() and (radius == 4 or (values[:, radius + 1:] == 0).all())


def test_full_span_is_plain_local_attention_of_the_largest_window():
    assert torch.equal(mask_with([1.0, 1.0])(4), torch.ones(2, 9, 9, dtype=torch.double))


def test_mask_is_differentiable_in_z_and_z_has_no_weight_decay():
    m = mask_with([0.3, 0.7])
    m(4).sum().backward()
    assert (m.z.grad > 0).all()  # more span, more mask
    assert getattr(m.z, "_no_weight_decay", False)


def test_clamp_and_bad_options():
    m = mask_with([-0.2, 1.4])
    m.clamp_()
    assert m.z.tolist() == [0.0, 1.0]
    for kwargs in ({"max_span": 0}, {"ramp": 0.0}, {"init": 1.5}, {"ring_offset": 2}):
        with pytest.raises(ValueError):
            AdaptiveSpanMask(2, **{"max_span": 4, "ramp": 2.0, **kwargs})
