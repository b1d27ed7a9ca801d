"""Train a digits classifier on the clean "train" split and write its model folder (card, weights, Fisher).

Recipe (run by the shared loop, ``tta_runtime.training.loop``): Adam with a cosine learning-rate decay to
zero, light geometric augmentation (``augment``: rotation within +-10 degrees, translation within +-2 px,
bilinear, black fill; no corruption from ``tta_runtime.data.digits``: those are the test shift), and, when the config has a rotation head, the TTT joint loss (Sun et al., ICML
2020): cross-entropy of the class on the augmented batch + cross-entropy of the rotation on a copy of it
turned by a random multiple of 90 degrees. The rotated copy is normalised with its own batch statistics
(``stat_mode='batch'``) so the BatchNorm running statistics describe upright digits only. The epoch with
the best val accuracy (ties: lower val loss, then the later epoch) is kept.

The model folder then gets:

- ``weights.safetensors``: the state dict (BatchNorm running statistics included);
- ``fisher.safetensors``: the diagonal Fisher information of the norm layers' affine parameters, for EATA's
  anti-forgetting term (Niu et al., ICML 2022): the mean over the val images of the squared gradient of
  the cross-entropy against the model's own argmax label. Each image is its own batch and BatchNorm uses the
  source statistics (EATA's code averages batch gradients of 64 images in train mode instead);
- ``train_log.jsonl``: one line per epoch;
- ``card.json``: the ``ModelCard`` with provenance and the clean and severity-5 corruption metrics.

Everything is seeded and runs on the CPU; with one thread (``OMP_NUM_THREADS=1``) the result is
bit-for-bit repeatable. The command line to this module lives in ``tta_runtime.cli``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tta_runtime.config import ClassifierConfig, ModelCard, Preprocessing, WeightsSpec
from tta_runtime.data.digits import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTION_NAMES,
    LABELS,
    corrupt,
    load_digits,
)
from tta_runtime.device import import_cv2
from tta_runtime.errors import ConfigError
from tta_runtime.files import atomic_write, writable_path
from tta_runtime.hub import sha256_file
from tta_runtime.models.classifier import (
    CNNClassifier,
    build_classifier,
    images_to_tensor,
    rotate_quarters,
    set_norm_mode,
)
from tta_runtime.training.loop import Optimized, Shuffled, StepOutput, train_loop
from tta_runtime.training.provenance import hardware
from tta_runtime.training.schedule import Schedule

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIG",
    "accuracy",
    "augment",
    "diagonal_fisher",
    "train_classifier",
    "write_classifier_folder",
]

# The shipped digits models: small enough for a few minutes of training on one CPU core.
DEFAULT_CONFIG = ClassifierConfig(resolution=32, widths=(16, 32, 64), groups=8, rotation_head=True)
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_PX = 2.0  # at 32x32; scaled with the resolution
EVAL_SEVERITY = 5
CORRUPTION_SEED = 0  # the seed of the corrupted test images in the card's metrics
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def train_classifier(
    cfg: ClassifierConfig,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    out: Path,
    command: str,
    progress: bool = True,
) -> Path:
    """Train ``cfg`` on the digits "train" split and write the model folder ``out`` (named after it).

    Returns ``out``. ``command`` is recorded in the card as the provenance of the weights.
    """
    out = Path(out)
    if not _NAME.match(out.name):
        raise ConfigError(
            f"the model folder's name is the model's name: lowercase letters, digits, '_.-'; got {out.name!r}"
        )
    if epochs < 1 or batch < 1 or not lr > 0:
        raise ConfigError(f"need epochs >= 1, batch >= 1 and lr > 0; got epochs={epochs}, batch={batch}, lr={lr}")
    if cfg.in_channels != 3 or cfg.num_classes != len(LABELS):
        raise ConfigError(f"the digits are RGB with {len(LABELS)} classes: need in_channels=3, num_classes=10")

    x_train, y_train = load_digits("train", cfg.resolution)
    x_val, y_val = load_digits("val", cfg.resolution)
    x_test, y_test = load_digits("test", cfg.resolution)

    with torch.random.fork_rng():  # seeded initialisation without moving the caller's global generator
        torch.manual_seed(seed)
        model = build_classifier(cfg)
    rng = np.random.default_rng([seed, 1])  # shuffling, augmentation and rotation labels
    batches = Shuffled(len(x_train), batch, rng)
    spe = batches.steps_per_epoch
    total_steps = epochs * spe
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step_fn(step: int) -> StepOutput:
        idx = batches(step)
        x = images_to_tensor(augment(x_train[idx], rng))  # (B, 3, S, S) in [0, 1]
        y = torch.from_numpy(y_train[idx])
        logits = model(x).logits
        class_loss = F.cross_entropy(logits, y)
        loss, rotation = class_loss, 0.0
        if model.rot_head is not None:
            k = torch.from_numpy(rng.integers(0, 4, len(idx)))
            set_norm_mode(model, "batch")  # rotated copies must not enter the running statistics
            rotation_loss = F.cross_entropy(model.rotation_logits(rotate_quarters(x, k)), k)
            set_norm_mode(model, "train")
            loss = loss + rotation_loss
            rotation = rotation_loss.item()
        accuracy = int((logits.argmax(1) == y).sum()) / len(idx)
        return StepOutput(
            loss, {"loss": loss.item(), "class_loss": class_loss.item(), "rotation_loss": rotation, "accuracy": accuracy},
            weight=len(idx),
        )

    best: list[tuple[tuple[float, float, int], dict[str, torch.Tensor]]] = []

    def validate(step: int) -> dict[str, float]:
        val_acc, val_loss = _evaluate(model, x_val, y_val)
        key = (val_acc, -val_loss, step // spe)
        if not best or key > best[0][0]:
            best[:] = [(key, {k: v.detach().clone() for k, v in model.state_dict().items()})]
        return {"val_accuracy": val_acc, "val_loss": val_loss}

    t0, cpu0 = time.perf_counter(), time.process_time()
    set_norm_mode(model, "train")  # ordinary BatchNorm while training: batch statistics, running ones updated
    result = train_loop(
        model, step_fn, [Optimized(opt, Schedule(lr, total_steps))], steps=total_steps, log_every=spe,
        validate=validate, eval_every=spe, progress=progress, desc=f"train {out.name}", show=("loss",),
    )
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    log_lines = [
        {
            "epoch": r["step"] // spe, "lr": r["lr"], "train_loss": r["loss"], "train_class_loss": r["class_loss"],
            "train_rotation_loss": r["rotation_loss"], "train_accuracy": r["accuracy"],
            "val_accuracy": r["val_accuracy"], "val_loss": r["val_loss"], "seconds": r["seconds"],
        }
        for r in result.records
    ]
    model.load_state_dict(best[0][1])
    selected_epoch = best[0][0][2]
    set_norm_mode(model, "source")
    model.eval()

    log.info("selected epoch %d; computing the Fisher information and the corruption metrics", selected_epoch)
    fisher = diagonal_fisher(model, x_val)
    metrics = _metrics(model, x_val, y_val, x_test, y_test)
    rotation = " + cross-entropy of the rotation (0/90/180/270) of a turned copy (TTT joint training)"
    training = {
        "command": command,
        "seed": seed,
        "epochs": epochs,
        "selected_epoch": selected_epoch,
        "batch": batch,
        "optimizer": f"Adam lr {lr}, cosine decay to 0 over {total_steps} steps, no weight decay",
        "loss": "cross-entropy of the class" + (rotation if cfg.rotation_head else ""),
        "data": f"tta_runtime.data.digits 'train' split: {len(x_train)} sklearn digits (8x8 scans) upsampled to "
        f"{cfg.resolution}x{cfg.resolution}, RGB",
        "augmentation": f"random rotation within +-{MAX_ROTATION_DEG:g} degrees and translation within "
        f"+-{MAX_SHIFT_PX:g} px (at 32x32), bilinear, black fill; no corruptions",
        "selection": f"best val accuracy ('val' split, {len(x_val)} images; ties: lower val loss, later epoch)",
        "fisher": f"mean over the {len(x_val)} val images (one per batch, source statistics) of the squared gradient "
        "of the cross-entropy against the model's argmax label, for the norm layers' affine parameters",
        "seconds": round(train_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: the cost even on a shared core
        "hardware": hardware(),
        "torch": torch.__version__,
    }
    return write_classifier_folder(model, out, fisher=fisher, log_lines=log_lines, training=training, metrics=metrics)


def write_classifier_folder(
    model: CNNClassifier,
    out: Path,
    *,
    fisher: dict[str, torch.Tensor],
    log_lines: list[dict[str, Any]],
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write ``card.json``, ``weights.safetensors``, ``fisher.safetensors`` and ``train_log.jsonl`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    weights, fisher_file = out / "weights.safetensors", out / "fisher.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes a multi-key map in random order, so the sha256 would vary
    writable_path(weights, "weights file")
    writable_path(fisher_file, "Fisher file")
    save_file(state, str(weights), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(fisher_file), metadata={"format": "pt"})
    atomic_write(out / "train_log.jsonl", "".join(json.dumps(line) + "\n" for line in log_lines).encode(), "training log")
    cfg = model.cfg
    norm = {"batch": "BatchNorm", "group": f"GroupNorm({cfg.groups})", "layer": "GroupNorm(1)"}[cfg.norm]
    card = ModelCard(
        name=out.name,
        task="classification",
        architecture="cnn_classifier",
        description=f"CNN classifier ({norm}, widths {list(cfg.widths)}, rotation head) for sklearn's handwritten "
        f"digits at {cfg.resolution}x{cfg.resolution}; the shift benchmark is tta_runtime.data.digits' corruptions.",
        classifier=cfg,
        labels=list(LABELS),
        preprocessing=Preprocessing(size=cfg.resolution),
        weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)),
        fisher=WeightsSpec(file=fisher_file.name, sha256=sha256_file(fisher_file)),
        default_recipe="tent",
        training=training,
        metrics=metrics,
    )
    atomic_write(out / "card.json", (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode(), "model card")
    log.info("wrote %s", out)
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation


def accuracy(model: CNNClassifier, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256) -> float:
    """Top-1 accuracy on (N, S, S, 3) uint8 images, in eval() with BatchNorm on source statistics (no
    adaptation); the model's train/eval and statistics modes are restored afterwards."""
    return _evaluate(model, images, labels, batch_size=batch_size)[0]


