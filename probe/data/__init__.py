"""Datasets (digits, CIFAR pickle, image trees) and the device-resident loader."""

from probe.data.arrays import ImageArrays
from probe.data.cifar import load_cifar_pickle, load_image_tree
from probe.data.digits import load_digits
from probe.data.loader import DeviceLoader, random_crop, random_flip
from probe.data.registry import DATASETS, data_root, load_dataset
from probe.data.synthetic import synthetic

__all__ = [
    "DATASETS",
    "DeviceLoader",
    "ImageArrays",
    "data_root",
    "load_cifar_pickle",
    "load_dataset",
    "load_digits",
    "load_image_tree",
    "random_crop",
    "random_flip",
    "synthetic",
]
