"""The data a run trains on, and what the trainer does to it before it reaches the network, one module each:

    layouts.py       Dataset; finding, loading and checking the on-disk layouts
    folders.py       an image tree, train/<class>/ and test/<class>/: decoded in parallel, cached
    downloading.py   fetching the CIFAR-10 archive, resumable, md5-checked
    statistics.py    per-channel (or per-feature) mean and std, which inputs are standardised with
    split.py         the validation split held out by --val
    components.py    principal components and projection onto them (--pca)
    augmentation.py  the random flips, translations and cutouts of each batch; test-time views

The functions and classes are re-exported here, so `from fastnet import data; data.load_dataset()`
works. The module-level values (STATS_CHUNK, CIFAR10_URL, NPY_FILES, ...) are not: a copy here would
not be the value the code reads, so read, set or monkeypatch them on the module that holds them.
"""

from fastnet.data.augmentation import Augmentation, ComponentFlip, ProjectedAugmentation, View, tta_views
from fastnet.data.components import mirror_images, mirror_permutation, mirror_signs, principal_components, project
from fastnet.data.downloading import download
from fastnet.data.folders import load_image_tree
from fastnet.data.layouts import Dataset, default_data_path, find_dataset, load_dataset
from fastnet.data.split import most_held_out, split_validation
from fastnet.data.statistics import channel_stats, feature_stats

__all__ = [
    "Augmentation", "ComponentFlip", "Dataset", "ProjectedAugmentation", "channel_stats", "default_data_path",
    "download", "feature_stats", "find_dataset", "load_dataset", "load_image_tree", "mirror_images",
    "mirror_permutation", "mirror_signs", "most_held_out",
    "principal_components",
    "project", "split_validation", "tta_views", "View",
]
