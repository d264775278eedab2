"""Image helpers of data-driven methods: file discovery, latents, generation cache."""

import pytest
import torch
from PIL import Image

from erase.images import encode_latents, generate_images, image_files, image_size, load_images, noised
from tests.unit.helpers import fresh_pipe


def test_image_files_from_folder_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/2.jpg", "a/1.png", "notes.txt"):
        path = tmp_path / name
        Image.new("RGB", (8, 8)).save(path) if name.endswith(("jpg", "png")) else path.write_text("x")
    assert [p.name for p in image_files(tmp_path)] == ["1.png", "2.jpg"]
    assert load_images(tmp_path, 16).shape == (2, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_files(tmp_path / "empty")


def test_generation_cache_reuses_images(tmp_path, monkeypatch):
    pipe = fresh_pipe()
    first = generate_images(pipe, ["a cat", "a dog"], [1, 2], steps=2, guidance=3.0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.png"))) == 2
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("cached images were regenerated"))
    again = generate_images(pipe, ["a cat", "a dog"], [1, 2], steps=2, guidance=3.0, cache_dir=tmp_path)
    assert [list(a.getdata()) for a in again] == [list(f.getdata()) for f in first]


def test_latents_and_noising_shapes():
    pipe = fresh_pipe()
    latents = encode_latents(pipe.vae, torch.zeros(3, 3, image_size(pipe), image_size(pipe)))
    assert latents.shape == (3, 4, 8, 8)
    x_t, t, noise = noised(pipe.scheduler, latents, torch.Generator().manual_seed(0), t_range=(10, 20))
    assert x_t.shape == latents.shape and ((t >= 10) & (t < 20)).all() and noise.shape == latents.shape
