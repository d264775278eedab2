"""Fixtures shared by the unit tests of the data-driven methods (SalUn, EraseDiff, Scissorhands)."""

import pytest

from tests.unit.helpers import write_images


@pytest.fixture
def image_sets(tmp_path):
    """Forget images (3, Van_Gogh/Cats) and retain images (2, Monet/Dogs) in the <Style>/<Object>/ layout."""
    write_images(tmp_path / "forget" / "Van_Gogh" / "Cats", 3)
    write_images(tmp_path / "retain" / "Monet" / "Dogs", 2, seed=10)
    return tmp_path / "forget", tmp_path / "retain"
