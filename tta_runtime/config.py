"""Validated configuration: model cards, adaptation recipes and runtime options.

Everything here is a frozen pydantic v2 model that rejects unknown keys, so a typo in a card, a recipe
or an override fails loudly with the field's name instead of being ignored. A component receives only
its own section (the segmenter gets `SegmenterConfig`, the adaptation loop gets `AdaptConfig`).

Types are strict: no coercion of strings or bools to numbers (`steps="3"`, `steps=True`, `lr="0.1"`,
`half="yes"` are refused), an int is accepted where a float is expected (JSON and TOML write 1.0 as 1
too), NaN and infinities are refused, and every numeric field has a range. The limits on work per call:
`steps` (and `warmup_steps`, `early_stop_patience`) at most `MAX_STEPS`; the export limits are in
`tta_runtime.deploy.options`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tta_runtime.errors import ConfigError
from tta_runtime.schema import _Frozen, check_keywords, format_validation_error, keywords_of, validate, with_overrides  # noqa: F401


# Limits on work per call and on the size of what a card may build (documented in the fields below).
MAX_STEPS = 10_000  # adaptation steps per call: ~3 min of the runtime's lock for the shipped segmenter on CPU
MAX_SEED = 2**63 - 1  # seeds go to torch.Generator.manual_seed (and fit an int64)
MAX_WIDTH = 4096  # channels of one classifier stage
MAX_PARAMETERS = 50_000_000  # parameters a cnn_classifier card may build before its weights are checked
MAX_PIXELS = 16384 * 16384  # the largest `max_pixels` a runtime may be given


class SegmenterConfig(_Frozen):
    """Architecture of the slot-centric segmenter (Slot-TTA's 2D model; paper values in brackets)."""

    resolution: int = Field(128, ge=8, le=512, description="square input size in pixels [128]")
    num_slots: int = Field(11, ge=2, le=64, description="slots K [11]")
    slot_dim: int = Field(64, ge=8, le=1024, description="slot and feature width [64]")
    iters: int = Field(3, ge=1, le=10, description="slot-attention iterations [3]")
    encoder_channels: int = Field(64, ge=4, le=512, description="channels of every encoder conv [64]")
    encoder_layers: int = Field(4, ge=1, le=8, description="number of encoder convs [4]")
    encoder_kernel: int = Field(5, ge=1, le=9, description="encoder conv kernel size, odd [5]")
    encoder: Literal["conv", "unet"] = Field(
        "conv", description="the paper's stride-1 conv stack [conv], or a 2-level U-Net (GroupNorm, coordinate "
        "input; encoder_channels is its base width, encoder_layers and encoder_kernel are unused) that sees the whole image",
    )
    decoder_width: int = Field(64, ge=8, le=1024, description="coordinate-MLP width [64]")
    decoder_blocks: int = Field(4, ge=1, le=8, description="residual blocks in the decoder [4]")
    decoder_fourier_bands: int = Field(
        0, ge=0, le=12, description="sin/cos encodings of the pixel coordinates at 1, 2, 4, ... cycles [0: raw coordinates]"
    )
    mask_source: Literal["decoder", "attention", "product"] = Field(
        "decoder", description="which masks are the segmentation output: the decoder's alpha masks (the paper's, "
        "[decoder]), the last slot-attention maps over the encoder positions (one per pixel at stride 1), or "
        "their product renormalised over the slots (a pixel goes to the slot both agree on; see "
        "attention_power). The reconstruction, its loss and the OOD mask entropy always use the decoder's",
    )
    attention_power: float = Field(
        1.0, ge=0, le=4, description="with mask_source='product': masks = decoder x attention ** this, "
        "renormalised over the slots (0 = the decoder's masks, 1 = the plain product) [1]",
    )

    @model_validator(mode="after")
    def _unet_fits(self) -> SegmenterConfig:
        if self.encoder == "unet" and self.resolution % 4:
            raise ValueError(f"encoder='unet' pools twice: resolution must be divisible by 4, got {self.resolution}")
        return self

    @field_validator("encoder_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"encoder_kernel must be odd so 'same' padding keeps the size, got {v}")
        return v


class ClassifierConfig(_Frozen):
    """Architecture of the small CNN classifiers (digits models): conv stages, a norm layer, two heads.

    Each stage is conv3x3 -> norm -> ReLU -> conv3x3 -> norm -> ReLU, then 2x2 max-pool (not after the
    last stage); global average pooling, then the class head and, when `rotation_head`, a 4-way rotation
    head (0/90/180/270 degrees) on the same pooled features for TTT-style self-supervision.
    """

    resolution: int = Field(32, ge=8, le=512, description="square input size in pixels")
    in_channels: int = Field(3, ge=1, le=4)
    num_classes: int = Field(10, ge=2, le=100_000)
    widths: tuple[Annotated[int, Field(ge=1, le=MAX_WIDTH)], ...] = Field(
        (32, 64, 128), min_length=1, max_length=6, strict=False,
        description=f"channels per stage, each 1..{MAX_WIDTH}; the whole model at most {MAX_PARAMETERS:,} parameters",
    )
    norm: Literal["batch", "group", "layer"] = Field(
        "batch", description="'batch' (BatchNorm2d), 'group' (GroupNorm, `groups` groups) or 'layer' (GroupNorm(1))"
    )
    groups: int = Field(8, ge=1, le=512, description="GroupNorm groups when norm='group'")
    rotation_head: bool = Field(True, description="train and ship a 4-way rotation head (TTT / rotation recipe)")

    @model_validator(mode="after")
    def _fits(self) -> ClassifierConfig:
        if self.resolution % (2 ** (len(self.widths) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2**(len(widths)-1) for the poolings")
        if self.norm == "group" and any(w % self.groups for w in self.widths):
            raise ValueError(f"every width in {self.widths} must be divisible by groups={self.groups}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ValueError(
                f"widths {self.widths} with {self.num_classes} classes make {self.parameter_count():,} parameters, "
                f"above the limit of {MAX_PARAMETERS:,}; use narrower stages"
            )
        return self

    def parameter_count(self) -> int:
        """Parameters of the network this config builds (convs, norms, heads), computed without building it."""
        n, cin = 0, self.in_channels
        for w in self.widths:
            n += 9 * cin * w + 9 * w * w + 4 * w  # two conv3x3 (no bias), two norm affines
            cin = w
        return n + cin * self.num_classes + self.num_classes + (cin * 4 + 4 if self.rotation_head else 0)


class ExternalConfig(_Frozen):
    """A torchvision or timm classifier by name (built without downloading; weights from a local file)."""

    source: Literal["torchvision", "timm"]
    name: str = Field(min_length=1, description="architecture name, e.g. 'resnet18' (torchvision.models.get_model / timm.create_model)")
    num_classes: int = Field(ge=2, le=100_000)
    resolution: int = Field(224, ge=8, le=1024, description="square input size the runtime resizes images to")
    mean: tuple[Annotated[float, Field(ge=-10, le=10)], ...] = Field(
        (0.485, 0.456, 0.406), min_length=3, max_length=3, strict=False, description="per-channel input mean (images in [0, 1])"
    )
    std: tuple[Annotated[float, Field(gt=0, le=10)], ...] = Field(
        (0.229, 0.224, 0.225), min_length=3, max_length=3, strict=False, description="per-channel input std, > 0"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments")


_Triple = tuple[Annotated[float, Field(ge=-10, le=10)], Annotated[float, Field(ge=-10, le=10)], Annotated[float, Field(ge=-10, le=10)]]
_PositiveTriple = tuple[Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)]]


class Preprocessing(_Frozen):
    """How an image becomes the model's input tensor: one definition for the runtime, the card and the export.

    The image door (`tta_runtime.inputs.prepare_image`) does the geometry: with `resize="square"` the whole
    image is resized to size x size (aspect ratio not kept); with `"shorter_side"` it is resized so that its
    shorter side is `resize_to` (aspect kept), then the centre size x size is cropped. `interpolation`:
    "area" (area averaging on an axis that shrinks, bilinear on one that grows: the default, no aliasing),
    "bilinear", "bicubic" or "nearest" (OpenCV's, on the image's own dtype). Pixels are then RGB in [0, 1].
    The model side (inside the model, so the exported graph carries it) applies `channel_order` (the order
    the network was trained on) and `(x - mean) / std` when `mean` and `std` are given (None: the network
    takes [0, 1] input, or normalises itself, as the shipped models do).
    """

    size: int = Field(ge=8, le=1024, description="square side of the model input")
    scale: Literal["unit"] = Field("unit", description="pixels mapped to [0, 1] (uint8 / 255)")
    resize: Literal["square", "shorter_side"] = Field(
        "square", description="'square': resize the whole image to size x size; 'shorter_side': shorter side to "
        "resize_to (aspect kept), then centre crop size x size"
    )
    resize_to: int | None = Field(
        None, ge=8, le=4096, description="shorter side before the centre crop (resize='shorter_side'); None = size"
    )
    interpolation: Literal["area", "bilinear", "bicubic", "nearest"] = Field(
        "area", description="'area': area averaging when shrinking, bilinear when growing; else OpenCV's flag"
    )
    mean: _Triple | None = Field(None, strict=False, description="per-channel mean subtracted inside the model (input in [0, 1])")
    std: _PositiveTriple | None = Field(None, strict=False, description="per-channel std divided inside the model, > 0")
    channel_order: Literal["rgb", "bgr"] = Field("rgb", description="channel order the network was trained on")

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.resize_to is not None and self.resize != "shorter_side":
            raise ValueError("resize_to applies to resize='shorter_side' only")
        if self.resize_to is not None and self.resize_to < self.size:
            raise ValueError(f"resize_to ({self.resize_to}) must be >= size ({self.size}): the crop is taken from it")
        return self

    @property
    def shorter_side(self) -> int:
        """The shorter side before the centre crop (resize='shorter_side')."""
        return self.resize_to or self.size

    def describe(self) -> str:
        """One line saying exactly what the image door does (for manifests and docs)."""
        interp = {"area": "area averaging on a shrinking axis, bilinear on a growing one (OpenCV INTER_AREA / "
                  "INTER_LINEAR)", "bilinear": "OpenCV INTER_LINEAR", "bicubic": "OpenCV INTER_CUBIC",
                  "nearest": "OpenCV INTER_NEAREST"}[self.interpolation]
        if self.resize == "square":
            geometry = f"resize the whole image to {self.size}x{self.size}"
        else:
            geometry = (f"resize so the shorter side is {self.shorter_side} (longer side round(L * {self.shorter_side} / "
                        f"shorter), aspect kept), then crop the centre {self.size}x{self.size} (offset (L - {self.size}) // 2)")
        return f"{geometry}; {interp} on the image's own dtype (uint8 stays uint8); then RGB float32 / 255 in [0, 1]"


class WeightsSpec(_Frozen):
    file: str = Field(description="weights file name inside the model folder (.safetensors or .pt)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class OODStats(_Frozen):
    """In-distribution statistics of the per-image reconstruction MSE, for the default OOD score."""

    recon_mse_mean: float = Field(ge=0, le=1e6)
    recon_mse_std: float = Field(gt=0, le=1e6)
    n_images: int = Field(ge=1, le=10**9)
    split: str = "in_dist"


class PruneCard(_Frozen):
    """A pruned variant of a shipped model (``<model>/prune/<name>/prune.json``): FTWT mask predictors plus the
    backbone fine-tuned with their masks, in one weights file (the base model's keys + ``predictors.*``)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="the variant's folder name, e.g. 'r0.6'")
    base_model: str = Field(description="name of the model this variant was made from")
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the base weights it started from")
    part: Literal["classifier", "segmenter_encoder"] = Field(description="which convs carry mask predictors")
    r: float = Field(gt=0, le=1, description="FTWT's kept share of activation-peak mass the predictors learned")
    masks: Literal["predict", "topk"] = Field(
        "predict", description="'predict': sigmoid > 0.5 per channel (k varies per input); 'topk': the ks[u] most "
        "likely channels of unit u (static k, what the gather path and its ONNX export run)",
    )
    ks: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] | None = Field(
        None, max_length=64, description="kept channels per unit for masks='topk' (unit 0 = full width)"
    )
    weights: WeightsSpec
    training: dict[str, Any] = Field(default_factory=dict, description="provenance: command, recipe, seconds")
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ks(self) -> PruneCard:
        if self.masks == "topk" and not self.ks:
            raise ValueError("masks='topk' needs ks (kept channels per unit)")
        if self.ks is not None and min(self.ks) < 1:
            raise ValueError(f"every k must be >= 1; got {self.ks}")
        return self


class ModuleConfig(_Frozen):
    """A classifier given as a Python `nn.Module` (`Runtime.from_module`); saved folders name the function
    that builds it (`builder`, "package.module:function"), whose weights are then loaded from the folder."""

    builder: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="'package.module:function' returning the nn.Module (None: an in-memory module, not loadable)",
    )
    num_classes: int = Field(ge=2, le=100_000)
    features: str | None = Field(
        None, max_length=200, description="submodule whose output (spatially averaged) is the OOD embedding; None = the "
        "input of the last nn.Linear"
    )
    feature_dim: int = Field(ge=1, le=1_000_000, description="width of the OOD embedding")


PYTHON_ARCHITECTURE = "python:"
ARCHITECTURES = ("slot_segmenter", "cnn_classifier", "torchvision", "timm", "module")


def builder_of(architecture: str) -> str | None:
    """'package.module:function' of a "python:package.module:function" architecture, else None."""
    return architecture[len(PYTHON_ARCHITECTURE):] if architecture.startswith(PYTHON_ARCHITECTURE) else None


class ModelScope(_Frozen):
    """What a model is for and where it stops: `info` and the README show it; the runtime warns past `far_ood_level`."""

    intended_use: str = Field("", max_length=4000)
    limitations: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=64)
    far_ood_scorer: str | None = Field(None, description="the OOD scorer whose score far_ood_level is on")
    far_ood_level: float | None = Field(
        None, ge=-1e9, le=1e9, description="a score above it is far outside the training world: the runtime logs a "
        "warning and the CLI says the output is unreliable",
    )
    far_ood_evidence: str = Field("", max_length=2000, description="how the level was chosen, with the command")
    demo_sample: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+\.png$", max_length=100,
        description="a PNG in the model folder that `tta-runtime demo` adapts on by default (an out-of-distribution "
        "scene of the model's world); None = the package's bundled sample",
    )

    @model_validator(mode="after")
    def _pair(self) -> ModelScope:
        if (self.far_ood_scorer is None) != (self.far_ood_level is None):
            raise ValueError("far_ood_scorer and far_ood_level go together")
        return self


class ModelCard(_Frozen):
    """A shipped model's card (`card.json` in its folder)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    task: Literal["segmentation", "classification"] = "segmentation"
    architecture: str = Field(
        "slot_segmenter", description="'slot_segmenter', 'cnn_classifier', 'torchvision', 'timm', 'module' (an in-memory "
        "nn.Module) or 'python:package.module:function' (a function returning the module; loading runs it: trust_code)"
    )
    description: str = ""
    segmenter: SegmenterConfig | None = None
    classifier: ClassifierConfig | None = None
    external: ExternalConfig | None = Field(None, description="architecture 'torchvision' / 'timm': which model")
    module: ModuleConfig | None = Field(None, description="architecture 'module' / 'python:...': the wrapped nn.Module")
    labels: list[str] = Field(default_factory=list, description="class names, index = label (classifiers)")
    preprocessing: Preprocessing
    weights: WeightsSpec
    optimizer_state: WeightsSpec | None = Field(
        None, description="Adam moments at the end of training (safetensors), for recipes with optimizer_state='training'"
    )
    fisher: WeightsSpec | None = Field(
        None, description="diagonal Fisher information of the adaptable parameters on in-distribution data "
        "(safetensors, by parameter name), for EATA's anti-forgetting term"
    )
    default_recipe: str = "slot_tta"
    ood: OODStats | None = None
    scope: ModelScope | None = Field(None, description="intended use, limitations and the far-OOD level")
    training: dict[str, Any] = Field(default_factory=dict, description="provenance: command, seed, steps, data, time")
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        sections = {"slot_segmenter": "segmenter", "cnn_classifier": "classifier", "torchvision": "external", "timm": "external",
                    "module": "module"}
        builder = builder_of(self.architecture)
        if builder is None and self.architecture not in sections:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)} or 'python:package.module:function', "
                             f"got {self.architecture!r}")
        tasks = {"slot_segmenter": "segmentation"}
        if tasks.get(self.architecture, "classification") != self.task:
            raise ValueError(f"architecture {self.architecture!r} does not do task {self.task!r}")
        section = "module" if builder is not None else sections[self.architecture]
        cfg = getattr(self, section)
        others = [s for s in ("segmenter", "classifier", "external", "module") if s != section and getattr(self, s) is not None]
        if cfg is None or others:
            raise ValueError(f"a {self.architecture} card needs a '{section}' section and no {others} section")
        if self.external is not None and self.external.source != self.architecture:
            raise ValueError(f"external.source {self.external.source!r} must equal architecture {self.architecture!r}")
        if builder is not None and self.module is not None and self.module.builder != builder:
            raise ValueError(f"module.builder {self.module.builder!r} must equal the architecture's {builder!r}")
        if self.preprocessing.size != getattr(cfg, "resolution", self.preprocessing.size):
            raise ValueError(
                f"preprocessing.size ({self.preprocessing.size}) must equal {section}.resolution ({cfg.resolution})"
            )
        if self.preprocessing.mean is not None and self.task == "segmentation":
            raise ValueError("preprocessing.mean/std: the slot segmenter takes [0, 1] input (normalisation is for classifiers)")
        if self.external is not None and self.preprocessing.mean is not None and (
            tuple(self.preprocessing.mean) != tuple(self.external.mean) or tuple(self.preprocessing.std) != tuple(self.external.std)
        ):
            raise ValueError("preprocessing.mean/std must equal external.mean/std (the wrapper normalises with them)")
        if self.labels and self.task == "classification" and len(self.labels) != cfg.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but num_classes is {cfg.num_classes}")
        return self


ParamSelection = Literal["all", "norm", "no_encoder", "decoder"]


class ExecutionConfig(_Frozen):
    """How a batch of images is adapted (slot segmenters, episodic): all at once, each image with its own
    weights (``torch.func`` vmap over stacked parameters, ``tta_runtime.batched_adapt``). None of these
    changes what a recipe minimises; ``autocast`` is the one that changes numbers (bfloat16)."""

    batch_size: int = Field(8, ge=1, le=4096, description="images adapted together, each with its own weights")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the step; 'reduce-overhead' also captures CUDA graphs"
    )
    compile_backend: Literal["inductor", "eager", "aot_eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend: 'inductor', 'eager' or 'aot_eager' (capture without generating "
        "code), 'cudagraphs'"
    )
    autocast: Literal["off", "bf16"] = Field(
        "off", description="bfloat16 forward and backward (float32 weights and Adam); float16 would need loss scaling"
    )
    adam: Literal["functional", "fused"] = Field(
        "functional", description="'functional': Adam as tensor maths (compiles with the step); "
        "'fused': torch.optim.Adam(fused=True) on the stacked weights",
    )
    sync_every: int = Field(
        1, ge=1, le=100_000,
        description="steps between host reads of the losses and the non-finite guard; above 1 the host queues "
        "steps without waiting for the GPU. Rollbacks and early stops are still decided on the device every "
        "step (same results); only the exit once every image has stopped, and time_budget_ms, wait for a sync",
    )


