"""TFLite export (fer.export.tflite): fp32 parity in the LiteRT interpreter, FP16 / dynamic-INT8
bounds, full INT8 kept or refused on validation macro-F1, the card, the missing-extra line.

One conversion (a one-epoch mobilenet_v3_small at 24x24, the model tests/test_export.py
trains) is shared by the module; the quantizations themselves take about a second each.
Without the optional extra these tests skip, naming it; the missing-extra message is
checked either way.
"""

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch

import fer.train.models
from fer.export import deploy, tflite
from fer.export.deploy import DeployModel
from fer.export.export import build_deploy_model, export_checkpoint, main, run_torch
from test_export import CLASSES, bar_images
from test_model_zoo import FAMILIES

HAVE_EXTRA = all(importlib.util.find_spec(name) is not None for name in tflite.EXTRA_MODULES)
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the optional extra [tflite]: "
                                                        "pip install -e '.[tflite]'")
MISSING = ("error: --tflite needs the optional extra [tflite] (litert_torch is not installed); "
           "install it with: pip install -e '.[tflite]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, out dir, card): ONNX + fp32 / fp16 / dynamic-int8 / int8 TFLite of a
    trained model; INT8 calibrated on training images and checked on validation images."""
    from fer.data import Split
    from fer.train.config import TrialConfig
    from fer.train.fitting import Stage, fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    cfg = TrialConfig(model="mobilenet_v3_small", epoch_images=0, image_size=24, batch_size=32, epochs=2,
                      augment="none", warmup_epochs=0, amp=False, lr=3e-3, dropout=0.0)
    x, y = bar_images(160, 24, 1)
    xv, yv = bar_images(64, 24, 2)
    result = fit(cfg, Stage.of(cfg, "teacher", x, y, np.bincount(y, minlength=4)), Split(xv, yv), CLASSES,
                 progress=False)
    ckpt = dict(result.checkpoint, posthoc_offsets=[0.3, -0.1, 0.0, -0.2])
    images, labels = bar_images(80, 24, 3)
    out = tmp_path_factory.mktemp("tflite")
    options = tflite.TFLiteOptions(quant=tflite.QUANT_MODES, check_images=xv, check_labels=yv)
    card = export_checkpoint(ckpt, str(out), images=images, labels=labels, calib_images=x[:64],
                             latency_runs=3, tflite=options)
    yield ckpt, out, card, (images, labels)
    torch.set_num_threads(threads)


@needs_extra
def test_fp32_parity_in_the_litert_interpreter(exported):
    from ai_edge_litert.interpreter import Interpreter

    ckpt, out, card, (images, _) = exported
    fp32 = card["tflite"]["models"]["fp32"]
    assert fp32["parity"]["passed"] and fp32["parity"]["images"] == 80
    assert fp32["parity"]["max_abs_score_diff"] <= 1e-4 and fp32["parity"]["top1_identical"]
    # the file alone, in a fresh interpreter: uint8 NHWC batch-1 input, scores + offsets out
    interpreter = Interpreter(model_path=str(out / "model.tflite"), num_threads=1)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert source["dtype"] == np.uint8 and list(source["shape"]) == [1, 24, 24, 1]
    interpreter.set_tensor(source["index"], images[:1])
    interpreter.invoke()
    reference = run_torch(build_deploy_model(ckpt, (24, 24)), images[:1])
    np.testing.assert_allclose(interpreter.get_tensor(target["index"]), reference, atol=1e-4)


@needs_extra
@pytest.mark.parametrize("mode, max_diff, min_agreement, max_f1_loss", [
    ("fp16", 0.05, 0.97, 0.03),  # measured: max |diff| 0.016, agreement 1.0, F1 change 0
    ("dynamic-int8", 1.0, 0.9, 0.05),  # measured: max |diff| 0.42, agreement 1.0, F1 change 0
])
def test_fp16_and_dynamic_int8_stay_close_to_fp32(exported, mode, max_diff, min_agreement, max_f1_loss):
    _, out, card, (images, _) = exported
    entry = card["tflite"]["models"][mode]
    fp32 = card["tflite"]["models"]["fp32"]
    assert entry["parity"]["max_abs_score_diff"] <= max_diff
    assert entry["top1_agreement_with_fp32"] >= min_agreement
    assert entry["macro_f1_change"] >= -max_f1_loss
    assert entry["bytes"] < 0.6 * fp32["bytes"]
    scores = tflite.run_tflite(str(out / f"model.{mode}.tflite"), images[:4])
    assert scores.shape == (4, 4) and scores.dtype == np.float32


@needs_extra
def test_int8_calibrated_on_real_images_is_kept_when_macro_f1_holds(exported):
    _, out, card, (images, _) = exported
    int8 = card["tflite"]["models"]["int8"]
    assert not int8.get("refused"), int8
    assert int8["validation_macro_f1_drop"] <= tflite.INT8_MAX_F1_DROP
    assert int8["top1_agreement_with_fp32"] >= 0.9
    assert int8["bytes"] < 0.4 * card["tflite"]["models"]["fp32"]["bytes"]
    scores = tflite.run_tflite(str(out / "model.int8.tflite"), images)  # int8 output, dequantized
    assert scores.dtype == np.float32 and np.abs(scores).max() > 0.1


@needs_extra
def test_int8_calibrated_on_black_images_is_refused(exported, tmp_path, monkeypatch, capsys):
    """A deliberately bad calibration (all-black images: every activation range collapses)
    loses macro-F1, so the file is removed and the card says why with the measured drop."""
    ckpt, out, _, (images, labels) = exported
    monkeypatch.setattr(tflite, "convert", lambda module, sample, path: shutil.copy(out / "model.tflite", path))
    xv, yv = bar_images(64, 24, 2)
    options = tflite.TFLiteOptions(quant=("int8",), check_images=xv, check_labels=yv)
    module = build_deploy_model(ckpt, (24, 24))
    section = tflite.export_tflite(module, str(tmp_path), images, labels, run_torch(module, images),
                                   np.zeros((16, 24, 24, 1), np.uint8), options, latency_runs=1)
    int8 = section["models"]["int8"]
    assert int8["refused"] and int8["validation_macro_f1_drop"] > tflite.INT8_MAX_F1_DROP
    assert not (tmp_path / "model.int8.tflite").exists() and (tmp_path / "model.tflite").exists()
    line = next(l for l in capsys.readouterr().out.splitlines() if "REFUSED" in l)
    assert line == (f"tflite int8: REFUSED, validation macro-F1 falls by {int8['validation_macro_f1_drop']:.4f} "
                    f"against fp32, more than the 0.02 allowed (--tflite-max-f1-drop); "
                    f"model.int8.tflite not written")
    assert not tflite.passed(section) and tflite.artifacts(section, {"shape": ["batch", 24, 24, 1]})[-1]["file"] \
        == "model.tflite"


@needs_extra
def test_card_lists_every_artifact_with_sha256_input_and_parity(exported):
    _, out, card, _ = exported
    on_disk = json.loads((out / "model_card.json").read_text())
    files = [a["file"] for a in on_disk["artifacts"]]
    assert files == ["model.onnx", "model.tflite", "model.fp16.tflite", "model.dynamic-int8.tflite",
                     "model.int8.tflite"]
    for artifact in on_disk["artifacts"]:
        assert artifact["sha256"] == hashlib.sha256((out / artifact["file"]).read_bytes()).hexdigest()
        assert artifact["input"]["dtype"] == "uint8" and artifact["input"]["layout"] == "NHWC"
        assert "max_abs_score_diff" in artifact["parity"] and "top1_agreement" in artifact["parity"]
    assert on_disk["artifacts"][0]["input"]["shape"] == ["batch", 24, 24, 1]
    assert on_disk["artifacts"][1]["input"]["shape"] == [1, 24, 24, 1]
    assert on_disk["tflite"]["batch"] == 1 and "litert-torch" in on_disk["tflite"]["converter"]


@needs_extra
def test_search_export_trial_writes_tflite_with_int8_calibrated_on_train(exported, tmp_path, monkeypatch):
    """search.export's export_trial passes the flags on: val images check, train images
    calibrate (the fp32 conversion is the fixture's file: same checkpoint, same graph)."""
    from types import SimpleNamespace

    from fer.data import Split
    from search.export import export_trial
    from search.report import TrialRecord

    ckpt, out, _, _ = exported
    monkeypatch.setattr(tflite, "convert", lambda module, sample, path: shutil.copy(out / "model.tflite", path))
    dataset = SimpleNamespace(source="bars", splits={"train": Split(*bar_images(96, 24, 1)),
                                                     "val": Split(*bar_images(64, 24, 2))})
    record = TrialRecord(trial_id="t1", path=str(tmp_path), status="TERMINATED", config={})
    card = export_trial(record, tmp_path / "export", dataset, "val_macro_f1", "max", why="test",
                        loaded=("best.pt", ckpt), tflite=tflite.TFLiteOptions(quant=("int8",)))
    int8 = card["tflite"]["models"]["int8"]
    assert not int8.get("refused") and int8["validation_macro_f1_drop"] <= tflite.INT8_MAX_F1_DROP
    assert card["source"]["trial_id"] == "t1" and (tmp_path / "export" / "model.int8.tflite").exists()
    assert [a["file"] for a in card["artifacts"]] == ["model.onnx", "model.tflite", "model.int8.tflite"]


def test_ci_installs_the_extra_the_readme_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from readme import ROOT, readme_argv

    assert readme_argv("pip install -e '.[tflite]'") == shlex.split(tflite.INSTALL)  # the missing-extra line's
    install = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith("pip install -e "))
    assert "tflite" in install.split("[")[1].split("]")[0].split(",")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {r.split(">")[0] for r in extras["tflite"]} == {"litert-torch", "ai-edge-quantizer", "ai-edge-litert"}


@needs_extra
def test_the_readme_export_command(exported, tmp_path, monkeypatch, capsys):
    """The README's `fer.export --tflite ...` as written, from a folder holding runs/focal/best.pt
    (the fixture's checkpoint; its classes need bar images for data, and its conversion is
    the fixture's file)."""
    from fer.data import Dataset, Split
    from fer.train.checkpoint import save_checkpoint
    from readme import readme_argv

    ckpt, out, _, _ = exported
    save_checkpoint(ckpt, tmp_path / "runs" / "focal" / "best.pt")
    splits = {"train": Split(*bar_images(96, 24, 1)), "val": Split(*bar_images(64, 24, 2)),
              "test": Split(*bar_images(64, 24, 3))}
    monkeypatch.setattr("fer.data.load.load_dataset", lambda *a, **k: Dataset(CLASSES, splits, "bars"))
    monkeypatch.setattr(tflite, "convert", lambda module, sample, path: shutil.copy(out / "model.tflite", path))
    monkeypatch.chdir(tmp_path)
    argv = readme_argv("python -m fer.export --checkpoint runs/focal/best.pt --out export/ --tflite "
                       "--tflite-quant fp16 dynamic-int8 int8")
    assert main(argv[3:] + ["--latency-runs", "2"]) == 0, capsys.readouterr()
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert [a["file"] for a in card["artifacts"]] == ["model.onnx", "model.tflite", "model.fp16.tflite",
                                                      "model.dynamic-int8.tflite", "model.int8.tflite"]


@pytest.mark.parametrize("cli", ["fer.export", "search.export"])
def test_missing_extra_is_one_line_before_any_work(cli, tmp_path, monkeypatch, capsys):
    """Simulated: the extra's packages cannot be imported. The checkpoint / experiment does
    not exist, so the line comes before anything is loaded."""
    for name in tflite.EXTRA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    if cli == "fer.export":
        rc = main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"), "--tflite"])
    else:
        from search.export import main as search_main

        rc = search_main(["--experiment", str(tmp_path / "nope"), "--tflite-quant", "fp16"])
    assert rc == 2
    assert capsys.readouterr().err == MISSING + "\n"


def test_tflite_flags_parse_and_validate():
    import argparse

    parser = argparse.ArgumentParser()
    tflite.add_arguments(parser)
    args = parser.parse_args(["--tflite-quant", "int8", "fp16", "--tflite-quant", "int8"])
    assert args.tflite_quant == ["int8", "fp16", "int8"] and not args.tflite
    assert tflite.options_from_args(parser.parse_args([])) is None
    with pytest.raises(ValueError, match=r"^--tflite-max-f1-drop must be a number, got nan$"):
        tflite.options_from_args(parser.parse_args(["--tflite", "--tflite-max-f1-drop", "nan"]))
    with pytest.raises(ValueError, match=r"^unknown TFLite quantization 'int4'; valid: fp16, dynamic-int8, int8$"):
        tflite.quantize("model.tflite", "model.int4.tflite", "int4")
    if HAVE_EXTRA:  # several modes: each once, in a fixed order; --tflite-quant implies --tflite
        assert tflite.options_from_args(args).quant == ("fp16", "int8")


@needs_extra
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_model_family_converts_with_fp32_parity(name, tmp_path):
    """Every family tests/test_model_zoo.py covers converts (measured: 11 s for resnet10t,
    the default, to 62 s for efficientnet_v2_s; about 5 min for all ten on 2 cores). CI runs
    the default's; FER_TEST_TFLITE_ZOO=1 runs them all."""
    if name != "resnet10t" and not os.environ.get("FER_TEST_TFLITE_ZOO"):
        pytest.skip("converting every family takes ~5 min; FER_TEST_TFLITE_ZOO=1 runs it")
    size = FAMILIES[name][1]
    torch.manual_seed(0)
    model = fer.train.models.build_model(name, 3, in_channels=1, image_size=size)
    module = DeployModel(model, image_size=size, input_hw=(size, size), offsets=[0.5, 0.0, -0.5],
                         num_classes=3).eval()
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 1), dtype=np.uint8)
    path = tflite.convert(module, torch.from_numpy(images[:1].copy()), str(tmp_path / "model.tflite"))
    parity = deploy.compare(tflite.run_tflite(path, images), run_torch(module, images))
    assert parity["max_abs_score_diff"] <= deploy.PARITY_TOLERANCE and parity["top1_identical"], parity


def test_antialiased_downscale_is_refused_in_one_line(tmp_path):
    """litert-torch 0.10 cannot lower aten._upsample_bilinear2d_aa (measured); the graph only
    has it when the model's image_size is below the data's."""
    model = fer.train.models.build_model("mobilenet_v3_small", 4, in_channels=1, image_size=24)
    module = DeployModel(model, image_size=24, input_hw=(48, 48), offsets=None, num_classes=4)
    with pytest.raises(ValueError, match=r"^TFLite: the model takes 24x24 images, smaller than the data's "
                                         r"\(48, 48\), and litert-torch has no lowering for the antialiased "
                                         r"downscale \(aten\._upsample_bilinear2d_aa\); use the ONNX model, "
                                         r"or train at the data's image size$"):
        tflite.convert(module, torch.zeros(1, 48, 48, 1, dtype=torch.uint8), str(tmp_path / "m.tflite"))
