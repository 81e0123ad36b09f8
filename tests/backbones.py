"""Every backbone the equivalence and property tests run on, and the tiny checkpoints of the ones conftest.py does
not build (Qwen3-VL).

A test module that runs over all backbones imports `BACKBONES` and the `all_base_dirs` / `all_vedas_dirs` fixtures
from here: conftest's `base_dirs` / `vedas_dirs` with the extra backbones added (they keep their own names, so that
conftest's `vedas_dirs`, which requests `base_dirs`, still converts only its own backbones). The extra checkpoints
are built once per session, whichever module asks first.
"""

import pytest

from conftest import BACKBONES as CONFTEST_BACKBONES
from conftest import TEST_OVERRIDES, convert_base
from vedas_trainer.tiny_base import build_tiny_base


# backbone -> its conversion settings in the tests. Qwen3-VL cuts 16-pixel patches, so its merged cell is 32 pixels
# and the crop side must be a multiple of 32 (conftest's 56 is two Qwen2-VL cells of 28).
EXTRA_OVERRIDES = {"qwen3_vl": {**TEST_OVERRIDES, "crop_resolution": 64}}
BACKBONES = (*CONFTEST_BACKBONES, *EXTRA_OVERRIDES)
_built = {}  # "base" / "vedas" -> {backbone: folder}, filled once per session


def _extra_dirs(tmp_path_factory) -> dict:
    if not _built:
        root = tmp_path_factory.mktemp("extra_backbones")
        _built["base"], _built["vedas"] = {}, {}
        for backbone, overrides in EXTRA_OVERRIDES.items():
            build_tiny_base(backbone, str(root / "base" / backbone), seed=0)
            convert_base(root / "base" / backbone, root / "vedas" / backbone, overrides=overrides)
            _built["base"][backbone] = root / "base" / backbone
            _built["vedas"][backbone] = root / "vedas" / backbone
    return _built


@pytest.fixture(scope="session")
def all_base_dirs(base_dirs, tmp_path_factory):
    """backbone -> folder of a tiny base checkpoint, for every backbone in `BACKBONES`."""
    return {**base_dirs, **_extra_dirs(tmp_path_factory)["base"]}


@pytest.fixture(scope="session")
def all_vedas_dirs(vedas_dirs, tmp_path_factory):
    """backbone -> folder of the converted (untrained) Vedas checkpoint, for every backbone in `BACKBONES`."""
    return {**vedas_dirs, **_extra_dirs(tmp_path_factory)["vedas"]}