def _evaluate(
    model: CNNClassifier, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) with BatchNorm on source statistics; restores the model's modes."""
    was_training = model.training
    modes = {m: m.stat_mode for m in model.modules() if hasattr(m, "stat_mode")}
    set_norm_mode(model, "source")
    model.eval()
    correct, loss = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            logits = model(images_to_tensor(images[i : i + batch_size])).logits
            y = torch.from_numpy(labels[i : i + batch_size])
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    for m, mode in modes.items():
        m.stat_mode = mode
    model.train(was_training)
    return correct / len(images), loss / len(images)


def diagonal_fisher(model: CNNClassifier, images: np.ndarray) -> dict[str, torch.Tensor]:
    """EATA's diagonal Fisher of ``norm_parameters(model)``: mean over images of grad^2 of CE(logits, argmax).

    ``images``: (N, S, S, 3) uint8. Each image is a batch of one; the model is used as it is set (the
    training script passes it in eval() with source statistics). Returns float32 tensors by parameter name.
    """
    from tta_runtime.adapt.fisher import fisher_information

    return fisher_information(model, ((images_to_tensor(images[i : i + 1]), None) for i in range(len(images))))


def _metrics(
    model: CNNClassifier,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> dict[str, Any]:
    test_acc = accuracy(model, x_test, y_test)
    errors = {}
    for name in CORRUPTION_NAMES:
        shifted = corrupt(x_test, name, EVAL_SEVERITY, seed=CORRUPTION_SEED)
        errors[name] = round(1.0 - accuracy(model, shifted, y_test), 6)
    return {
        "clean": {
            "val_accuracy": accuracy(model, x_val, y_val),
            "test_accuracy": test_acc,
            "test_correct": round(test_acc * len(x_test)),
            "n_val": len(x_val),
            "n_test": len(x_test),
        },
        "corruption_error_severity5": {
            "what": f"no adaptation, BatchNorm on source statistics; test split, "
            f"corrupt(..., severity={EVAL_SEVERITY}, seed={CORRUPTION_SEED})",
            "per_corruption": errors,
            "mean_benchmark": round(float(np.mean([errors[n] for n in BENCHMARK_CORRUPTIONS])), 6),
            "mean_all": round(float(np.mean(list(errors.values()))), 6),
        },
    }


# --------------------------------------------------------------------------------------------------
# Helpers


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotation (+-10 degrees) and translation (+-2 px at 32x32) of (N, S, S, 3) uint8 images, drawn
    from ``rng``: the training augmentation (also used by FTWT fine-tuning)."""
    cv2 = import_cv2()

    n, s = images.shape[0], images.shape[1]
    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n)
    shifts = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, (n, 2)) * s / 32
    out = np.empty_like(images)
    centre = ((s - 1) / 2, (s - 1) / 2)
    for i in range(n):
        m = cv2.getRotationMatrix2D(centre, float(angles[i]), 1.0)
        m[:, 2] += shifts[i]
        out[i] = cv2.warpAffine(
            images[i], m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return out


