"""fer.data: every layout on tiny generated files, every bad input by its message, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fer.data as D
import fer.data.parse
import fer.io
from fer.data import DR_CLASSES, FER_CLASSES, LAYOUTS, DataError, Dataset, load_dataset, main

SIDE = 4  # 4x4 "faces": the parser takes any square size
USAGES = {"train": "Training", "val": "PublicTest", "test": "PrivateTest", "unlabeled": "Unlabeled"}


def pixel_text(img: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in img.ravel())


def make_images(n: int, seed: int, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 1), dtype=np.uint8)


def write_fer(path: Path, rows: list[tuple[str, str, str]], header: str = "emotion,pixels,Usage") -> Path:
    path.write_text(header + "\n" + "".join(f"{e},{p},{u}\n" for e, p, u in rows))
    return path


def fer_rows(labels: dict[str, list[int]], seed: int = 0) -> tuple[list, dict[str, np.ndarray]]:
    """Rows of a FER CSV with the given labels per split, and the images per split."""
    rows, images = [], {}
    for i, (split, ys) in enumerate(labels.items()):
        images[split] = make_images(len(ys), seed + i)
        rows += [(str(y), pixel_text(img), USAGES[split]) for y, img in zip(ys, images[split])]
    return rows, images


LABELS = {"train": [0, 1, 2, 3, 4, 5, 6, 3, 3], "val": [0, 3, 6], "test": [1, 2, 3, 4], "unlabeled": [3, 6]}


def write_split_csv(path: Path, labels: list[int] | None, images: np.ndarray) -> None:
    if labels is None:
        path.write_text("pixels\n" + "".join(pixel_text(img) + "\n" for img in images))
    else:
        path.write_text("emotion,pixels\n" + "".join(f"{y},{pixel_text(img)}\n" for y, img in zip(labels, images)))


def write_dr_folder(root: Path, labels: dict[str, list[int]], classes: list[str] | None = None) -> Path:
    """PNG/JPEG images of assorted sizes and modes, list files, optional classes.txt."""
    modes = ["RGB", "L", "RGBA", "P"]
    rng = np.random.default_rng(0)
    for split, ys in labels.items():
        (root / split).mkdir(parents=True)
        lines = []
        for i, y in enumerate(ys):
            h, w = 10 + 3 * i, 14 + i
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            name = f"img {i}.jpg" if i % 5 == 4 else f"img{i}.png"  # a name with a space, and JPEGs
            Image.fromarray(arr).convert(modes[i % len(modes)]).convert(
                "RGB" if name.endswith(".jpg") else modes[i % len(modes)]).save(root / split / name)
            lines.append(f"{name} {y}")
        if split != "unlabeled":
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def build_fer_csv(tmp: Path) -> tuple[Path, dict]:
    rows, images = fer_rows(LABELS)
    return write_fer(tmp / "fer.csv", rows), images


def build_split_folder(tmp: Path) -> tuple[Path, dict]:
    root = tmp / "splits"
    root.mkdir()
    images = {}
    for i, (split, ys) in enumerate(LABELS.items()):
        images[split] = make_images(len(ys), i)
        write_split_csv(root / f"{split}.csv", None if split == "unlabeled" else ys, images[split])
    return root, images


def build_dr_folder(tmp: Path) -> tuple[Path, dict]:
    return write_dr_folder(tmp / "dr", {s: [y % 5 for y in ys] for s, ys in LABELS.items()}), {}


BUILDERS = {"fer_csv": build_fer_csv, "split_folder": build_split_folder, "dr_folder": build_dr_folder}


# ------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads(layout, tmp_path):
    path, images = BUILDERS[layout](tmp_path)
    assert D.detect_layout(path) == layout
    data = load_dataset(path, load_size=16, cache_dir=tmp_path / "cache")
    assert isinstance(data, Dataset) and data.source == str(path)
    assert set(data.splits) == {"train", "val", "test", "unlabeled"}
    for name, split in data.splits.items():
        assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
        assert split.images.ndim == 4 and len(split.images) == len(LABELS[name])
        if name != "unlabeled":
            assert split.labels.dtype == np.int64
            assert split.labels.tolist() == [y % data.num_classes for y in LABELS[name]]
        if images:
            np.testing.assert_array_equal(split.images, images[name])
    if layout == "dr_folder":
        assert data.image_shape == (16, 16, 3) and data.classes == DR_CLASSES
        assert data.splits["unlabeled"].labels is None
    else:
        assert data.image_shape == (SIDE, SIDE, 1) and data.classes == FER_CLASSES
    assert data.channels == data.image_shape[2]
    np.testing.assert_array_equal(data.class_counts("train"), np.bincount(
        [y % data.num_classes for y in LABELS["train"]], minlength=data.num_classes))


def test_fer_unlabeled_pool_and_held_out_labels(tmp_path):
    rows, _ = fer_rows({"train": [0, 1, 2], "val": [0, 1], "test": [2, 2]})
    pool_truth = write_fer(tmp_path / "a.csv", rows + [("5", pixel_text(make_images(1, 9)[0]), "Unlabeled")])
    data = load_dataset(pool_truth, cache_dir=tmp_path)
    assert data.splits["unlabeled"].labels.tolist() == [5]  # held-out truth, for pseudo-label precision
    # a real FER file: empty emotion (with any Usage) goes to the pool, which then has no labels
    real = write_fer(tmp_path / "b.csv", rows + [("", pixel_text(make_images(1, 9)[0]), "Training"),
                                                 ("", pixel_text(make_images(1, 8)[0]), "Unlabeled")])
    data = load_dataset(real, cache_dir=tmp_path)
    assert len(data.splits["unlabeled"]) == 2 and data.splits["unlabeled"].labels is None
    assert len(data.splits["train"]) == 3
    no_pool = load_dataset(write_fer(tmp_path / "c.csv", rows), cache_dir=tmp_path)
    assert "unlabeled" not in no_pool.splits


VALUES = [0, 1, 9, 10, 99, 100, 199, 200, 249, 250, 255, 7, 42, 128, 64, 3]


@pytest.mark.parametrize("text", [
    "  ".join(map(str, VALUES)),  # double spaces
    " " + " ".join(map(str, VALUES)) + " ",  # leading and trailing spaces
    " ".join(map(str, VALUES)) + " " * 2000,  # far more spaces than digits
    " ".join(f"{v:03d}" for v in VALUES),  # leading zeros
    '"' + " ".join(map(str, VALUES)) + '"',  # a quoted field
])
def test_pixel_text_variants(text, tmp_path):
    rows, _ = fer_rows({"train": [0, 1, 2], "val": [1], "test": [2]}, seed=3)
    path = write_fer(tmp_path / "v.csv", rows + [("3", text, "Training")])
    data = load_dataset(path, cache_dir=tmp_path)
    assert data.splits["train"].images[3].ravel().tolist() == VALUES


def test_crlf_bom_and_spaced_header(tmp_path):
    rows, images = fer_rows({"train": [0, 1, 2], "val": [1], "test": [2]})
    text = "\ufeffemotion, pixels, Usage\r\n" + "".join(f"{e},{p},{u}\r\n" for e, p, u in rows)
    path = tmp_path / "crlf.csv"
    path.write_bytes(text.encode("utf-8"))
    data = load_dataset(path, cache_dir=tmp_path)
    np.testing.assert_array_equal(data.splits["train"].images, images["train"])


def test_icml_column_order(tmp_path):
    """icml_face_data.csv, a common FER2013 copy: `emotion, Usage, pixels` with spaced names."""
    rows, images = fer_rows({"train": [0, 1, 2], "val": [1], "test": [2]})
    path = tmp_path / "icml.csv"
    path.write_text("emotion, Usage, pixels\n" + "".join(f"{e}, {u}, {p}\n" for e, p, u in rows))
    data = load_dataset(path, cache_dir=tmp_path)
    np.testing.assert_array_equal(data.splits["train"].images, images["train"])
    assert data.splits["val"].labels.tolist() == [1]


def test_fully_quoted_csv(tmp_path):
    import csv

    rows, images = fer_rows({"train": [0, 1, 2], "val": [1], "test": [2]})
    path = tmp_path / "quoted.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerows(rows)
    data = load_dataset(path, cache_dir=tmp_path)
    np.testing.assert_array_equal(data.splits["train"].images, images["train"])
    assert data.splits["train"].labels.tolist() == [0, 1, 2]


def test_parser_matches_naive_parse_on_fer_size_rows():
    images = np.random.default_rng(1).integers(0, 256, size=(600, 48 * 48), dtype=np.uint8)
    images[0, :5] = [0, 9, 10, 99, 100]
    rows = [pixel_text(img).encode() for img in images]
    parsed = D.parse_pixel_rows(rows, "x.csv", np.arange(2, 602), workers=2)
    assert parsed.shape == (600, 48, 48, 1) and parsed.flags.c_contiguous
    np.testing.assert_array_equal(parsed.reshape(600, -1), images)


def test_dr_classes_txt_numeric_names_and_jpeg_pool(tmp_path):
    root = write_dr_folder(tmp_path / "dr", {"train": [0, 6, 7], "val": [7], "test": [6]})
    data = load_dataset(root, load_size=8, cache_dir=tmp_path)
    assert data.classes == [str(k) for k in range(8)]  # no classes.txt, labels beyond DR's five grades
    root = write_dr_folder(tmp_path / "dr2", {"train": [0, 1], "val": [1], "test": [0], "unlabeled": [0, 0]},
                           classes=["healthy", "sick"])
    data = load_dataset(root, load_size=8, cache_dir=tmp_path)
    assert data.classes == ["healthy", "sick"] and data.image_shape == (8, 8, 3)
    assert len(data.splits["unlabeled"]) == 2


# ------------------------------------------------------------------------------ bad input

def fer_case(tmp_path: Path, bad: tuple[str, str, str] | None = None, header: str = "emotion,pixels,Usage",
             drop_usage: str | None = None) -> Path:
    """A valid FER CSV with `bad` inserted as data row 3 (file line 4)."""
    rows, _ = fer_rows({"train": [0, 1, 2, 3], "val": [0, 1], "test": [2, 3]})
    if bad is not None:
        rows.insert(2, bad)
    if drop_usage is not None:
        rows = [r for r in rows if r[2] != drop_usage]
    return write_fer(tmp_path / "bad.csv", rows, header)


GOOD = pixel_text(np.arange(SIDE * SIDE))
FER_ERRORS = {  # case: (row inserted as file line 4, expected message)
    "wrong pixel count": (("1", " ".join(["7"] * 15), "Training"),
                          r"bad\.csv: line 4: expected 16 pixel values \(4x4"),
    "non-numeric pixel": (("1", GOOD.replace("5", "x5"), "Training"),
                          r"bad\.csv: line 4: non-numeric pixel value 'x5'"),
    "negative pixel": (("1", GOOD.replace(" 5 ", " -5 "), "Training"),
                       r"line 4: non-numeric pixel value '-5'"),
    "pixel above 255": (("1", GOOD.replace(" 5 ", " 256 "), "Training"),
                        r"bad\.csv: line 4: pixel value 256 outside 0\.\.255"),
    "long pixel": (("1", GOOD.replace(" 5 ", " 1000 "), "Training"),
                   r"line 4: pixel value 1000 outside 0\.\.255"),
    "non-integer label": (("2.5", GOOD, "Training"),
                          r"bad\.csv: line 4: label '2\.5' is not an integer"),
    "label out of range": (("7", GOOD, "Training"),
                           r"bad\.csv: line 4: label 7 outside the class range 0\.\.6"),
    "unknown usage": (("1", GOOD, "Train"),
                      r"bad\.csv: line 4: unknown Usage 'Train' \(expected one of Training"),
}


@pytest.mark.parametrize("case", list(FER_ERRORS))
def test_fer_csv_errors_name_file_and_line(case, tmp_path):
    bad, message = FER_ERRORS[case]
    path = fer_case(tmp_path, bad)
    with pytest.raises(DataError, match=message):
        load_dataset(path, cache_dir=tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_bad_row_in_a_later_parser_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(fer.data.parse, "CHUNK_ROWS", 2)  # the bad row lands in the second chunk
    path = fer_case(tmp_path, ("1", GOOD + " 9", "Training"))
    message = r"line 4: expected 16 pixel values \(4x4, like the other rows\), found 17"
    with pytest.raises(DataError, match=message):
        load_dataset(path, cache_dir=tmp_path)


def test_fer_csv_structure_errors(tmp_path):
    with pytest.raises(DataError, match=r"bad\.csv: line 1: missing required column 'Usage'; found columns emo"):
        load_dataset(fer_case(tmp_path, header="emotion,pixels,Use"), cache_dir=tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text("emotion,pixels,Usage\n1," + GOOD + ",Training\n2," + GOOD + "\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3: expected 3 comma-separated fields .*, found 2"):
        load_dataset(path, cache_dir=tmp_path)
    path.write_text("emotion,pixels,Usage\n1," + GOOD + ",Training,x\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 2: expected 3 comma-separated fields .*, found 4"):
        load_dataset(path, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"bad\.csv: the test split is empty: no labelled rows with Usage 'Pri"):
        load_dataset(fer_case(tmp_path, drop_usage="PrivateTest"), cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"nothing\.csv: no such file or folder"):
        load_dataset(tmp_path / "nothing.csv", cache_dir=tmp_path)
    assert [p.name for p in cache_entries(tmp_path)] == ["bad.csv"]  # no entry, temporary folder or lock


def test_split_folder_errors(tmp_path):
    root, _ = build_split_folder(tmp_path)
    (root / "val.csv").write_text("emotion,pixels\n")
    with pytest.raises(DataError, match=r"val\.csv: no data rows \(the val split is empty\)"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    (root / "val.csv").write_text("label,pixels\n1," + GOOD + "\n")
    with pytest.raises(DataError, match=r"val\.csv: line 1: missing required column 'emotion'"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    (root / "val.csv").write_text("emotion,pixels\n1," + GOOD + "\n1,1 2 3\n")
    with pytest.raises(DataError, match=r"val\.csv: line 3: expected 16 pixel values"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    (root / "val.csv").unlink()
    with pytest.raises(DataError, match=r"splits: missing val\.csv"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_dr_folder_errors(tmp_path):
    root = write_dr_folder(tmp_path / "dr", {"train": [0, 1, 2], "val": [1], "test": [2]})
    cache = tmp_path / "cache"
    good = (root / "train.txt").read_text()

    def fails(text: str, message: str, list_name: str = "train.txt") -> None:
        (root / list_name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_dataset(root, cache_dir=cache)

    fails(good + "missing.png 1\n", r"train\.txt: line 4: image file 'missing\.png' not found")
    fails(good + "\nimg0.png\n", r"train\.txt: line 5: expected two fields '<file name> <integer label>'")
    fails(good + "img0.png one\n", r"train\.txt: line 4: label 'one' is not an integer")
    (root / "train" / "broken.png").write_bytes(b"not an image at all")
    fails(good + "broken.png 1\n", r"train\.txt: line 4: cannot read image .*broken\.png")
    (root / "classes.txt").write_text("a\nb\nc\n")
    fails(good + "img0.png 3\n", r"train\.txt: line 4: label 3 outside the class range 0\.\.2 \(3 classes\)")
    (root / "classes.txt").unlink()
    fails(good + "img0.png -1\n", r"train\.txt: line 4: label -1 outside the class range 0\.\.4")
    fails("\n", r"train\.txt: no images listed \(the train split is empty\)")
    (root / "train.txt").write_text(good)
    (root / "test.txt").unlink()
    with pytest.raises(DataError, match=r"dr: missing test\.txt"):
        load_dataset(root, cache_dir=cache)
    assert cache_entries(cache) == []


def test_unknown_folder(tmp_path):
    with pytest.raises(DataError, match=r"not a known data folder; expected train\.csv"):
        load_dataset(tmp_path, cache_dir=tmp_path / "cache")


def test_class_missing_from_train_warns(tmp_path):
    rows, _ = fer_rows({"train": [0, 3, 3], "val": [1, 3], "test": [3, 6]})
    path = write_fer(tmp_path / "w.csv", rows)
    with pytest.warns(UserWarning) as record:
        load_dataset(path, cache_dir=tmp_path)
    messages = [str(w.message) for w in record]
    assert any("class 'Disgust' (1) is present in val but absent from train" in m for m in messages)
    assert any("class 'Neutral' (6) is present in test but absent from train" in m for m in messages)
    with pytest.warns(UserWarning) as again:  # the cached load warns too
        load_dataset(path, cache_dir=tmp_path)
    assert [str(w.message) for w in again] == messages


# ------------------------------------------------------------------------------ cache

def cache_entries(cache: Path) -> list[Path]:
    """Everything in a cache folder but the digest memo: entries, temporary folders, locks."""
    return sorted(p for p in cache.iterdir() if p.name != D.DIGEST_MEMO) if cache.exists() else []


def no_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache should have been used")


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    path, images = build_fer_csv(tmp_path)
    cache = tmp_path / "cache"
    first = load_dataset(path, cache_dir=cache)
    entries = cache_entries(cache)
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert {p.name for p in entries[0].glob("*.npy")} == {f"{s}.{kind}.npy" for s in first.splits
                                                         for kind in ("images", "labels")}
    with monkeypatch.context() as m:
        m.setitem(LAYOUTS, "fer_csv", no_decode)
        again = load_dataset(path, cache_dir=cache)
        copy = tmp_path / "renamed.csv"
        copy.write_bytes(path.read_bytes())
        moved = load_dataset(copy, cache_dir=cache)  # keyed by content, not by name
    assert moved.source == str(copy)
    for name in first.splits:
        np.testing.assert_array_equal(again.splits[name].images, first.splits[name].images)
    # change one pixel: same size, new content -> decoded again
    old, new = pixel_text(images["train"][0]), pixel_text(255 - images["train"][0])
    path.write_text(path.read_text().replace(old, new, 1))
    changed = load_dataset(path, cache_dir=cache)
    np.testing.assert_array_equal(changed.splits["train"].images[0], 255 - images["train"][0])
    assert len(cache_entries(cache)) == 2


def test_digest_memo_skips_rehashing_a_settled_file(tmp_path, monkeypatch):
    path, images = build_fer_csv(tmp_path)
    path.write_text(path.read_text() + "\n" * 70000)  # blank lines: big enough to be memoised
    monkeypatch.setattr(fer.io, "DIGEST_SETTLE_S", 0.0)
    hashed = []
    real_digest = fer.io.file_digest
    monkeypatch.setattr(fer.io, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    cache = tmp_path / "cache"
    load_dataset(path, cache_dir=cache)
    load_dataset(path, cache_dir=cache)
    assert hashed == [path] and (cache / D.DIGEST_MEMO).is_file()
    old, new = pixel_text(images["train"][0]), pixel_text(images["train"][1])
    path.write_text(path.read_text().replace(old, new, 1) + "\n")  # new size, ctime and content
    data = load_dataset(path, cache_dir=cache)
    assert len(hashed) == 2
    np.testing.assert_array_equal(data.splits["train"].images[0], images["train"][1])


def test_cache_env_var_and_corrupt_entry(tmp_path, monkeypatch):
    path, _ = build_fer_csv(tmp_path)
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "env"))
    load_dataset(path)
    (entry,) = cache_entries(tmp_path / "env")
    images = entry / "train.images.npy"
    images.write_bytes(images.read_bytes()[:-10])  # unreadable entry: decoded again and rewritten
    data = load_dataset(path)
    assert len(data.splits["train"]) == len(LABELS["train"])
    assert data.origin is not None and data.origin.entry == str(entry) and images.stat().st_size > 100


def test_dr_cache_keyed_by_load_size_and_image_content(tmp_path, monkeypatch):
    root, _ = build_dr_folder(tmp_path)
    cache = tmp_path / "cache"
    load_dataset(root, load_size=8, cache_dir=cache)
    load_dataset(root, load_size=12, cache_dir=cache)
    assert len(cache_entries(cache)) == 2
    Image.new("RGB", (5, 5), (255, 0, 0)).save(root / "train" / "img0.png")
    data = load_dataset(root, load_size=8, cache_dir=cache)
    assert (data.splits["train"].images[0] == [255, 0, 0]).all()
    assert len(cache_entries(cache)) == 3


def test_failed_cache_write_leaves_no_file_and_still_loads(tmp_path, monkeypatch):
    path, images = build_fer_csv(tmp_path)
    cache = tmp_path / "cache"

    def fail_during_write(file, array, **kwargs):
        Path(file).write_bytes(b"half an array")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", fail_during_write)
    with pytest.warns(UserWarning, match=r"could not write the data cache .*No space left on device"):
        data = load_dataset(path, cache_dir=cache)
    np.testing.assert_array_equal(data.splits["train"].images, images["train"])
    assert cache_entries(cache) == [] and data.origin is None  # in memory, not mapped


def test_embedded_data_goes_through_the_fer_path_and_cache(tmp_path, monkeypatch):
    synth = pytest.importorskip("fer.data.synth")
    rows, _ = fer_rows(LABELS)
    calls = []

    def tiny_write_csv(out_dir, seed=0, scale=1.0):
        calls.append(seed)
        return write_fer(Path(out_dir) / "demo.csv", rows)

    monkeypatch.setattr(synth, "write_csv", tiny_write_csv)
    data = load_dataset(cache_dir=tmp_path)
    assert data.source == "embedded demo data (seed 0)" and data.classes == FER_CLASSES
    assert data.splits["unlabeled"].labels.tolist() == LABELS["unlabeled"]
    load_dataset(cache_dir=tmp_path)
    assert calls == [0]  # the second load came from the cache without generating


# ------------------------------------------------------------------------------ CLI

def test_cli_table(tmp_path, capsys):
    path, _ = build_fer_csv(tmp_path)
    assert main([str(path), "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"source: {path}" in out and "image shape: 4x4x1 (HxWxC), 7 classes" in out
    assert "train             9  yes" in out and "unlabeled         2  held-out truth" in out
    happy = next(line for line in out.splitlines() if line.startswith("Happy"))
    assert happy.split()[1:3] == ["3", "33.3%"]  # 3 of the 9 training images
    assert main([str(tmp_path / "nope.csv"), "--cache-dir", str(tmp_path)]) == 2
    assert "nope.csv: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cli_every_layout(layout, tmp_path, capsys):
    path, _ = BUILDERS[layout](tmp_path)
    assert main([str(path), "--load-size", "8", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    classes = DR_CLASSES if layout == "dr_folder" else FER_CLASSES
    assert all(any(line.startswith(name) for line in out.splitlines()) for name in classes)
    pool = next(line for line in out.splitlines() if line.startswith("unlabeled "))
    assert pool.split()[1] == str(len(LABELS["unlabeled"]))


# ------------------------------------------------------------------------------ bad image files

def dr_with(tmp_path: Path, extra: dict[str, bytes | None], listed: bool = True) -> Path:
    """A valid DR folder plus `extra` files in train/ (None: listed but never written),
    listed in train.txt when `listed`."""
    root = write_dr_folder(tmp_path / "dr", {"train": [0, 1, 2], "val": [1], "test": [2]})
    for name, content in extra.items():
        if content is not None:
            (root / "train" / name).write_bytes(content)
    if listed:
        with open(root / "train.txt", "a") as f:
            f.write("".join(f"{name} 3\n" for name in extra))
    return root


def jpeg_bytes(side: int = 64) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_IMAGES = {  # case: (extra train/ files, listed in train.txt, expected message)
    "truncated jpeg": ({"cut.jpg": jpeg_bytes()[:1500]}, True,
                       r"train\.txt: line 4: cannot read image .*cut\.jpg: OSError: image file is truncated"),
    "not an image": ({"junk.jpg": b"\xff\xd8 not really"}, True,
                     r"train\.txt: line 4: cannot read image .*junk\.jpg: UnidentifiedImageError"),
    "listed, missing": ({"gone.jpg": None}, True,
                        r"train\.txt: line 4: image file 'gone\.jpg' not found in .*dr/train or"),
    "present, unlisted": ({"stray.jpg": jpeg_bytes()}, False,
                          r"dr/train/stray\.jpg: image file is listed in none of train\.txt, val\.txt, test\.txt"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_one_line_naming_file_and_line_and_leaves_no_cache(case, tmp_path):
    extra, listed, message = BAD_IMAGES[case]
    root = dr_with(tmp_path, extra, listed)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(root, load_size=8, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value) and "--skip-bad" in str(info.value)
    assert cache_entries(tmp_path / "cache") == []


def test_decompression_bomb_is_refused_with_its_line(tmp_path, monkeypatch):
    import fer.data.fundus

    monkeypatch.setattr(fer.data.fundus, "MAX_PIXELS", 20 * 20)
    root = dr_with(tmp_path, {"huge.png": b""}, listed=True)
    Image.new("RGB", (40, 40)).save(root / "train" / "huge.png")
    with pytest.raises(DataError, match=r"train\.txt: line 4: cannot read image .*huge\.png: ValueError: "
                                        r"40x40 pixels is over the 400 allowed"):
        load_dataset(root, load_size=8, cache_dir=tmp_path / "cache")


def test_skip_bad_leaves_bad_images_out_counts_them_and_keeps_labels_aligned(tmp_path, capsys):
    root = dr_with(tmp_path, {"cut.jpg": jpeg_bytes()[:1500], "gone.jpg": None}, listed=True)
    Image.new("RGB", (12, 12), (0, 255, 0)).save(root / "train" / "green.png")
    with open(root / "train.txt", "a") as f:
        f.write("green.png 4\n")
    (root / "train" / "stray.png").write_bytes((root / "train" / "green.png").read_bytes())
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"left out 3 bad images \(skip_bad\)"):
        data = load_dataset(root, load_size=8, skip_bad=True, cache_dir=cache)
    assert len(data.skipped) == 3 and any("stray.png" in m for m in data.skipped)
    assert data.splits["train"].labels.tolist() == [0, 1, 2, 4]  # cut.jpg and gone.jpg (label 3) left out
    assert (data.splits["train"].images[3] == [0, 255, 0]).all()
    with pytest.warns(UserWarning, match="left out 3 bad images"):
        assert main([str(root), "--load-size", "8", "--skip-bad", "--cache-dir", str(cache)]) == 0
    assert "skipped 3 bad images (--skip-bad):" in capsys.readouterr().out
    # the entry built with skip_bad does not let a strict load through
    with pytest.raises(DataError, match=r"(cut\.jpg|gone\.jpg|stray\.png).*\(and 2 more bad images\)"):
        load_dataset(root, load_size=8, cache_dir=cache)
    assert main([str(root), "--load-size", "8", "--cache-dir", str(cache)]) == 2
    assert "pass --skip-bad" in capsys.readouterr().err


def test_interrupted_decode_leaves_nothing_a_later_load_would_trust(tmp_path, monkeypatch):
    import fer.data.layouts

    root, _ = build_dr_folder(tmp_path)
    cache = tmp_path / "cache"
    real, calls = fer.data.layouts.load_fundus, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the train split
        return real(*args, **kwargs)

    monkeypatch.setattr(fer.data.layouts, "load_fundus", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(root, load_size=8, cache_dir=cache)
    assert cache_entries(cache) == []  # no entry, temporary folder or lock
    monkeypatch.setattr(fer.data.layouts, "load_fundus", real)
    assert len(load_dataset(root, load_size=8, cache_dir=cache).splits["train"]) == len(LABELS["train"])


# ------------------------------------------------------------------------------ memory maps

def test_splits_are_read_only_memory_maps_and_reopen_without_test(tmp_path, monkeypatch, capsys):
    root, _ = build_dr_folder(tmp_path)
    data = load_dataset(root, load_size=8, cache_dir=tmp_path / "cache")
    assert "decoding dr: 18/18 in" in capsys.readouterr().err  # the progress line, without a terminal
    images = data.splits["train"].images
    assert isinstance(images, np.memmap) and not images.flags.writeable
    assert data.origin is not None and set(data.origin.splits) == set(data.splits)
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda file, *a, **k: opened.append(Path(file).name) or real_load(file, *a, **k))
    trial = D.open_mapped(data.without("test").origin)
    assert set(trial.splits) == {"train", "val", "unlabeled"} and not any(n.startswith("test.") for n in opened)
    np.testing.assert_array_equal(trial.splits["train"].images, images)
    assert trial.source == data.source and trial.origin.splits == ("train", "val", "unlabeled")


def test_reopening_on_a_node_without_the_entry_decodes_there(tmp_path):
    import dataclasses
    import shutil

    root, _ = build_dr_folder(tmp_path)
    data = load_dataset(root, load_size=8, cache_dir=tmp_path / "driver")
    other_node = dataclasses.replace(data.without("test").origin, cache_dir=str(tmp_path / "node2"))
    shutil.rmtree(tmp_path / "driver")
    trial = D.open_mapped(other_node)
    assert set(trial.splits) == {"train", "val", "unlabeled"} and len(cache_entries(tmp_path / "node2")) == 1


def test_load_options_are_validated(tmp_path):
    root, _ = build_dr_folder(tmp_path)
    with pytest.raises(ValueError, match=r"load_crop='circle' is not allowed. Choose one of: retina, squash"):
        load_dataset(root, load_crop="circle", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"load_filter='ben' is not allowed. Choose one of: none, graham"):
        load_dataset(root, load_filter="ben", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"load_size must be a positive integer, got 0"):
        load_dataset(root, load_size=0, cache_dir=tmp_path)


def test_dr_cache_keyed_by_crop_and_filter(tmp_path):
    root, _ = build_dr_folder(tmp_path)
    cache = tmp_path / "cache"
    for crop, filter in [("retina", "none"), ("squash", "none"), ("retina", "graham")]:
        load_dataset(root, load_size=8, load_crop=crop, load_filter=filter, cache_dir=cache)
    assert len(cache_entries(cache)) == 3


def test_pages_released_while_decoding_keep_every_row(tmp_path, monkeypatch):
    """The decoder unmaps each written block (MADV_DONTNEED) so its RSS does not grow with
    N; the rows must still reach the file: the cache equals an in-memory decode."""
    import fer.data.layouts

    monkeypatch.setattr(fer.data.layouts, "RELEASE_ROWS", 2)
    root, _ = build_dr_folder(tmp_path)
    mapped = load_dataset(root, load_size=8, cache_dir=tmp_path / "cache")
    in_memory = D.decode_dr_folder(root, D.LoadOptions(size=8))
    for name, split in in_memory.splits.items():
        np.testing.assert_array_equal(mapped.splits[name].images, split.images)
        assert split.images.any()
