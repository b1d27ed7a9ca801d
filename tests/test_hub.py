"""The model repository and the recipe folder: lookup by name or path, card validation, weights safety."""

from __future__ import annotations

import json
import os
import pathlib
import tomllib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tta_runtime.hub as hub
from tta_runtime import Runtime
from tta_runtime.config import AdaptConfig, ModelCard, OODStats, Preprocessing, SegmenterConfig, WeightsSpec
from tta_runtime.errors import ConfigError, ModelLoadError, UnknownNameError
from tta_runtime.hub import (
    DEFAULT_MODEL,
    find_model,
    list_models,
    list_recipes,
    load_card,
    load_recipe,
    sample_image_path,
    sha256_file,
)
from tta_runtime.adapt.methods import METHODS
from tta_runtime.models.segmenter import SlotSegmenter

TINY = SegmenterConfig(
    resolution=16, num_slots=3, slot_dim=16, encoder_channels=8, encoder_layers=2, decoder_width=16, decoder_blocks=1
)
TINY_NAME = "tiny-test-model"


def tiny_state() -> dict[str, torch.Tensor]:
    """The tiny segmenter's state dict, the same on every call (seed 0)."""
    torch.manual_seed(0)
    return {k: v.detach().contiguous() for k, v in SlotSegmenter(TINY).state_dict().items()}


def write_card(folder: pathlib.Path, weights_file: str, **changes: object) -> pathlib.Path:
    """Write `folder/card.json` for `weights_file` (its sha256 computed now); `changes` edit top-level fields."""
    card = ModelCard(
        name=TINY_NAME,
        description="tiny test model",
        segmenter=TINY,
        preprocessing=Preprocessing(size=TINY.resolution),
        weights=WeightsSpec(file=weights_file, sha256=sha256_file(folder / weights_file)),
        ood=OODStats(recon_mse_mean=0.05, recon_mse_std=0.01, n_images=8),
    )
    data = card.model_dump(mode="json")
    data.update(changes)
    (folder / "card.json").write_text(json.dumps(data, indent=2))
    return folder / "card.json"


def resign(folder: pathlib.Path) -> None:
    """Update the card's sha256 to the weights file as it is now (a 'deliberate replacement')."""
    data = json.loads((folder / "card.json").read_text())
    data["weights"]["sha256"] = sha256_file(folder / data["weights"]["file"])
    (folder / "card.json").write_text(json.dumps(data))


@pytest.fixture
def tiny_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """`tmp_path/repo/tiny-test-model/` with card.json + weights.safetensors (a 3-slot 16x16 segmenter)."""
    folder = tmp_path / "repo" / TINY_NAME
    folder.mkdir(parents=True)
    save_file(tiny_state(), str(folder / "weights.safetensors"))
    write_card(folder, "weights.safetensors")
    return folder


