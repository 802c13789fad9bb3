"""Collection at the repository root: the Triton kernels' module imports triton, which CUDA
builds of torch bring and CPU builds do not; where it is absent the module is not collected
(probe.probes.onepass_cuda then serves no call, and its tests skip)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["probe/probes/_triton_kernels.py"]