class AdaptConfig(_Frozen):
    """One adaptation recipe: what to minimise, which parameters, which optimizer, how long.

    Levers that trade fidelity for speed (pixel subsets, early stop) default to off, so the faithful
    Slot-TTA recipe is the default behaviour.
    """

    name: str = "custom"
    description: str = ""
    method: str = Field("slot_reconstruction", description="registered method name (see tta_runtime.methods)")
    params: str = Field(
        "all",
        description="'all', 'norm' (norm-layer affine only), 'no_encoder' (encoder frozen and run once), "
        "'decoder', or 're:<regex>' matched against parameter names",
    )
    optimizer: Literal["adam", "sgd", "sam"] = Field(
        "adam", description="'sam': sharpness-aware minimisation (Foret et al. 2021) over SGD, as SAR uses"
    )
    lr: float = Field(5e-4, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD and SAM's base SGD")
    sam_rho: float = Field(0.05, gt=0, le=10, description="SAM's neighbourhood radius")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 weight decay, 0..1")
    steps: int = Field(
        150, ge=0, le=MAX_STEPS,
        description=f"gradient steps per call, 0..{MAX_STEPS} (the cap on work per call: the runtime's lock is held meanwhile)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="'cosine': after warm-up, decay the lr to lr * lr_final_fraction over the steps"
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="linear lr warm-up from lr / (warmup_steps + 1) over these steps")
    lr_final_fraction: float = Field(0.1, ge=0, le=1, description="cosine schedule's final lr as a fraction of lr")
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="max global grad norm; None = no clipping")
    early_stop_patience: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="stop after this many steps without improving the loss by early_stop_min_delta"
    )
    early_stop_min_delta: float = Field(1e-4, ge=0, le=1, description="relative loss improvement that counts")
    pixel_fraction: float = Field(
        1.0, gt=0, le=1, description="fraction of pixels decoded and scored per step (1.0 = all pixels)"
    )
    optimizer_state: Literal["fresh", "training"] = Field(
        "fresh",
        description="'fresh': a new Adam per image; 'training': start Adam from the moments saved at the end of "
        "training (as the released Slot-TTA code does); needs a model that ships them",
    )
    norm_stats: Literal["source", "batch", "prior", "ema"] = Field(
        "source",
        description="BatchNorm statistics while adapting and predicting (classifiers): 'source' (training "
        "statistics), 'batch' (the test batch's), 'prior' (source mixed with the batch's, strength norm_prior), "
        "'ema' (running statistics moved towards each batch's by norm_momentum: they follow a continual stream)",
    )
    norm_momentum: float = Field(0.05, gt=0, le=1, description="EMA momentum of norm_stats='ema'")
    norm_prior: float = Field(16.0, gt=0, le=1e6, description="N in (N * source + n * batch) / (N + n) for norm_stats='prior'")
    time_budget_ms: float | None = Field(
        None, gt=0, le=3_600_000, description="stop stepping once this much time has gone into the loop (streams), "
        "at most an hour; None = no limit"
    )
    restore_prob: float = Field(
        0.0, ge=0, le=1,
        description="stochastic restore (CoTTA, Wang et al. 2022): after every update each adapted weight element "
        "goes back to its loaded value with this probability, so a continual stream cannot drift far from the "
        "source model; 0 = off (CoTTA uses 0.01)",
    )
    prediction: Literal["adapted", "last_forward"] = Field(
        "adapted", description="what adapt_and_predict returns (classifiers): 'adapted' = one more forward after the "
        "last update; 'last_forward' = the outputs of the last adaptation forward, taken before its update, as "
        "Tent's released code returns them (saves that forward; methods tent, eata, sar, bn_stats)",
    )
    mode: Literal["episodic", "continual"] = "episodic"
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds pixel subsets and restore masks (0..2**63-1, a torch seed); the model "
        "itself is deterministic"
    )
    execution: ExecutionConfig | None = Field(
        None, description="a recipe's [execution] table: a batch of images given to adapt_and_predict is adapted "
        "all at once, each image with its own weights (slot segmenters, episodic); None = image by image",
    )

    @model_validator(mode="after")
    def _optimizer_state(self) -> AdaptConfig:
        if self.optimizer_state == "training" and self.optimizer != "adam":
            raise ValueError("optimizer_state='training' restores Adam moments: it needs optimizer='adam'")
        return self

    @field_validator("params")
    @classmethod
    def _params(cls, v: str) -> str:
        if v in ("all", "norm", "no_encoder", "decoder"):
            return v
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"params regex {v[3:]!r} does not compile: {e}") from e
            return v
        raise ValueError(
            f"params must be 'all', 'norm', 'no_encoder', 'decoder' or 're:<regex>', got {v!r}"
        )
