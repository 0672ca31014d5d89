"""Test data: CIFAR-10/100 (shipped subset, full sets, official -C files), corruptions, digit shifts,
ImageNet-C, and the scenarios that order them into test streams.

    from testtime.data import cifar10c_stream
    for x, y in cifar10c_stream("continual", severity=5, n_per_domain=100):  # x in [0, 1]
        ...
"""

from testtime.data.api import ImageStream, cifar10c_stream, make_stream
from testtime.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10C_CORRUPTIONS,
    CIFAR100_CLASSES,
    ImageSet,
    download_cifar10,
    download_cifar100,
    load_cifar10,
    load_cifar10c_npy,
    load_cifar100,
    load_cifar100c_npy,
    load_embedded_cifar10,
)
from testtime.data.corruptions import CORRUPTIONS, corrupt
from testtime.data.digits import load_digits
from testtime.data.streams import Batch, Domain, Stream, StreamSpec, build_stream, list_scenarios

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "CORRUPTIONS",
    "Batch",
    "Domain",
    "ImageSet",
    "ImageStream",
    "Stream",
    "StreamSpec",
    "build_stream",
    "cifar10c_stream",
    "corrupt",
    "download_cifar10",
    "download_cifar100",
    "list_scenarios",
    "load_cifar10",
    "load_cifar10c_npy",
    "load_cifar100",
    "load_cifar100c_npy",
    "load_digits",
    "load_embedded_cifar10",
    "make_stream",
]
