"""Bad input to `python -m search.run`: every case fails before Ray starts, in one line
naming the problem, and leaves no experiment folder and no data-cache entry behind.

One table over the three data layouts, YAML spaces and CLI flags, all driven through
`search.run.main(argv)` the way a user meets them. fer.data and search.space test their own
messages in detail (tests/test_data.py, tests/test_space.py); this table checks the front
door: exit code 2, the message, nothing written, nothing started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import ray
from PIL import Image

from search import run as search_run

SIDE = 4  # 4x4 images: the data layer takes any square size
PIXELS = " ".join(["7"] * SIDE * SIDE)
SPLIT_ROWS = {"Training": [0, 1, 2, 3, 4, 5, 6], "PublicTest": [0, 3, 6], "PrivateTest": [1, 3, 5]}

# --------------------------------------------------------------------------- builders


def fer_csv(tmp: Path, *, header: str = "emotion,pixels,Usage", bad: str | None = None,
            drop: str | None = None) -> Path:
    """A valid tiny FER CSV; `bad` replaces its 5th data row (line 6), `drop` leaves a Usage out."""
    rows = [f"{y},{PIXELS},{usage}" for usage, ys in SPLIT_ROWS.items() if usage != drop for y in ys]
    if bad is not None:
        rows[4] = bad
    path = tmp / "faces.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def split_folder(tmp: Path, *, skip: str | None = None, empty: str | None = None,
                 side: dict[str, int] | None = None, bad_train_row: str | None = None) -> Path:
    root = tmp / "splits"
    root.mkdir()
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")):
        if split == skip:
            continue
        n = (side or {}).get(split, SIDE)
        rows = [] if split == empty else [f"{y},{' '.join(['9'] * n * n)}" for y in SPLIT_ROWS[usage]]
        if split == "train" and bad_train_row is not None:
            rows[2] = bad_train_row
        (root / f"{split}.csv").write_text("emotion,pixels\n" + "".join(r + "\n" for r in rows))
    return root


def dr_folder(tmp: Path, *, line: str | None = None, skip: str | None = None,
              corrupt: bool = False) -> Path:
    """A valid tiny DR folder; `line` replaces the 2nd line of train.txt (line 2)."""
    root = tmp / "dr"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        names = []
        for i, grade in enumerate([0, 1, 2, 3, 4]):
            name = f"eye{i}.png"
            Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(root / split / name)
            names.append(f"{name} {grade}")
        if split == "train" and line is not None:
            names[1] = line
        if split == "train" and corrupt:
            (root / split / "eye0.png").write_bytes(b"not a png at all")
        if split != skip:
            (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def space_file(tmp: Path, text: str) -> Path:
    path = tmp / "space.yaml"
    path.write_text(text)
    return path


SPACE = """\
fixed: {model: mobilenet_v3_small, epoch_images: 0, epochs: 1, student_epochs: 0, image_size: 32}
parameters:
  loss:
    choice: [ce, focal]
  focal_gamma:
    uniform: [1.0, 2.0]
    when: {loss: focal}
