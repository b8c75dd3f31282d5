"""Real-ISR recipe data: sources and their order, crops, flips, determinism, DataLoader workers, image modes, test
pairs, and the errors for bad data. Images are skimage photos (offline) resized to 200x160 (width x height)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_isr import data as rd
from real_isr.data import HRImageDataset, PairedImageDataset, collate, load_image, save_image, worker_init_fn
from real_isr.degradations import DegradationParams, RealESRGANDegradation
from torch.utils.data import DataLoader

CROP, SCALE = 64, 4
SIZE = (200, 160)  # PIL (width, height)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in a DataLoader worker (so 0 and 2 workers compute with the same thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _photo(name: str) -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(getattr(skdata, name)()).resize(SIZE, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """``train/`` (nested folders, PNG + JPEG, a hidden fork file, a non-image) and ``lists/train.txt``."""
    root = tmp_path_factory.mktemp("real_isr_data")
    train = root / "train"
    (train / "b").mkdir(parents=True)
    (train / "a").mkdir()
    (train / ".hidden").mkdir()
    _photo("astronaut").save(train / "a" / "astronaut.png")
    _photo("coffee").save(train / "b" / "coffee.JPG", quality=95)
    _photo("chelsea").save(train / "chelsea.png")
    _photo("rocket").save(train / "rocket.jpeg", quality=95)
    (train / "._astronaut.png").write_bytes(b"macOS resource fork, not an image")
    _photo("rocket").save(train / ".hidden" / "skipped.png")
    (train / "notes.txt").write_text("not an image\n")
    lists = root / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(
        "# HR training images\n"
        "\n"
        "../train/chelsea.png\n"
        "   ../train/a/astronaut.png   \n"
        "  # indented comment\n"
        f"{train / 'rocket.jpeg'}\n"
        "../train/chelsea.png\n"
    )
    return {"root": root, "train": train, "list": lists / "train.txt"}


def make_dataset(tree, **kwargs) -> HRImageDataset:
    kwargs = {"crop_size": CROP, "scale": SCALE, **kwargs}
    sources = kwargs.pop("sources") if "sources" in kwargs else tree["train"]
    return HRImageDataset(sources, **kwargs)


def crop_of(item: dict) -> torch.Tensor:
    top, left = item["crop"]
    return load_image(item["path"])[:, top : top + CROP, left : left + CROP]


def assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------------------------------------------ sources


def test_folder_is_listed_recursively_sorted_by_relative_path_skipping_hidden_and_non_images(tree):
    paths = rd.collect_images(tree["train"])
    rel = [Path(p).relative_to(tree["train"]).as_posix() for p in paths]
    assert rel == ["a/astronaut.png", "b/coffee.JPG", "chelsea.png", "rocket.jpeg"]
    assert all(os.path.isabs(p) for p in paths)


def test_list_file_keeps_file_order_resolves_relative_paths_skips_comments_and_duplicates(tree):
    rel = [Path(p).relative_to(tree["train"]).as_posix() for p in rd.collect_images(tree["list"])]
    assert rel == ["chelsea.png", "a/astronaut.png", "rocket.jpeg"]
    assert len(rd.read_image_list(tree["list"])) == 4  # the raw list keeps the duplicate line


def test_sources_concatenate_in_order_and_a_repeated_file_keeps_its_first_position(tree):
    train = tree["train"]
    rel = lambda paths: [Path(p).relative_to(train).as_posix() for p in paths]  # noqa: E731
    assert rel(rd.collect_images([tree["list"], train])) == [
        "chelsea.png", "a/astronaut.png", "rocket.jpeg", "b/coffee.JPG"
    ]
    assert rel(rd.collect_images([train / "rocket.jpeg", train, tree["list"]])) == [
        "rocket.jpeg", "a/astronaut.png", "b/coffee.JPG", "chelsea.png"
    ]
    assert rel(make_dataset(tree, sources=[train, tree["list"]]).paths) == rel(rd.collect_images(train))


@pytest.mark.parametrize(
    "setup, error, words",
    [
        (lambda root: root / "missing", FileNotFoundError, ["not found", "missing"]),
        (lambda root: (root / "empty").mkdir() or root / "empty", ValueError, ["no image files", "empty"]),
        (lambda root: _write(root / "bad.txt", "# nothing\n\n"), ValueError, ["lists no files", "bad.txt"]),
        (lambda root: _write(root / "gone.txt", "a.png\nnope.png\n"), FileNotFoundError, ["line 2: nope.png"]),
        (lambda root: _write(root / "x.csv", "a.png\n"), ValueError, ["neither a folder", "x.csv"]),
    ],
    ids=["missing folder", "empty folder", "empty list", "missing list entry", "unknown source"],
)
def test_bad_sources_raise_clear_errors(tmp_path, setup, error, words):
    _photo("coffee").save(tmp_path / "a.png")
    with pytest.raises(error) as info:
        make_dataset({}, sources=setup(tmp_path))
    for word in words:
        assert word in str(info.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ items


@pytest.mark.parametrize("resize_back", [True, False])
def test_items_have_the_documented_shapes_ranges_and_plain_records(tree, resize_back):
    dataset = make_dataset(tree, resize_back=resize_back)
    lr_side = CROP if resize_back else CROP // SCALE
    assert len(dataset) == 4
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["hr"].shape == (3, CROP, CROP) and item["hr"].dtype == torch.float32
        assert item["lr"].shape == (3, lr_side, lr_side) and item["lr"].dtype == torch.float32
        for key in ("hr", "lr"):
            assert 0.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
        torch.testing.assert_close(item["lr"] * 255, (item["lr"] * 255).round(), atol=1e-4, rtol=0)
        assert item["path"] == dataset.paths[i] and item["index"] == i and item["epoch"] == 0
        assert {"stage1", "stage2", "final"} <= item["degradation"].keys()
        json.dumps(item["degradation"])  # plain Python values only
        top, left = item["crop"]
        assert 0 <= top <= SIZE[1] - CROP and 0 <= left <= SIZE[0] - CROP


def test_logged_seed_reproduces_lr_with_the_degradation_alone(tree):
    dataset = make_dataset(tree, degradation="realesrgan")
    item = dataset[1]
    lr, record = RealESRGANDegradation("realesrgan", resize_back=True)(item["hr"][None], item["seed"])
    assert torch.equal(lr[0], item["lr"]) and record.sample(0) == item["degradation"]


def test_same_seed_epoch_index_gives_the_same_pair_and_epochs_differ(tree):
    dataset = make_dataset(tree, seed=3)
    first = [dataset[i] for i in range(len(dataset))]
    again = make_dataset(tree, seed=3)
    for i in reversed(range(len(dataset))):  # order and a fresh instance do not matter
        assert_items_equal(again[i], first[i])
    dataset.set_epoch(1)
    later = [dataset[i] for i in range(len(dataset))]
    for a, b in zip(first, later, strict=True):
        assert a["path"] == b["path"] and b["epoch"] == 1
        assert a["seed"] != b["seed"] and not torch.equal(a["lr"], b["lr"])
    assert sum(a["crop"] != b["crop"] for a, b in zip(first, later, strict=True)) >= 3
    assert_items_equal(dataset.get_item(2, epoch=0), first[2])
    other_seed = make_dataset(tree, seed=4)
    assert not torch.equal(other_seed[0]["lr"], first[0]["lr"])
    assert_items_equal(dataset[-1], dataset[3])


def test_crop_is_taken_from_the_stated_corner_and_flips_follow_the_probability(tree):
    kept = make_dataset(tree, degradation=None, flip=False)
    flipped = make_dataset(tree, degradation=None, flip=1.0)
    for i in range(len(kept)):
        a, b = kept[i], flipped[i]
        assert not a["flip"] and b["flip"] and a["crop"] == b["crop"]
        assert torch.equal(a["hr"], crop_of(a))
        assert torch.equal(b["hr"], crop_of(b).flip(-1))
    halves = make_dataset(tree, degradation=None, seed=1)
    flips = [halves.get_item(i, epoch=e)["flip"] for e in range(8) for i in range(len(halves))]
    assert 6 <= sum(flips) <= 26  # 32 fair coins


def test_bicubic_lr_without_degradation(tree):
    item = make_dataset(tree, degradation=None, resize_back=False, flip=False)[0]
    expected = torch.nn.functional.interpolate(item["hr"][None], scale_factor=1 / SCALE, mode="bicubic", antialias=True)
    torch.testing.assert_close(item["lr"], expected[0].clamp(0, 1), atol=0.5 / 255 + 1e-6, rtol=0)
    assert item["degradation"] == {"kind": "bicubic"}


def test_degradation_arguments(tree):
    mild = make_dataset(tree, degradation="mild")
    assert mild.degradation.params == DegradationParams.preset("mild") and mild.degradation.resize_back
    given = RealESRGANDegradation(DegradationParams(), resize_back=False)
    dataset = make_dataset(tree, degradation=given, resize_back=True)
    assert dataset.degradation.resize_back and not given.resize_back  # copied; the dataset's resize_back wins
    assert make_dataset(tree, degradation=DegradationParams())[0]["lr"].shape == (3, CROP, CROP)
    with pytest.raises(ValueError, match="scale 2 differs"):
        make_dataset(tree, scale=2, degradation="realesrgan")
    with pytest.raises(TypeError, match="degradation must be"):
        make_dataset(tree, degradation=42)
    with pytest.raises(ValueError, match="unknown degradation preset"):
        make_dataset(tree, degradation="nope")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 66}, "multiple of scale"),
        ({"crop_size": 0}, "crop_size must be a positive integer"),
        ({"flip": 1.5}, "flip must be"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_arguments(tree, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tree, **kwargs)


def test_index_and_epoch_checks(tree):
    dataset = make_dataset(tree, degradation=None)
    with pytest.raises(IndexError, match="out of range"):
        dataset[4]
    with pytest.raises(ValueError, match="epoch must be"):
        dataset.set_epoch(-1)


# ------------------------------------------------------------------------------------------------ DataLoader


def test_two_workers_give_the_same_batches_as_the_main_process(tree):
    dataset = make_dataset(tree, seed=7)
    dataset.set_epoch(2)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate,
                            worker_init_fn=worker_init_fn if workers else None)
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 2
    for a, b in zip(main, workers, strict=True):
        assert a["hr"].shape == (2, 3, CROP, CROP) and a["lr"].shape == (2, 3, CROP, CROP)
        assert_items_equal(a, b)
        assert isinstance(a["path"], list) and isinstance(a["degradation"], list) and a["epoch"] == [2, 2]
    assert torch.equal(main[1]["lr"][0], dataset[2]["lr"])


def test_persistent_workers_follow_set_epoch(tree):
    dataset = make_dataset(tree, seed=5, degradation=None)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate,
                        worker_init_fn=worker_init_fn)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        (batch,) = list(loader)
        assert batch["epoch"] == [epoch] * 4
        expected = collate([dataset.get_item(i, epoch) for i in range(4)])
        assert_items_equal(batch, expected)


def test_collate_stacks_tensors_lists_the_rest_and_refuses_mixed_sizes():
    items = [{"x": torch.zeros(3, 4), "name": "a"}, {"x": torch.ones(3, 4), "name": "b"}]
    batch = collate(items)
    assert batch["x"].shape == (2, 3, 4) and batch["name"] == ["a", "b"]
    with pytest.raises(ValueError, match="batch_size=1"):
        collate([{"x": torch.zeros(3, 4)}, {"x": torch.zeros(3, 5)}])


def test_worker_init_fn_uses_one_thread():
    torch.set_num_threads(2)
    worker_init_fn(0)
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------------------------ image modes


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): ``pixels`` ``(h, w, 3)`` uint16."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_grey_bilevel_and_palette_images(tmp_path):
    rgb = np.asarray(_photo("chelsea"))
    grey = Image.fromarray(rgb).convert("L")
    grey.save(tmp_path / "grey.png")
    x = load_image(tmp_path / "grey.png")
    assert x.shape == (3, SIZE[1], SIZE[0])
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.equal(x[0], torch.from_numpy(np.array(grey)).float() / 255)
    grey.convert("1").save(tmp_path / "bits.png")
    assert set(load_image(tmp_path / "bits.png").unique().tolist()) <= {0.0, 1.0}
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(tmp_path / "palette.png")
    expected = torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(load_image(tmp_path / "palette.png"), expected)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :5, 3] = 255  # left half opaque
    rgba[:, 5:, 3] = 0  # right half transparent (stored colour ignored)
    rgba[0, 0, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png")
    torch.testing.assert_close(x[:, 1, 1], torch.tensor([10, 200, 30]) / 255.0)
    assert torch.equal(x[:, :, 5:], torch.ones(3, 8, 5))
    a = 128 / 255
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0 * a + (1 - a))
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png")[:, :, 5:], torch.ones(3, 8, 5))
    palette = Image.fromarray((np.arange(10)[None].repeat(8, axis=0) % 2).astype(np.uint8), "P")
    palette.putpalette([10, 200, 30, 40, 50, 60])  # index 0 -> green (transparent), 1 -> grey-blue
    palette.save(tmp_path / "ptrans.png", transparency=0)
    x = load_image(tmp_path / "ptrans.png")
    assert torch.equal(x[:, :, 0::2], torch.ones(3, 8, 5))
    assert torch.equal(x[:, 0, 1], torch.tensor([40, 50, 60]) / 255.0)
    palette.save(tmp_path / "popaque.png")
    assert torch.equal(load_image(tmp_path / "popaque.png")[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)


def test_sixteen_bit_images_are_scaled_by_65535(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    x = load_image(tmp_path / "grey16.png")
    torch.testing.assert_close(x[1], torch.from_numpy(values.astype(np.float32) / 65535.0))
    assert torch.equal(x[0], x[2])
    pixels = np.random.default_rng(0).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(pixels))
    y = load_image(tmp_path / "rgb16.png")  # Pillow keeps the top byte: correct scale, 8-bit precision
    truth = torch.from_numpy(pixels.astype(np.float32) / 65535).permute(2, 0, 1)
    assert float((y - truth).abs().max()) < 1 / 255 + 1e-6


def test_save_then_load_round_trips_to_eight_bits(tmp_path):
    x = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0))
    path = save_image(x, tmp_path / "deep" / "out.png")
    assert torch.equal(load_image(path), (x * 255).round() / 255)
    save_image(x[None], tmp_path / "batch.png")
    save_image(x[0], tmp_path / "grey.png")
    assert torch.equal(load_image(tmp_path / "grey.png")[1], (x[0] * 255).round() / 255)
    save_image(x, tmp_path / "out.jpg")
    assert float((load_image(tmp_path / "out.jpg") - x).abs().mean()) < 0.25
    with pytest.raises(ValueError, match=r"got \(2, 3, 12, 10\)"):
        save_image(torch.rand(2, 3, 12, 10), tmp_path / "two.png")


def test_unsupported_modes_and_unreadable_files_are_named(tmp_path):
    Image.new("CMYK", (80, 80), (0, 50, 100, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.zeros((80, 80), np.float32)).save(tmp_path / "float.tif")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name, words in [("cmyk.jpg", ["'CMYK'", "unsupported image mode"]), ("float.tif", ["'F'"]),
                        ("broken.png", ["cannot read image"])]:
        with pytest.raises(ValueError) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and all(w in str(info.value) for w in words)
        dataset = HRImageDataset(tmp_path / name, crop_size=CROP, degradation=None)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            dataset[0]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ValueError) as info:
        HRImageDataset(tmp_path, crop_size=CROP, degradation=None).validate()
    assert "3 unusable" in str(info.value) and all(n in str(info.value) for n in ("cmyk", "float", "broken"))


def test_too_small_images_are_refused_or_enlarged(tmp_path):
    _photo("rocket").resize((90, 60)).save(tmp_path / "small.png")
    dataset = HRImageDataset(tmp_path, crop_size=CROP, degradation=None)
    with pytest.raises(ValueError, match=r"small\.png is 90x60 \(width x height\), smaller than crop_size 64"):
        dataset[0]
    with pytest.raises(ValueError, match="small.png is 90x60"):
        dataset.validate()
    enlarged = HRImageDataset(tmp_path, crop_size=CROP, upscale_small=True)
    item = enlarged[0]
    assert item["hr"].shape == (3, CROP, CROP) and item["lr"].shape == (3, CROP, CROP)
    assert item["crop"][0] == 0 and 0 <= item["crop"][1] <= 96 - CROP
    enlarged.validate()


def test_grey_and_sixteen_bit_files_train_like_rgb(tmp_path):
    _photo("coffee").convert("L").save(tmp_path / "grey.png")
    grey16 = (np.asarray(_photo("coffee").convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    dataset = HRImageDataset(tmp_path, crop_size=CROP, degradation=None, flip=False)
    for item in (dataset[0], dataset[1]):
        assert item["hr"].shape == (3, CROP, CROP)
        assert torch.equal(item["hr"], crop_of(item))
    assert dataset.validate() is None


# ------------------------------------------------------------------------------------------------ paired test data


@pytest.fixture()
def pairs(tmp_path) -> dict[str, Path]:
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    for name in ("coffee", "astronaut", "chelsea"):
        hr = _photo(name)
        hr.save(hr_dir / f"{name}.png")
        hr.resize((SIZE[0] // SCALE, SIZE[1] // SCALE), Image.Resampling.BICUBIC).save(lr_dir / f"{name}.jpg")
    return {"lr": lr_dir, "hr": hr_dir, "root": tmp_path}


def test_paired_dataset_matches_by_stem(pairs):
    dataset = PairedImageDataset(pairs["lr"], pairs["hr"], scale=SCALE)
    assert dataset.names == ["astronaut", "chelsea", "coffee"]
    item = dataset[2]
    assert item["name"] == "coffee" and item["lr_path"].endswith("coffee.jpg") and item["hr_path"].endswith(".png")
    assert item["lr"].shape == (3, 40, 50) and item["hr"].shape == (3, 160, 200)
    batch = collate([dataset[0], dataset[1]])
    assert batch["hr"].shape == (2, 3, 160, 200) and batch["name"] == ["astronaut", "chelsea"]
    lr_only = PairedImageDataset(pairs["lr"])
    assert len(lr_only) == 3 and set(lr_only[0]) == {"lr", "name", "lr_path"}


def test_paired_dataset_suffixes_share_one_folder(pairs):
    folder = pairs["root"] / "realsr"
    folder.mkdir()
    for name in ("Canon_001", "Canon_002"):
        save_image(torch.rand(3, 8, 12), folder / f"{name}_HR.png")
        save_image(torch.rand(3, 2, 3), folder / f"{name}_LR4.png")
    dataset = PairedImageDataset(folder, folder, scale=4, lr_suffix="_LR4", hr_suffix="_HR")
    assert dataset.names == ["Canon_001", "Canon_002"] and dataset[1]["hr"].shape == (3, 8, 12)


def test_paired_dataset_errors(pairs):
    lr_dir, hr_dir = pairs["lr"], pairs["hr"]
    _photo("rocket").save(hr_dir / "rocket.png")
    _photo("rocket").resize((50, 40)).save(lr_dir / "extra.png")
    with pytest.raises(ValueError) as info:
        PairedImageDataset(lr_dir, hr_dir)
    assert "LR without HR: extra" in str(info.value) and "HR without LR: rocket" in str(info.value)
    (hr_dir / "rocket.png").unlink()
    (lr_dir / "extra.png").unlink()
    _photo("coffee").resize((100, 80)).save(hr_dir / "coffee.png")
    with pytest.raises(ValueError, match=r"coffee\.png is 100x80 but .*coffee\.jpg is 50x40 .* should be 200x160"):
        PairedImageDataset(lr_dir, hr_dir, scale=SCALE)
    _photo("coffee").save(hr_dir / "coffee.jpg")
    with pytest.raises(ValueError, match="several files share a name: coffee: coffee.jpg, coffee.png"):
        PairedImageDataset(lr_dir, hr_dir)
    with pytest.raises(FileNotFoundError, match="HR folder not found"):
        PairedImageDataset(lr_dir, pairs["root"] / "nope")
    (pairs["root"] / "void").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        PairedImageDataset(pairs["root"] / "void")
    Image.new("CMYK", (50, 40)).save(lr_dir / "chelsea.jpg")
    with pytest.raises(ValueError, match="'CMYK'"):
        PairedImageDataset(lr_dir)
