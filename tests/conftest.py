"""Fixtures shared by the tests: where the real CIFAR-10 is, and small slices of it.

The real images come from $FASTNET_TEST_DATA (what .ci/run builds from ../shared/cifar10), else from
data/ when a dataset is there. Without either, the tests that need them are skipped, except under CI
(CI=true), where missing data is a failure.
"""

import os

import numpy as np
import pytest

from fastnet import backends, data
from helpers import OTHER_BACKENDS, real_data_path, save_brightness_classes, unavailable


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """Decoded image trees go to a temporary folder, in this process and in the commands it starts."""
    folder = tmp_path_factory.mktemp("fastnet-cache")
    os.environ["FASTNET_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def cifar():
    """The full real dataset, loaded once."""
    return data.load_dataset(real_data_path())


@pytest.fixture(scope="session")
def cifar_subset(cifar, tmp_path_factory):
    """An npy folder with the first 4,000 training and 1,000 test images of the real set."""
    folder = tmp_path_factory.mktemp("cifar-subset")
    np.save(folder / "train_images.npy", cifar.train_images[:4000])
    np.save(folder / "train_labels.npy", cifar.train_labels[:4000])
    np.save(folder / "test_images.npy", cifar.test_images[:1000])
    np.save(folder / "test_labels.npy", cifar.test_labels[:1000])
    return folder


@pytest.fixture
def tiny_npy(tmp_path):
    """A synthetic, learnable 3-class npy dataset: each class is a brightness level plus noise."""
    return save_brightness_classes(tmp_path, np.random.default_rng(0), {"train": 300, "test": 90}, side=4, step=80,
                                   base=40, noise=20)


@pytest.fixture(scope="module", params=OTHER_BACKENDS or [None])
def other(request):
    """The name of a backend to compare with numpy."""
    if request.param is None:
        unavailable("no backend but numpy is available: pip install numba")
    return request.param


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    """Each backend fastnet ships; one that is not installed is skipped (numpy always is)."""
    if request.param not in backends.available():
        pytest.skip(f"the {request.param} backend is not installed")
    return request.param
