"""Augmentation for cached feature maps: draws, input-space ops, their feature-space
counterparts ``T_a``, cached variants and SACA composition (docs/augmentation.md).

Modules, each one concept: :mod:`.draw` (what is drawn, deterministic per sample),
:mod:`.input_ops` (torch, on images), :mod:`.feature_ops` (``T_a`` on maps),
:mod:`.variants` (names, defaults, nearest), :mod:`.saca` (composition, modes),
:mod:`.batch` (the same, vectorised over a batch: what the Dataset runs).
"""

from .draw import IDENTITY, AugDraw, AugFamily, DrawBatch, draw_for, draw_uniforms
from .errors import AugmentationError, SensitivityError, StrideError, VariantNameError
from .feature_ops import apply_feature, feature_offset, infer_stride
from .input_ops import apply_input
from .saca import AUGMENT_MODES, AugmentMode, augment_map, saca_compose
from .variants import (
    IDENTITY_NAME,
    default_variants,
    nearest_variant,
    parse_variant,
    residual_draw,
    variant_name,
)

__all__ = [
    "AUGMENT_MODES",
    "IDENTITY",
    "IDENTITY_NAME",
    "AugDraw",
    "AugFamily",
    "AugmentMode",
    "AugmentationError",
    "DrawBatch",
    "SensitivityError",
    "StrideError",
    "VariantNameError",
    "apply_feature",
    "apply_input",
    "augment_map",
    "default_variants",
    "draw_for",
    "draw_uniforms",
    "feature_offset",
    "infer_stride",
    "nearest_variant",
    "parse_variant",
    "residual_draw",
    "saca_compose",
    "variant_name",
]
