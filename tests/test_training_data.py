"""Image folders, captions, bad files, aspect buckets, latent/text caches, resumable batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_training_helpers import make_shapes_dataset

from snapgen_app.errors import TrainingError, UsageError
from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset
from training_tools import data


def _autoencoder() -> SnapGenAutoencoder:
    torch.manual_seed(0)
    return SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny")).eval()


def _text(captions: list[str]) -> dict[str, torch.Tensor]:
    # A stand-in for the frozen encoders (not our code under test here): length-based features.
    lengths = torch.tensor([[float(len(c))] for c in captions])
    return {"tokens.0": lengths[:, None, :].clone(), "pooled.0": lengths}


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist"):
        data.scan_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        data.scan_folder(tmp_path / "empty")


def test_folder_of_non_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(TrainingError, match="no images") as info:
        data.scan_folder(tmp_path)
    assert ".png" in str(info.value)


def test_missing_captions_use_the_file_name_and_are_counted(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path, per_class=1)
    (tmp_path / "red_circle_0.txt").unlink()
    report = data.scan_folder(tmp_path)
    assert report.captions_from_filename == 1
    item = next(i for i in report.items if i.path.endswith("red_circle_0.png"))
    assert (item.caption, item.caption_source) == ("red circle 0", "filename")


def test_metadata_jsonl_wins_and_bad_lines_are_named(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path, per_class=1)
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "blue_square_0.png", "text": "azure box"}) + "\n"
    )
    report = data.scan_folder(tmp_path)
    item = next(i for i in report.items if i.path.endswith("blue_square_0.png"))
    assert (item.caption, item.caption_source) == ("azure box", "metadata")
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(UsageError, match="line 1"):
        data.scan_folder(tmp_path)


def test_bad_images_are_skipped_and_counted_in_the_cache(tmp_path: Path) -> None:
    folder = make_shapes_dataset(tmp_path / "d", per_class=1)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "broken.txt").write_text("a broken picture")
    report = data.scan_folder(folder)
    cache = data.build_cache(
        report,
        tmp_path / "cache",
        resolution=32,
        buckets=False,
        bucket_step=32,
        encode_images=_autoencoder().encode,
        encode_text=_text,
        encoder_id="x",
    )
    assert len(cache) == 8
    assert cache.report["skipped_images"] == 1
    assert "broken.png" in cache.report["skipped_examples"][0]["file"]
    assert cache.latents[0].shape == (16, 4, 4)
    # Reused from disk on the second call (same fingerprint), same values.
    again = data.build_cache(
        report,
        tmp_path / "cache",
        resolution=32,
        buckets=False,
        bucket_step=32,
        encode_images=lambda x: (_ for _ in ()).throw(AssertionError("re-encoded")),
        encode_text=_text,
        encoder_id="x",
    )
    assert torch.equal(again.latents[3], cache.latents[3])


def test_only_unreadable_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"garbage")
    report = data.scan_folder(tmp_path)
    with pytest.raises(TrainingError, match="could be read"):
        data.build_cache(
            report,
            tmp_path / "c",
            resolution=32,
            buckets=False,
            bucket_step=32,
            encode_images=_autoencoder().encode,
            encode_text=_text,
            encoder_id="x",
        )


def test_pictures_load_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF orientation tag loads upright (and its bucket
    size is the shown one); a transparent PNG (transparent pixels stored as black) loads on white;
    a 16-bit grey PNG keeps its greys instead of clipping to white."""
    import numpy as np

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide, 20 high; shown turned a quarter clockwise: 20 wide, 40 high
    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 20))  # red on the stored left half: the shown top half
    photo.save(tmp_path / "photo.png", exif=exif.tobytes())
    assert data.image_size(str(tmp_path / "photo.png")) == (40, 20)
    upright = data.load_image(str(tmp_path / "photo.png"), (40, 20))
    assert upright[0, :16].mean() > 0.9 and upright[2, :16].mean() < -0.9  # red on top
    assert upright[0, 24:].mean() < -0.9 and upright[2, 24:].mean() > 0.9  # blue below

    sticker = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    sticker.paste((0, 160, 0, 255), (4, 4, 12, 12))
    sticker.save(tmp_path / "sticker.png")
    flat = data.load_image(str(tmp_path / "sticker.png"), (16, 16))
    assert torch.allclose(flat[:, 0, 0], torch.ones(3))  # the transparent corner is white
    assert flat[1, 8, 8] > 0.2 and flat[0, 8, 8] < -0.9  # the green square stays green

    grey = np.full((16, 16), 30000, dtype=np.uint16)  # 46 % grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    loaded = data.load_image(str(tmp_path / "scan.png"), (16, 16))
    assert loaded.mean().item() == pytest.approx(117 / 127.5 - 1.0, abs=0.01)  # 30000 // 256 = 117
    from snapgen_app.images import rgb_image

    big_endian = Image.frombytes("I;16B", (16, 16), np.full((16, 16), 30000, dtype=">u2").tobytes())
    assert np.asarray(rgb_image(big_endian)).mean() == pytest.approx(117, abs=1)  # a TIFF scan's mode


