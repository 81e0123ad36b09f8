"""Kept for the modules that still import from here (test_properties.py): the backbone lists and fixtures now live in
tests/conftest.py (`ALL_BACKBONES`, `BACKBONE_OVERRIDES`, `all_base_dirs`, `all_vedas_dirs`)."""

from conftest import ALL_BACKBONES, BACKBONE_OVERRIDES
from conftest import BACKBONES as CONFTEST_BACKBONES

BACKBONES = ALL_BACKBONES
# the conversion settings of the backbones beyond conftest's `BACKBONES` (their crop sides: Qwen3-VL 32-pixel cells,
# Chameleon 4-pixel VQ codes)
EXTRA_OVERRIDES = {b: o for b, o in BACKBONE_OVERRIDES.items() if b not in CONFTEST_BACKBONES}