searcher: {baseline: {loss: ce}}
"""

# Each case: (argv builder given the test's tmp folder, parts the one-line error must contain).
Case = tuple[Callable[[Path], list], list[str]]
CASES: dict[str, Case] = {
    # ---- FER2013 CSV
    "fer: missing pixels column": (
        lambda t: ["--data", fer_csv(t, header="emotion,pixel,Usage")],
        ["faces.csv", "line 1", "missing required column 'pixels'"]),
    "fer: non-numeric pixel": (
        lambda t: ["--data", fer_csv(t, bad=f"3,{PIXELS[:-1]}x,Training")],
        ["faces.csv", "line 6", "non-numeric pixel value"]),
    "fer: label outside the classes": (
        lambda t: ["--data", fer_csv(t, bad=f"9,{PIXELS},Training")],
        ["faces.csv", "line 6", "label 9 outside the class range"]),
    "fer: short pixel row": (
        lambda t: ["--data", fer_csv(t, bad="3,1 2 3,Training")],
        ["faces.csv", "line 6", "expected 16 pixel values"]),
    "fer: pixel above 255": (
        lambda t: ["--data", fer_csv(t, bad="3," + " ".join(["300"] * SIDE * SIDE) + ",Training")],
        ["faces.csv", "line 6", "outside 0..255"]),
    "fer: unknown Usage": (
        lambda t: ["--data", fer_csv(t, bad=f"3,{PIXELS},Trainng")],
        ["faces.csv", "line 6", "unknown Usage 'Trainng'", "Training, PublicTest, PrivateTest"]),
    "fer: no test rows": (
        lambda t: ["--data", fer_csv(t, drop="PrivateTest")],
        ["faces.csv", "the test split is empty", "PrivateTest"]),
    "fer: empty file": (
        lambda t: ["--data", (t / "faces.csv", (t / "faces.csv").write_text(""))[0]],
        ["faces.csv", "empty file"]),
    "data: missing path": (
        lambda t: ["--data", t / "nope.csv"],
        ["nope.csv", "no such file or folder", "FER2013 CSV, a split folder or a DR folder"]),
    "data: unknown folder": (
        lambda t: ["--data", (t / "photos", (t / "photos").mkdir())[0]],
        ["photos", "not a known data folder", "train.csv", "train.txt"]),
    # ---- split folder
    "split: missing val.csv": (
        lambda t: ["--data", split_folder(t, skip="val")],
        ["splits", "missing val.csv", "train.csv, val.csv, test.csv"]),
    "split: empty test.csv": (
        lambda t: ["--data", split_folder(t, empty="test")],
        ["test.csv", "no data rows", "test split is empty"]),
    "split: image sizes differ": (
        lambda t: ["--data", split_folder(t, side={"val": 5})],
        ["splits", "different image sizes"]),
    "split: bad label": (
        lambda t: ["--data", split_folder(t, bad_train_row=f"happy,{PIXELS}")],
        ["train.csv", "line 4", "'happy' is not"]),
    # ---- DR folder
    "dr: missing test.txt": (
        lambda t: ["--data", dr_folder(t, skip="test")],
        ["dr", "missing test.txt", "train.txt, val.txt"]),
    "dr: listed image not on disk": (
        lambda t: ["--data", dr_folder(t, line="ghost.png 1")],
        ["train.txt", "line 2", "'ghost.png' not found"]),
    "dr: label not an integer": (
        lambda t: ["--data", dr_folder(t, line="eye1.png mild")],
        ["train.txt", "line 2", "label 'mild' is not an integer"]),
    "dr: label outside the grades": (
        lambda t: ["--data", dr_folder(t, line="eye1.png -1")],
        ["train.txt", "line 2", "label -1 outside the class range 0..4"]),
    "dr: one field": (
        lambda t: ["--data", dr_folder(t, line="eye1.png")],
        ["train.txt", "line 2", "expected two fields"]),
    "dr: unreadable image": (
        lambda t: ["--data", dr_folder(t, corrupt=True)],
        ["train.txt", "cannot read image", "eye0.png"]),
    # ---- YAML spaces
    "space: python object tag": (
        lambda t: ["--space", space_file(t, "parameters: !!python/object/apply:os.system [echo pwned]\n")],
        ["space.yaml", "not valid YAML", "python/object/apply:os.system"]),
    "space: unknown distribution": (
        lambda t: ["--space", space_file(t, SPACE.replace("uniform:", "normal:"))],
        ["space.yaml:6", "parameters.focal_gamma.normal", "unknown distribution 'normal'", "loguniform"]),
    "space: low above high": (
        lambda t: ["--space", space_file(t, SPACE.replace("[1.0, 2.0]", "[2.0, 1.0]"))],
        ["space.yaml:6", "parameters.focal_gamma.uniform", "low 2.0 > high 1.0"]),
    "space: condition on a missing parameter": (
        lambda t: ["--space", space_file(t, SPACE.replace("{loss: focal}", "{optimiser: sgd}"))],
        ["space.yaml:7", "when.optimiser", "not a parameter declared above"]),
    "space: not a trial field": (
        lambda t: ["--space", space_file(t, SPACE.replace("  loss:\n", "  criterion:\n"))],
        ["space.yaml:3", "parameters.criterion", "not a trial config field"]),
    "space: value the trial refuses": (
        lambda t: ["--space", space_file(t, SPACE.replace("[ce, focal]", "[ce, hinge]"))],
        ["space.yaml:4", "loss='hinge' is not allowed", "Choose one of"]),
    "space: unknown top-level key": (
        lambda t: ["--space", space_file(t, SPACE + "schedular: {name: asha}\n")],
        ["space.yaml:9", "'schedular'", "Allowed keys"]),
    "space: broken YAML": (
        lambda t: ["--space", space_file(t, "parameters: {loss: [ce\n")],
        ["space.yaml", "not valid YAML", "line 2"]),
    "space: unknown name": (
        lambda t: ["--space", "imbalanse"],
        ["imbalanse", "search space not found", "Available spaces:", "smoke"]),
    # ---- CLI flags
    "cli: zero workers": (
        lambda t: ["--workers-per-trial", "0"],
        ["--workers-per-trial", "expected a whole number >= 1, got '0'"]),
    "cli: gpu fraction 1.5": (
        lambda t: ["--gpus-per-worker", "1.5"],
        ["--gpus-per-worker", "a fraction in (0, 1] or a whole number"]),
    "cli: NaN cpus": (
        lambda t: ["--cpus-per-worker", "nan"],
        ["--cpus-per-worker", "expected a number > 0, got 'nan'"]),
    "cli: negative max failures": (
        lambda t: ["--max-failures", "-1"],
        ["--max-failures", "expected a whole number >= 0"]),
    "cli: seed not a number": (
        lambda t: ["--seed", "abc"],
        ["--seed", "got 'abc'"]),
    "cli: unknown flag": (
        lambda t: ["--trials", "3"],
        ["unrecognized arguments: --trials 3"]),
    "cli: abbreviated flag": (
        lambda t: ["--num-sample", "3"],
        ["unrecognized arguments: --num-sample 3"]),
    "cli: resume without a name": (
        lambda t: ["--resume"],
        ["--resume needs --name"]),
    "cli: resume of a missing experiment": (
        lambda t: ["--resume", "--name", "ghost"],
        ["no experiment 'ghost'", "runs"]),
}


def assert_one_clear_line(err: str, expected: list[str]) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(("error:", "python -m search.run: error:")), err
    for part in expected:
        assert part in lines[-1], f"{part!r} missing from: {lines[-1]}"


def no_files_under(path: Path) -> bool:
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_ray_names_the_problem_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    build, expected = CASES[case]
    cache, storage = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("FER_CACHE_DIR", str(cache))
    ray_was_up = ray.is_initialized()

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started on bad input")

    monkeypatch.setattr(search_run, "start_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    argv = [str(a) for a in build(tmp_path)] + ["--storage", str(storage)]
    try:
        code = search_run.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    _, err = capsys.readouterr()
    assert code == 2, err
    assert_one_clear_line(err, expected)
    assert not storage.exists(), sorted(storage.rglob("*"))  # no experiment folder, not even empty
    assert no_files_under(cache), sorted(cache.rglob("*"))  # no cache entry or digest memo
    assert ray.is_initialized() == ray_was_up  # refused before Ray started (no wall-clock limit: CI machines vary)


def test_table_covers_every_input_kind():
    kinds = {name.split(":")[0] for name in CASES}
    assert {"fer", "split", "dr", "space", "cli"} <= kinds
    assert len(CASES) >= 20
