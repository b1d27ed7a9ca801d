"""The HTTP API's request options and response bodies (pydantic; the OpenAPI schema is generated from them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RequestOptions(_Model):
    """Query parameters of `/v1/predict` and `/v1/adapt` (or fields beside `image` in a JSON body)."""

    model: str | None = Field(None, max_length=256, description="a loaded model's name (GET /v1/models); default: the first")
    overlay: bool = Field(False, description="add the overlay PNG (the input with each slot or the label drawn over it)")
    top_k: int = Field(5, ge=1, le=1000, description="classifiers: how many classes `top_k` lists")
    steps: int | None = Field(None, ge=0, description="adapt: gradient steps (default: the recipe's; at most the server's max_steps)")
    lr: float | None = Field(None, gt=0, le=1, description="adapt: learning rate (default: the recipe's)")
    recipe: str | None = Field(None, max_length=128, description="adapt: a shipped recipe name (GET /v1/models lists them)")
    adapt: Literal["always", "never", "when_ood"] | None = Field(
        None, description="adapt: always (default), never, or only when the input scores out of distribution")


class ImageJSON(RequestOptions):
    """A JSON request body: the image as base64 (optionally a data: URL), and any `RequestOptions`."""

    image: str = Field(..., description="base64 of a PNG, JPEG, WebP or BMP file (a data:image/...;base64, prefix is accepted)")


class OOD(_Model):
    score: float | None = Field(..., description="distance from the training data before adaptation (higher = further)")
    scorer: str
    is_ood: bool | None = Field(..., description="score above the calibrated threshold; null when the model has no calibration")
    threshold: float | None


class Adaptation(_Model):
    recipe: str
    method: str
    mode: Literal["episodic", "continual"]
    steps_requested: int
    steps_run: int
    losses: list[float | None] = Field(..., description="the loss before each update (null: not finite)")
    final_loss: float | None
    stopped_early: bool
    rolled_back: bool
    rollback_reason: str | None
    skipped: str | None = Field(..., description="why no step ran (adapt=never, or in distribution with adapt=when_ood)")
    reset: bool = Field(..., description="continual: the model went back to its loaded weights after this input")
    time_s: float


class Segmentation(_Model):
    width: int
    height: int
    num_slots: int
    slots_used: int
    slot_areas: list[float] = Field(..., description="share of the image's pixels each slot wins, per slot id")
    label_map_png: str = Field(..., description="base64 PNG, 8-bit gray, (height, width): each pixel's slot id")
    recon_mse: float | None


class TopK(_Model):
    label: int
    name: str
    prob: float


class Classification(_Model):
    label: int
    label_name: str
    confidence: float
    top_k: list[TopK]
    probs: list[float]


class SessionInfo(_Model):
    id: str
    status: Literal["new", "continued", "restarted_after_eviction", "restarted_after_expiry",
                    "restarted_on_another_replica"] = Field(
        ..., description="restarted_*: this id's earlier state was dropped (LRU eviction, idle expiry, or the frame "
        "reached another replica than the one holding it: that one died or was saturated); it starts again from the "
        "loaded weights")
    frame: int = Field(..., description="frames this session has sent, this one included")


class PredictResponse(_Model):
    request_id: str
    model: str
    task: Literal["segmentation", "classification"]
    image_size: list[int] = Field(..., description="[height, width] of the input")
    ood: OOD
    adaptation: Adaptation | None
    segmentation: Segmentation | None
    classification: Classification | None
    overlay_png: str | None = Field(None, description="base64 PNG (with ?overlay=1)")
    session: SessionInfo | None = None
    timings: dict[str, float]
    replica: str | None = Field(None, description="the replica that answered (Ray Serve; also the X-Replica-Id header)")
    batched: int | None = Field(None, description="requests that shared this forward pass (Ray Serve batching); null: alone")


class ModelInfo(_Model):
    name: str
    task: str
    input_size: int
    default: bool
    default_recipe: str
    default_steps: int = Field(..., description="steps the default recipe runs when a request gives none")
    num_slots: int | None
    labels: list[str]
    calibrated: bool
    workers: int
    weights_fingerprint: list[str] = Field(..., description="sha256 of each worker's current weights (episodic: the loaded ones)")


class ModelsResponse(_Model):
    models: list[ModelInfo]
    recipes: list[str]
    sessions: int | None = Field(..., description="continual sessions held (null where replicas hold them: Ray Serve)")
    max_sessions: int
    max_steps: int = Field(..., description="the most `steps` a request may ask for")


class ErrorBody(_Model):
    status: int
    type: str
    message: str
    field: str | None = None


class ErrorResponse(_Model):
    error: ErrorBody
    request_id: str


class Ready(_Model):
    ready: bool
    models: list[str]
    reason: str | None = None
