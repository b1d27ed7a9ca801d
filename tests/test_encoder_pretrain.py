"""The pretrained encoder: masked-image-modelling pretraining of the U-Net body, its own model folder
(card + sha256-checked safetensors), and a segmenter initialised from it by name or folder."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import tta_runtime as tta
from tta_runtime.cli.main import main
from tta_runtime.config import SegmenterConfig
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.models.encoder_folder import HEAD_PREFIX, EncoderArch, body_init, load_encoder
from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.models.unet_body import UNetBody
from tta_runtime.training.pretrain import PretrainConfig, masked_mse, mim_batch

TINY = PretrainConfig(model=EncoderArch(resolution=32, base_channels=8, depth=2), batch=4, steps=3)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("enc")
    args = ["train", "encoder", "--out", str(root / "enc"), "--run-dir", str(root / "run"), "--steps", "3", "--batch", "4",
            "--resolution", "32", "--base-channels", "8", "--name", "tiny-mim", "--no-progress"]
    assert main(args) == 0
    return root / "enc"


def test_mim_batch_mixes_scenes_and_photos_and_is_reproducible() -> None:
    images, hidden = mim_batch(TINY, 5, 0)
    assert images.shape == (4, 3, 32, 32) and hidden.shape == (4, 1, 32, 32)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert set(hidden.unique().tolist()) <= {0.0, 1.0}
    # whole 8x8 patches are hidden: every patch is all 0 or all 1
    patches = hidden.unfold(2, 8, 8).unfold(3, 8, 8)
    assert torch.equal(patches.amax((-1, -2)), patches.amin((-1, -2)))
    again = mim_batch(TINY, 5, 0)
    assert torch.equal(images, again[0]) and torch.equal(hidden, again[1])
    assert not torch.equal(images, mim_batch(TINY, 6, 0)[0])


def test_masked_mse_is_the_error_over_hidden_pixels_only() -> None:
    torch.manual_seed(0)
    body = UNetBody(32, 3, 8, 2)
    images, _ = mim_batch(TINY, 0, 0)
    hidden = torch.zeros(4, 1, 32, 32)
    hidden[:, :, 8:16, 16:24] = 1  # one patch per image
    with torch.no_grad():
        pred = body(images * (1 - hidden) + 0.5 * hidden)
        expected = ((pred - images)[:, :, 8:16, 16:24] ** 2).mean()
        assert float(masked_mse(body, images, hidden)) == pytest.approx(float(expected), rel=1e-5)


def test_pretraining_lowers_the_masked_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    body = UNetBody(32, 3, 8, 2)
    opt = torch.optim.Adam(body.parameters(), lr=3e-3)
    images, hidden = mim_batch(TINY, 0, 0)
    first = None
    for _ in range(25):
        loss = masked_mse(body, images, hidden)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(masked_mse(body, images, hidden)) < 0.7 * first


def test_the_encoder_folder_loads_checked_and_is_not_a_runnable_model(encoder: pathlib.Path) -> None:
    card, body = load_encoder(encoder)
    assert card.task == "encoder" and card.name == "tiny-mim" and card.model.base_channels == 8
    assert card.training["steps_done"] == 3 and "scikit-image" in card.training["data"]
    assert isinstance(body, UNetBody) and body.head.out_channels == 3
    with pytest.raises(ModelLoadError, match="pretrained encoder.*--init-encoder"):
        tta.Runtime.from_pretrained(encoder)


def test_a_tampered_encoder_is_refused(encoder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "card.json").write_text((encoder / "card.json").read_text())
    data = bytearray((encoder / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_encoder(bad)


def test_body_init_copies_everything_but_the_head(encoder: pathlib.Path) -> None:
    _, body = load_encoder(encoder)
    seg = SlotSegmenter(SegmenterConfig(resolution=32, num_slots=4, encoder="unet", encoder_channels=8))
    head_before = {k: v.clone() for k, v in seg.encoder.convs.state_dict().items() if k.startswith(HEAD_PREFIX)}
    source = body_init(seg.encoder.convs, encoder)
    card = json.loads((encoder / "card.json").read_text())
    assert source == {"name": "tiny-mim", "sha256": card["weights"]["sha256"]}
    for k, v in seg.encoder.convs.state_dict().items():
        if k.startswith(HEAD_PREFIX):
            assert torch.equal(v, head_before[k])  # the segmenter's own head (slot_dim wide) is kept
        else:
            assert torch.equal(v, body.state_dict()[k]), k


def test_a_body_of_another_shape_is_refused_with_the_fix(encoder: pathlib.Path) -> None:
    seg = SlotSegmenter(SegmenterConfig(resolution=32, num_slots=4, encoder="unet", encoder_channels=16))
    with pytest.raises(ConfigError, match="base 8.*--base-channels 16"):
        body_init(seg.encoder.convs, encoder)


def test_train_segmenter_refuses_an_encoder_for_the_conv_encoder(encoder: pathlib.Path, tmp_path: pathlib.Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "segmenter", "--out", str(tmp_path / "m"), "--run-dir", str(tmp_path / "r"), "--steps", "1",
            "--batch", "2", "--resolution", "32", "--init-encoder", str(encoder), "--no-progress"]
    assert main(args) == 2
    assert "needs encoder='unet'" in capsys.readouterr().err


def test_info_shows_the_encoder_card(encoder: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(encoder)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["task"] == "encoder" and card["model"] == {"resolution": 32, "base_channels": 8, "depth": 2}
