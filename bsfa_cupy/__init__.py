"""bsfa-cupy: Block-Sparse FlashAttention forward kernels compiled at run time through CuPy (NVRTC).

Works on CuPy, PyTorch and JAX GPU arrays (zero-copy through DLPack). Importing this package needs
no CuPy; the GPU functions say which extra to install when it is missing. The exact semantics are
defined by the NumPy reference, ``bsfa_reference``.
"""
from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from ._backend import has_gpu
from ._compile import KernelCompileError
from ._variants import HEAD_DIMS, Backend
from .block_max_plan import BlockMaxPlan
from .calibration import Calibrator
from .device_thresholds import DeviceThresholds
from .ops import attention, block_max_scores, clear_plan_cache
from .plan import AttentionPlan
from .thresholds import Thresholds
from .varlen import attention_varlen

__version__ = "0.1.0"
__all__ = [
    "AttentionPlan",
    "BLOCK_M",
    "Backend",
    "BlockMaxPlan",
    "BLOCK_N",
    "Calibrator",
    "DeviceThresholds",
    "HEAD_DIMS",
    "KernelCompileError",
    "Thresholds",
    "attention",
    "attention_varlen",
    "block_max_scores",
    "clear_plan_cache",
    "has_gpu",
]