def test_aspect_buckets_group_batches_by_shape(tmp_path: Path) -> None:
    buckets = data.aspect_buckets(64, 32)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
    assert all(abs(h * w - 64 * 64) <= 64 * 64 * 0.5 for h, w in buckets)
    assert (
        data.nearest_bucket(100, 200, buckets) == (32, 96) or data.nearest_bucket(100, 200, buckets)[1] > 64
    )
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (128, 64), (200, 0, 0)).save(folder / f"wide{i}.png")
        Image.new("RGB", (64, 64), (0, 0, 200)).save(folder / f"square{i}.png")
    cache = data.build_cache(
        data.scan_folder(folder),
        tmp_path / "c",
        resolution=64,
        buckets=True,
        bucket_step=32,
        encode_images=_autoencoder().encode,
        encode_text=_text,
        encoder_id="x",
    )
    shapes = {tuple(latent.shape) for latent in cache.latents}
    assert len(shapes) == 2
    for batch in data.epoch_batches(cache, 2, seed=0, epoch=0):
        assert len({tuple(cache.latents[i].shape) for i in batch}) == 1


def test_batch_stream_is_deterministic_resumable_and_split_by_rank(tmp_path: Path) -> None:
    folder = make_shapes_dataset(tmp_path / "d", per_class=2)
    cache = data.build_cache(
        data.scan_folder(folder),
        tmp_path / "c",
        resolution=32,
        buckets=False,
        bucket_step=32,
        encode_images=_autoencoder().encode,
        encode_text=_text,
        encoder_id="x",
    )
    pos = data.DataPosition()
    stream = data.batch_stream(cache, 4, 7, pos)
    first = [next(stream) for _ in range(6)]  # crosses an epoch boundary (4 batches per epoch)
    assert (pos.epoch, pos.batch) == (1, 2)
    resumed = data.batch_stream(cache, 4, 7, data.DataPosition(epoch=0, batch=3))
    assert [next(resumed) for _ in range(3)] == first[3:]
    r0 = data.batch_stream(cache, 4, 7, data.DataPosition(), rank=0, world=2)
    r1 = data.batch_stream(cache, 4, 7, data.DataPosition(), rank=1, world=2)
    a, b = next(r0), next(r1)
    assert not set(a) & set(b)
    batch = data.collate(cache, a)
    assert batch["latents"].shape == (4, 16, 4, 4) and batch["text.pooled.0"].shape == (4, 1)


def test_a_moved_dataset_keeps_its_cache_and_a_changed_file_does_not(tmp_path: Path) -> None:
    import shutil

    folder = make_shapes_dataset(tmp_path / "run-a" / "dataset", per_class=1)
    settings = {"resolution": 32}
    key = data.fingerprint(data.scan_folder(folder).items, settings)
    moved = shutil.copytree(folder, tmp_path / "run-b" / "dataset")  # copy2 keeps mtimes
    assert data.fingerprint(data.scan_folder(moved).items, settings) == key
    (moved / "red_circle_0.txt").write_text("a different caption")
    assert data.fingerprint(data.scan_folder(moved).items, settings) != key
    assert data.fingerprint(data.scan_folder(folder).items, {"resolution": 64}) != key
