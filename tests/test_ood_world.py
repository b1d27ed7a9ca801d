"""OOD calibration, evaluation and the gate benchmark follow the model's own training world.

A flat-world segmenter (card `training.config.train_split` "flat/in_dist") is calibrated on flat scenes,
evaluated against the flat OOD splits with the flat far-shift pair, and gated on a flat stream; a
shapes-world model (no train_split on its card, as the shipped one) keeps the shapes splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tta_runtime.ood as ood
from tta_runtime import Runtime
from tta_runtime.cli.main import main
from tta_runtime.config import ModelCard, SegmenterConfig
from tta_runtime.data.flat_world import FLAT_OOD_SPLITS, FLAT_SPLITS
from tta_runtime.data.scenes import OOD_SPLITS, VAL_SEED
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.bench_gate import DEFAULT_SHIFTS, bench_gate, mixed_stream, resolve_shifts
from tta_runtime.evaluation.ood import eval_ood, fit_ood, scene_features, train_split_of
from tta_runtime.models.segmenter import SlotSegmenter

FLAT_PAIR = ("flat/photo_background", "flat/unseen_shapes")
SHAPES_PAIR = ("textured_background", "unseen_shapes")
TINY = SegmenterConfig(
    resolution=16, num_slots=7, slot_dim=16, encoder_channels=8, encoder_layers=2, decoder_width=16, decoder_blocks=1
)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 16x16 segmenter written as a flat-world model folder, calibrated by the CLI."""
    from tta_runtime.training import write_model_folder
    from tta_runtime.training.slot import TrainConfig

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SlotSegmenter(TINY)
    cfg = TrainConfig(name="tiny-flat", segmenter=TINY, steps=1, batch=2, train_split="flat/in_dist", val_images=2)
    folder = write_model_folder(model, cfg, tmp_path_factory.mktemp("flat") / "tiny-flat", command="test")
    assert main(["ood", "fit", "--model", str(folder), "--n-images", "4"]) == 0
    return folder


@pytest.fixture
def shapes_dir(tmp_path: Path) -> Path:
    """The same tiny segmenter as a model folder whose card records no training split (as the shipped one)."""
    from safetensors.torch import save_file

    from tta_runtime.config import Preprocessing, WeightsSpec
    from tta_runtime.hub import sha256_file

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SlotSegmenter(TINY)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = ModelCard(
        name="tiny-shapes", description="random init, for tests", segmenter=TINY,
        preprocessing=Preprocessing(size=TINY.resolution),
        weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)),
    )
    (tmp_path / "card.json").write_text(card.model_dump_json(indent=2))
    return tmp_path


def _card(folder: Path) -> ModelCard:
    return ModelCard.model_validate_json((folder / "card.json").read_text())


def test_far_shift_pairs_per_world() -> None:
    assert ood.far_shift_splits() == ood.FAR_SHIFT_SPLITS == SHAPES_PAIR
    assert ood.far_shift_splits("flat/in_dist") == ood.FLAT_FAR_SHIFT_SPLITS == FLAT_PAIR
    assert set(FLAT_PAIR) <= set(FLAT_OOD_SPLITS)
    assert {"far_shift_splits", "FLAT_FAR_SHIFT_SPLITS", "FAR_SHIFT_SPLITS_BY_WORLD"} <= set(ood.__all__)
    with pytest.raises(ConfigError, match="flat/in_dist"):
        ood.far_shift_splits("textured_background")


def test_flat_calibration_is_fitted_on_flat_validation_scenes(flat_dir: Path) -> None:
    assert train_split_of(_card(flat_dir)) == "flat/in_dist"
    cals = ood.load_calibration(flat_dir)
    assert {c.split for c in cals.values()} == {"flat/in_dist"} and {c.seed for c in cals.values()} == {VAL_SEED}
    # The same fit by hand on flat scenes gives the recorded threshold: the CLI read flat/in_dist scenes.
    rt = Runtime.from_pretrained(flat_dir, load_calibration=False)
    direct = fit_ood(rt.model, n_images=4, scorers=("recon_error",), split="flat/in_dist")["recon_error"]
    assert direct.split == "flat/in_dist" and direct.threshold == pytest.approx(cals["recon_error"].threshold)
    scorer = ood.make_scorer("recon_error")
    scorer.fit(scene_features(rt.model, "flat/in_dist", 4, VAL_SEED))
    held_out = scene_features(rt.model, "flat/in_dist", 4, VAL_SEED, start=4)
    assert ood.calibrate(scorer, held_out, n_images=4).threshold == pytest.approx(direct.threshold)
    with pytest.raises(ConfigError, match="training split"):
        fit_ood(rt.model, n_images=4, split="flat/photo_background")


