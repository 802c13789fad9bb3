"""Published CIFAR-10 test errors, set beside a study's own numbers in its degradation table.

ResNets: He et al. 2016 (CVPR), Table 6 (ResNet-110: best of 5 runs). Plain nets are not tabulated
in the paper (read from its Fig. 6); the values are the mean of 5 runs of an independent PyTorch
reproduction at the paper's recipe (nabla0001/resnet). Both use option-A shortcuts, post-activation
blocks and the 64k-iteration schedule: a study with the ``fast`` recipe is not expected to match
them, only to order the same way.
"""

from __future__ import annotations

__all__ = ["PUBLISHED_CIFAR10", "published_test_error"]

_HE = "He et al. 2016, Table 6"
_REPRO = "nabla0001/resnet reproduction, mean of 5 runs"

# (family, depth) -> (test error in percent, source)
PUBLISHED_CIFAR10: dict[tuple[str, int], tuple[float, str]] = {
    ("resnet", 20): (8.75, _HE),
    ("resnet", 32): (7.51, _HE),
    ("resnet", 44): (7.17, _HE),
    ("resnet", 56): (6.97, _HE),
    ("resnet", 110): (6.43, _HE),
    ("resnet", 1202): (7.93, _HE),
    ("plain", 20): (9.78, _REPRO),
    ("plain", 56): (12.95, _REPRO),
}


def published_test_error(dataset: str, family: str, depth: int) -> tuple[float, str] | None:
    """The published CIFAR-10 test error (percent, source) of a zoo model, or None.

    ``dataset`` is the loaded dataset's name (``cifar10``, or an image tree such as
    ``cifar10-jpg``); other datasets and families have no published figure here.

    Example:
        >>> published_test_error("cifar10", "resnet", 56)
        (6.97, 'He et al. 2016, Table 6')
        >>> published_test_error("cifar100", "resnet", 56) is None
        True
    """
    name = dataset.lower()
    if not name.startswith("cifar10") or name.startswith("cifar100"):
        return None
    return PUBLISHED_CIFAR10.get((family, depth))