@pytest.fixture(autouse=True)
def _no_user_repositories(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the shipped repository unless they set the variables themselves."""
    monkeypatch.delenv("TTA_RUNTIME_MODELS", raising=False)
    monkeypatch.delenv("TTA_RUNTIME_ADAPTERS", raising=False)


def _gray16() -> np.ndarray:
    return np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Finding models


def test_default_model_is_listed_and_loads_by_default():
    assert DEFAULT_MODEL == "slot-flat-64"
    assert DEFAULT_MODEL in list_models()
    rt = Runtime.from_pretrained()
    assert rt.name == DEFAULT_MODEL
    assert rt.folder is not None and rt.folder.name == DEFAULT_MODEL
    assert rt.recipe.name == rt.card.default_recipe == "slot_tta_flat"
    # its demo sample is a scene of its own world; a model without one gets the package's bundled sample
    assert sample_image_path(DEFAULT_MODEL) == rt.folder / "demo_sample.png" and sample_image_path(DEFAULT_MODEL).is_file()
    assert sample_image_path("slot-shapes-32") == sample_image_path() != sample_image_path(DEFAULT_MODEL)


@pytest.mark.parametrize("name", list_models())
def test_every_shipped_model_card_validates_and_its_weights_match(name: str):
    folder = find_model(name)
    if json.loads((folder / "card.json").read_text()).get("task") == "encoder":  # a pretrained encoder's own card
        from tta_runtime.models.encoder_folder import load_encoder

        encoder_card, _ = load_encoder(folder)  # validated, sha256 checked, the weights fit
        assert encoder_card.name == name == folder.name
        with pytest.raises(ModelLoadError, match="pretrained encoder"):
            load_card(folder)
        return
    card = load_card(folder)
    assert card.name == name == folder.name
    assert sha256_file(folder / card.weights.file) == card.weights.sha256
    if card.task == "segmentation":
        assert card.ood is not None  # the segmenter's default OOD score needs the in-distribution statistics
    assert card.default_recipe in list_recipes()


def test_load_by_folder_card_path_and_weights_path(tiny_folder: pathlib.Path):
    for where in (tiny_folder, str(tiny_folder), tiny_folder / "card.json", tiny_folder / "weights.safetensors"):
        rt = Runtime.from_pretrained(where)
        assert rt.name == TINY_NAME
        assert rt.folder == tiny_folder
        assert rt.input_size == 16
        res = rt.predict(_gray16())
        assert res.masks.shape == (3, 16, 16)
        np.testing.assert_allclose(res.masks.sum(0), 1.0, atol=1e-5)


def test_loaded_weights_are_the_saved_ones(tiny_folder: pathlib.Path):
    rt = Runtime.from_pretrained(tiny_folder)
    expected = tiny_state()
    got = rt.model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_models_env_var_adds_a_repository(tiny_folder: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    assert TINY_NAME not in list_models()
    with pytest.raises(UnknownNameError):
        find_model(TINY_NAME)
    other = tiny_folder.parent.parent / "empty-repo"
    other.mkdir()
    monkeypatch.setenv("TTA_RUNTIME_MODELS", os.pathsep.join([str(other), str(tiny_folder.parent)]))
    assert TINY_NAME in list_models() and DEFAULT_MODEL in list_models()  # added, not replaced
    assert find_model(TINY_NAME) == tiny_folder
    assert Runtime.from_pretrained(TINY_NAME).name == TINY_NAME


def test_models_env_repository_comes_before_the_shipped_one(tiny_folder: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    shadow = tiny_folder.parent / DEFAULT_MODEL
    tiny_folder.rename(shadow)
    monkeypatch.setenv("TTA_RUNTIME_MODELS", str(shadow.parent))
    assert find_model(DEFAULT_MODEL) == shadow
    assert list_models().count(DEFAULT_MODEL) == 1
    assert Runtime.from_pretrained().card.segmenter == TINY


def test_folder_without_a_card_json_is_not_a_model(tiny_folder: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    (tiny_folder / "card.json").unlink()
    with pytest.raises(ModelLoadError, match=r"holds no card\.json"):
        Runtime.from_pretrained(tiny_folder)
    with pytest.raises(ModelLoadError, match=r"no card\.json beside it"):
        Runtime.from_pretrained(tiny_folder / "weights.safetensors")
    monkeypatch.setenv("TTA_RUNTIME_MODELS", str(tiny_folder.parent))
    assert TINY_NAME not in list_models()  # the repository lists only folders with a card


def test_missing_paths_say_no_such_file():
    with pytest.raises(ModelLoadError, match="no such model file or folder"):
        find_model(os.path.join("nowhere", "model"))
    with pytest.raises(ModelLoadError, match="no such model file or folder"):
        find_model("ghost.safetensors")


# ----------------------------------------------------------------------------------------------------
# Unknown names


def test_unknown_model_name_lists_known_and_suggests_the_closest():
    with pytest.raises(UnknownNameError) as info:
        Runtime.from_pretrained("slot-shapes-3")
    msg = str(info.value)
    assert "'slot-shapes-3'" in msg
    assert "known models: " in msg and DEFAULT_MODEL in msg
    assert msg.endswith("did you mean 'slot-shapes-32'?")
    assert isinstance(info.value, KeyError)  # catchable as a lookup failure too


def test_unknown_model_far_from_any_name_has_no_suggestion():
    with pytest.raises(UnknownNameError) as info:
        find_model("zzzzzzzz")
    assert "did you mean" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Bad cards


def _edit_card(folder: pathlib.Path, edit) -> None:  # noqa: ANN001 - a small callable on the dict
    data = json.loads((folder / "card.json").read_text())
    edit(data)
    (folder / "card.json").write_text(json.dumps(data))


def test_card_with_an_unknown_field_names_it(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d.update(num_slotz=4))
    with pytest.raises(ModelLoadError) as info:
        Runtime.from_pretrained(tiny_folder)
    msg = str(info.value)
    assert "num_slotz" in msg and "unknown field" in msg
    assert str(tiny_folder / "card.json") in msg


def test_card_with_an_unknown_nested_field_names_its_path(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d["segmenter"].update(heads=4))
    with pytest.raises(ModelLoadError, match=r"segmenter\.heads: unknown field"):
        load_card(tiny_folder)


def test_card_with_a_wrong_typed_field_names_field_and_value(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d["segmenter"].update(num_slots="three"))
    with pytest.raises(ModelLoadError) as info:
        load_card(tiny_folder)
    msg = str(info.value)
    assert "segmenter.num_slots" in msg and "'three'" in msg


def test_card_with_inconsistent_size_is_refused(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d["preprocessing"].update(size=32))
    with pytest.raises(ModelLoadError, match=r"preprocessing\.size \(32\) must equal segmenter\.resolution \(16\)"):
        load_card(tiny_folder)


def test_card_that_is_not_json_names_the_file(tiny_folder: pathlib.Path):
    (tiny_folder / "card.json").write_text('{"name": "tiny-test-model", ')
    with pytest.raises(ModelLoadError) as info:
        Runtime.from_pretrained(tiny_folder)
    assert "cannot read model card" in str(info.value)
    assert str(tiny_folder / "card.json") in str(info.value)


def test_card_naming_a_missing_weights_file(tiny_folder: pathlib.Path):
    (tiny_folder / "weights.safetensors").rename(tiny_folder / "other.safetensors")
    with pytest.raises(ModelLoadError, match="weights file .*weights.safetensors named by the card is missing"):
        Runtime.from_pretrained(tiny_folder)


# ----------------------------------------------------------------------------------------------------
# Weights safety


def _flip_one_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


CORRUPTIONS = {
    "one_byte_flipped": _flip_one_byte,
    "truncated": lambda data: data[: len(data) // 2],
    "random_bytes": lambda data: np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_weights_fail_the_checksum(tiny_folder: pathlib.Path, corruption: str):
    path = tiny_folder / "weights.safetensors"
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with pytest.raises(ModelLoadError) as info:
        Runtime.from_pretrained(tiny_folder)
    msg = str(info.value)
    assert "sha256" in msg and "corrupt" in msg and str(path) in msg


@pytest.mark.parametrize("corruption", ["truncated", "random_bytes"])
def test_unparseable_weights_with_a_matching_checksum_are_a_clean_load_error(tiny_folder: pathlib.Path, corruption: str):
    path = tiny_folder / "weights.safetensors"
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    resign(tiny_folder)  # the checksum passes: parsing is what must fail, cleanly
    with pytest.raises(ModelLoadError) as info:
        Runtime.from_pretrained(tiny_folder)
    assert type(info.value) is ModelLoadError
    assert f"cannot load weights {path}" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no raw safetensors chain


def test_deliberately_replaced_weights_load_once_the_card_is_updated(tiny_folder: pathlib.Path):
    """The checksum is the integrity guard: a flipped data byte with an updated card is a deliberate change."""
    path = tiny_folder / "weights.safetensors"
    path.write_bytes(_flip_one_byte(path.read_bytes()))  # the middle byte lies in the tensor data
    resign(tiny_folder)
    rt = Runtime.from_pretrained(tiny_folder)
    got, saved = rt.model.state_dict(), tiny_state()
    assert sum(not torch.equal(got[k], saved[k]) for k in saved) == 1
    assert rt.predict(_gray16()).masks.shape == (3, 16, 16)


class _Payload:
    """Pickles to a call that writes a marker file: what a malicious checkpoint would do on load."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_runs_no_code(tiny_folder: pathlib.Path, tmp_path: pathlib.Path):
    marker = tmp_path / "pwned.txt"
    state = tiny_state()
    state["evil"] = _Payload(marker)  # type: ignore[assignment]
    torch.save(state, tiny_folder / "weights.pt")
    (tiny_folder / "weights.safetensors").unlink()
    write_card(tiny_folder, "weights.pt")  # the checksum matches: only weights_only stands in the way
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        Runtime.from_pretrained(tiny_folder)
    assert not marker.exists()

    # The payload is real: the call it pickles to writes the marker (which is why the runtime never unpickles).
    fn, args = _Payload(marker).__reduce__()
    fn(*args)
    assert marker.read_text() == "pwned"


def test_pt_state_dict_loads_through_weights_only(tiny_folder: pathlib.Path):
    torch.save(tiny_state(), tiny_folder / "weights.pt")
    (tiny_folder / "weights.safetensors").unlink()
    write_card(tiny_folder, "weights.pt")
    rt = Runtime.from_pretrained(tiny_folder / "weights.pt")
    for k, v in tiny_state().items():
        torch.testing.assert_close(rt.model.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "payload",
    [torch.zeros(3), {"model": {"w": torch.zeros(3)}}, [torch.zeros(3)]],
    ids=["bare_tensor", "nested_dict", "list"],
)
def test_pt_file_that_is_not_a_flat_state_dict_is_refused(tiny_folder: pathlib.Path, payload: object):
    torch.save(payload, tiny_folder / "weights.pt")
    write_card(tiny_folder, "weights.pt")
    with pytest.raises(ModelLoadError, match="does not hold a flat state dict of tensors"):
        Runtime.from_pretrained(tiny_folder)


def test_weights_that_do_not_fit_the_architecture(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d["segmenter"].update(num_slots=4))
    with pytest.raises(ModelLoadError) as info:
        Runtime.from_pretrained(tiny_folder)
    msg = str(info.value)
    assert "do not fit the card's architecture" in msg
    assert "slot_attention.slots_init" in msg and "size mismatch" in msg


def test_weights_with_a_missing_tensor_are_refused(tiny_folder: pathlib.Path):
    state = tiny_state()
    del state["decoder.coord.weight"]
    save_file(state, str(tiny_folder / "weights.safetensors"))
    resign(tiny_folder)
    with pytest.raises(ModelLoadError, match="decoder.coord.weight"):
        Runtime.from_pretrained(tiny_folder)


# ----------------------------------------------------------------------------------------------------
# Recipes


def test_shipped_recipes_are_listed():
    assert {"slot_tta", "slot_tta_fast", "entropy"} <= set(list_recipes())


def test_default_recipe_is_the_faithful_slot_tta():
    r = load_recipe("slot_tta")
    assert r.name == "slot_tta"
    assert (r.method, r.steps, r.lr, r.params, r.optimizer) == ("slot_reconstruction", 150, 5e-4, "all", "adam")
    assert (r.pixel_fraction, r.early_stop_patience, r.mode) == (1.0, None, "episodic")  # no speed levers


def test_entropy_baseline_differs_from_slot_tta_only_in_the_loss():
    a, b = load_recipe("slot_tta").model_dump(), load_recipe("entropy").model_dump()
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"name", "description", "method"}
    assert b["method"] == "slot_mask_entropy"


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates_and_names_a_registered_method(name: str):
    path = hub.find_recipe(name)
    raw = tomllib.loads(path.read_text())
    assert set(raw) <= set(AdaptConfig.model_fields)  # no key silently ignored
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.method in METHODS
    assert recipe.description


