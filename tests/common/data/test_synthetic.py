import pytest
import torch
import torch.nn.functional as F

from common.data.synthetic import CLASSES, generate


def test_classes_are_ten_distinct_names():
    assert len(CLASSES) == 10
    assert len(set(CLASSES)) == 10
    assert all(isinstance(name, str) and name for name in CLASSES)


def test_shapes_and_dtypes():
    images, labels = generate(50, seed=0)
    assert images.shape == (50, 32, 32, 3)
    assert images.dtype == torch.uint8
    assert images.is_contiguous() and images.device.type == "cpu"
    assert labels.shape == (50,)
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)


@pytest.mark.parametrize("size", [16, 24, 48, 64])
def test_image_size(size):
    images, labels = generate(20, seed=0, image_size=size)
    assert images.shape == (20, size, size, 3)
    assert labels.shape == (20,)
    # The shape is drawn: images are not flat noise around one colour.
    assert images.float().std(dim=(1, 2)).mean() > 10


def test_empty():
    images, labels = generate(0, seed=0)
    assert images.shape == (0, 32, 32, 3)
    assert labels.shape == (0,)


def test_same_seed_same_output():
    a_images, a_labels = generate(100, seed=3)
    b_images, b_labels = generate(100, seed=3)
    assert torch.equal(a_images, b_images)
    assert torch.equal(a_labels, b_labels)


def test_different_seed_different_output():
    a_images, a_labels = generate(100, seed=3)
    b_images, b_labels = generate(100, seed=4)
    assert not torch.equal(a_labels, b_labels)
    # Not just reshuffled: the images themselves differ.
    assert not torch.equal(a_images[a_labels == 0][:5], b_images[b_labels == 0][:5])


def test_noise_option():
    clean, labels = generate(100, seed=3, noise=0.0)
    noisy, noisy_labels = generate(100, seed=3, noise=0.2)
    assert torch.equal(labels, noisy_labels)
    assert (noisy.float() - clean.float()).abs().mean() > 10


def test_global_rng_neither_used_nor_advanced():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(30, seed=5)
    assert torch.equal(torch.get_rng_state(), state)

    torch.manual_seed(456)
    second = generate(30, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_thread_setting_restored():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        generate(20, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("n", [10, 1003])
def test_balanced_and_shuffled(n):
    _, labels = generate(n, seed=1)
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert counts.min() == n // 10
    if n > 100:
        assert not torch.equal(labels, labels.sort().values)


@pytest.fixture
def single_thread():
    """Small tensors: on a busy machine extra threads only add waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _colour_statistics(images):
    """Per-channel mean and std: 6 features that ignore where pixels are."""
    pixels = images.float().flatten(1, 2) / 255
    return torch.cat([pixels.mean(1), pixels.std(1)], dim=1)


def _translation_invariant_structure(images):
    """Colour-blind, position-blind shape features.

    Distance of each pixel's colour from the image's median colour (the
    background covers most of the image) gives a foreground map whatever the
    colours; the magnitude of its low-frequency Fourier coefficients does not
    change when the shape moves.
    """
    pixels = images.float() / 255
    background = pixels.flatten(1, 2).median(dim=1).values
    foreground = (pixels - background[:, None, None]).norm(dim=-1)
    spectrum = torch.fft.rfft2(foreground).abs()[:, :8, :6]
    return torch.log1p(spectrum.flatten(1))


def _probe_accuracy(train_x, train_y, test_x, test_y, steps=200):
    """Held-out accuracy of a multinomial logistic regression fitted by full-batch gradient descent.

    Plain gradient descent rather than torch.optim: the problem is convex and
    small, and constructing a torch optimiser costs seconds of imports.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(train_x @ weight + bias, train_y)
        weight_grad, bias_grad = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= 1.0 * weight_grad
            bias -= 1.0 * bias_grad
    with torch.no_grad():
        return (((test_x @ weight + bias).argmax(1)) == test_y).float().mean().item()


def test_label_is_in_the_structure_not_the_colours(single_thread):
    train_images, train_labels = generate(2000, seed=10)
    test_images, test_labels = generate(1000, seed=11)

    colour_accuracy = _probe_accuracy(
        _colour_statistics(train_images), train_labels, _colour_statistics(test_images), test_labels
    )
    structure_accuracy = _probe_accuracy(
        _translation_invariant_structure(train_images),
        train_labels,
        _translation_invariant_structure(test_images),
        test_labels,
    )
    # Chance is 10%: colour and brightness statistics say (almost) nothing ...
    assert colour_accuracy < 0.2
    # ... while the same probe on colour-blind shape features does well.
    assert structure_accuracy > 0.8