def test_flat_eval_uses_the_flat_ood_splits_and_far_pair(flat_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ood_eval.json"
    assert main(["ood", "eval", "--model", str(flat_dir), "--n-images", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["splits"]) == list(FLAT_OOD_SPLITS)
    assert report["in_dist_split"] == "flat/in_dist"
    assert report["far_shift"]["splits"] == list(FLAT_PAIR)
    assert set(report["far_shift"]["best_per_split"]) == set(FLAT_PAIR)


def test_eval_refuses_calibrations_from_another_world(flat_dir: Path) -> None:
    rt = Runtime.from_pretrained(flat_dir)
    with pytest.raises(ConfigError, match="ood fit"):
        eval_ood(rt.model, ood.load_calibration(flat_dir), in_dist="in_dist", splits=("unseen_shapes",), n_images=1)


def test_gate_streams_flat_scenes_and_rejects_other_worlds_shifts(flat_dir: Path, tmp_path: Path, capsys) -> None:
    report = bench_gate(str(flat_dir), n_images=1, steps=1)
    assert report["stream"]["shifts"] == list(DEFAULT_SHIFTS["flat/in_dist"]) == list(FLAT_PAIR)
    assert [r["split"] for r in report["per_image"]] == ["flat/in_dist", "flat/photo_background"]
    assert set(report["per_split"]) == {"flat/in_dist", "flat/photo_background"}
    with pytest.raises(ConfigError) as err:
        bench_gate(str(flat_dir), n_images=1, steps=1, shifts=["textured_background"])
    assert "'textured_background'" in str(err.value) and all(s in str(err.value) for s in FLAT_OOD_SPLITS)
    bad = ["bench", "gate", "--model", str(flat_dir), "--n-images", "1", "--steps", "1", "--shifts", "unseen_colours"]
    assert main(bad) != 0
    assert "flat/photo_background" in capsys.readouterr().err
    stream = mixed_stream(2, ["flat/crowding"], seed=5, size=16, in_dist="flat/in_dist")
    assert [s for s, _, _ in stream] == ["flat/in_dist", "flat/crowding"] * 2
    assert set(resolve_shifts("flat/in_dist", None)) <= set(FLAT_SPLITS)
    with pytest.raises(ConfigError, match="no shifts given"):
        resolve_shifts("flat/in_dist", [])


def test_a_shapes_world_model_keeps_the_shapes_splits(shapes_dir: Path, tmp_path_factory, runtime: Runtime) -> None:
    assert train_split_of(runtime.card) == "in_dist"  # the shipped model's card records no train_split
    assert train_split_of(_card(shapes_dir)) == "in_dist"
    assert resolve_shifts("in_dist", None) == ("textured_background", "unseen_colours")
    with pytest.raises(ConfigError, match="unseen_colours"):
        resolve_shifts("in_dist", ["flat/photo_background"])
    assert [s for s, _, _ in mixed_stream(1, ["unseen_colours"], seed=5, size=16)] == ["in_dist", "unseen_colours"]
    assert main(["ood", "fit", "--model", str(shapes_dir), "--n-images", "4"]) == 0
    assert {c.split for c in ood.load_calibration(shapes_dir).values()} == {"in_dist"}
    out = tmp_path_factory.mktemp("report") / "ood_eval.json"
    assert main(["ood", "eval", "--model", str(shapes_dir), "--n-images", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["splits"]) == list(OOD_SPLITS) and "in_dist_split" not in report
    assert report["far_shift"]["splits"] == list(SHAPES_PAIR)
