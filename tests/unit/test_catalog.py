import pytest

from canvas import catalog


def test_unlearncanvas_50_label_order_matches_reference():
    uc = catalog.get("unlearncanvas-50")
    assert len(uc.themes) == 51 and len(uc.styles) == 50 and len(uc.objects) == 20
    assert uc.style_label("Seed_Images") == 38
    assert uc.themes[0] == "Abstractionism" and uc.themes[50] == "Winter"
    assert uc.style_label("Van_Gogh") == 45 and uc.object_label("Waterfalls") == 19
    assert "Seed_Images" not in uc.styles


def test_unlearncanvas_60_has_all_styles_and_photo():
    uc = catalog.get("unlearncanvas-60")
    assert len(uc.themes) == 61 and "Pointillism" in uc.themes


def test_prompt_spelling():
    uc = catalog.get("unlearncanvas-50")
    assert uc.prompt("Van_Gogh", "Cats") == "A Cats image in Van Gogh style."
    assert uc.prompt("Seed_Images", "Dogs") == "A Dogs image in Photo style."


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="'Nope' is not a theme"):
        catalog.get("unlearncanvas-50").prompt("Nope", "Cats")
    with pytest.raises(ValueError, match="unknown catalog 'x'; accepted"):
        catalog.get("x")
