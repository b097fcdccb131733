"""bsfa_reference: the exact NumPy definition of Block-Sparse FlashAttention (BSFA).

Everything here is float64 NumPy/SciPy, importable without CuPy or a GPU. The GPU package
``bsfa_cupy`` is tested against these functions.
"""
from .attention import attention, block_max_scores, gate
from .calibration import Calibrator, sample_thresholds
from .dropped_mass import dropped_mass, layer_k_for_mass
from .merge import merge_partials
from .tiles import BLOCK_M, BLOCK_N, diagonal_tiles, tile_positions, valid_mask
from .varlen import attention_varlen

__all__ = [
    "BLOCK_M",
    "BLOCK_N",
    "Calibrator",
    "attention",
    "attention_varlen",
    "block_max_scores",
    "diagonal_tiles",
    "dropped_mass",
    "gate",
    "layer_k_for_mass",
    "merge_partials",
    "sample_thresholds",
    "tile_positions",
    "valid_mask",
]