def test_recipe_from_a_toml_path(tmp_path: pathlib.Path):
    path = tmp_path / "mine.toml"
    path.write_text('method = "slot_mask_entropy"\nsteps = 7\nlr = 1e-3\nparams = "decoder"\n')
    r = load_recipe(path)
    assert (r.name, r.method, r.steps, r.lr, r.params) == ("mine", "slot_mask_entropy", 7, 1e-3, "decoder")
    assert load_recipe(str(path)).steps == 7


def test_recipe_overrides_are_validated():
    assert load_recipe("slot_tta", steps=3).steps == 3
    with pytest.raises(ConfigError, match="steps"):
        load_recipe("slot_tta", steps=-1)
    with pytest.raises(ConfigError, match="stepz: unknown field"):
        load_recipe("slot_tta", stepz=3)


def test_recipe_with_an_unknown_key_names_it(tmp_path: pathlib.Path):
    path = tmp_path / "typo.toml"
    path.write_text('method = "slot_reconstruction"\nlearning_rate = 0.01\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert "learning_rate: unknown field" in str(info.value)
    assert "typo.toml" in str(info.value)


def test_recipe_with_a_wrong_value_names_field_and_value(tmp_path: pathlib.Path):
    path = tmp_path / "bad.toml"
    path.write_text('optimizer = "rmsprop"\n')
    with pytest.raises(ConfigError, match=r"optimizer: .*'rmsprop'"):
        load_recipe(path)


def test_recipe_that_is_not_toml(tmp_path: pathlib.Path):
    path = tmp_path / "broken.toml"
    path.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="cannot read recipe .*broken.toml"):
        load_recipe(path)


def test_missing_recipe_file_and_unknown_recipe_name(tmp_path: pathlib.Path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.toml")
    with pytest.raises(UnknownNameError) as info:
        load_recipe("slot_ta")
    assert "known recipes: " in str(info.value) and "did you mean 'slot_tta'?" in str(info.value)


def test_adapters_env_var_adds_recipes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "quick.toml").write_text("steps = 2\n")
    monkeypatch.setenv("TTA_RUNTIME_ADAPTERS", str(tmp_path))
    assert "quick" in list_recipes() and "slot_tta" in list_recipes()
    assert load_recipe("quick").steps == 2


def test_card_default_recipe_is_used_by_from_pretrained(tiny_folder: pathlib.Path):
    _edit_card(tiny_folder, lambda d: d.update(default_recipe="slot_tta_fast"))
    assert Runtime.from_pretrained(tiny_folder).recipe.name == "slot_tta_fast"
    assert Runtime.from_pretrained(tiny_folder, recipe="entropy").recipe.name == "entropy"
