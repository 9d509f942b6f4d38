"""spans.png: layer paths as everywhere else, spans converted from each layer's map to input pixels."""

from __future__ import annotations

from adaptive_span.figures import spans_figure

HISTORY = [{"epoch": e, "stages.0.0.mix/span_px/head0": 1.0 * e, "stages.0.0.mix/map_size": 32.0,
            "stages.2.0.mix.0/span_px/head0": 0.5 * e, "stages.2.0.mix.0/map_size": 8.0} for e in (1, 2)]


def test_spans_are_drawn_in_input_pixels_with_the_layer_paths():
    fig = spans_figure(HISTORY, max_span=5, input_size=32)
    first, third = [ax for ax in fig.axes if ax.get_visible()]
    assert first.get_title() == "stages.0.0.mix\n32x32 map, 1 px = 1 input px"
    assert third.get_title() == "stages.2.0.mix.0\n8x8 map, 1 px = 4 input px"  # the path viz and metrics use
    assert list(first.lines[0].get_ydata()) == [1.0, 2.0]
    assert list(third.lines[0].get_ydata()) == [2.0, 4.0]  # 0.5 and 1 px of an 8x8 map of a 32x32 input
    assert first.get_ylabel() == "span S·z (input pixels)"
    assert third.get_ylim()[1] >= 5 * 4  # the largest span S of the coarsest map fits


def test_without_the_input_size_spans_stay_in_map_pixels_and_say_so():
    fig = spans_figure(HISTORY, max_span=5)
    first, third = [ax for ax in fig.axes if ax.get_visible()]
    assert list(third.lines[0].get_ydata()) == [0.5, 1.0] and third.get_title() == "stages.2.0.mix.0\n8x8 map"
    assert first.get_ylabel() == "span S·z (pixels of the layer's map)"
