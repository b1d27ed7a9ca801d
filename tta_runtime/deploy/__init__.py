"""Deployment: export the frozen path to ONNX / TensorRT, write adapted weights into it, run it.

    options.py      the export request (ExportOptions, DynamicShapes), opset limits, I/O specs, input checks
    kinds.py        how an architecture becomes graphs: parts, wrappers, I/O specs (EXPORTERS); the slot segmenter
    classifier_kind.py  every classifier (digits CNNs, torchvision / timm, from_module models)
    graph.py        ONNX graph tools: initializers by state-dict name, write_weights, manifests, digests
    export.py       export and verify against PyTorch
    onnxruntime.py  OnnxRuntimeBackend: explicit providers, checked inputs, IOBinding
    ort_frozen.py   OrtFrozenPath: the runtime's frozen path on ONNX Runtime, following adaptation
    engine_plan.py  TensorRT decided before TensorRT is called: options, profiles, cache keys, refit arrays
    tensorrt.py     TensorRT calls: build_engine, TensorRTBackend (run, refit)
    doctor.py       what this machine can run

`onnx`, `onnxruntime` and `tensorrt` are imported on first use; a missing one raises
`MissingExtraError` (a `BackendUnavailableError`) naming the extra to install.
"""

from tta_runtime.deploy import classifier_kind  # noqa: F401 - registers the classifier export kind
from tta_runtime.deploy.doctor import doctor
from tta_runtime.deploy.engine_plan import (
    EngineBuild,
    EnginePlan,
    TensorRTConfig,
    cached_engine,
    engine_cache_key,
    network_flags,
    plan_engine,
    profile_shapes,
    refit_plan,
)
from tta_runtime.deploy.export import ExportResult, export, export_onnx_bytes, verify
from tta_runtime.deploy.graph import (
    import_onnx,
    initializer_map,
    load_manifest,
    manifest_path,
    set_initializers,
    write_weights,
)
from tta_runtime.deploy.kinds import EXPORTERS, ExportKind, export_kind
from tta_runtime.deploy.onnxruntime import (
    OnnxRuntimeBackend,
    OrtOptions,
    import_onnxruntime,
    providers_for_device,
    resolve_providers,
)
from tta_runtime.deploy.options import (
    MAX_OPSET,
    MIN_OPSET,
    TOLERANCES,
    DynamicShapes,
    ExportError,
    ExportOptions,
    ExportVerificationError,
    TensorSpec,
    parse_dynamic,
)
from tta_runtime.deploy.ort_frozen import OrtFrozenPath
from tta_runtime.deploy.tensorrt import TensorRTBackend, build_engine, import_tensorrt
from tta_runtime.errors import BackendUnavailableError  # its home; re-exported for existing imports

__all__ = [
    "EXPORTERS",
    "MAX_OPSET",
    "MIN_OPSET",
    "TOLERANCES",
    "BackendUnavailableError",
    "DynamicShapes",
    "EngineBuild",
    "EnginePlan",
    "ExportError",
    "ExportKind",
    "ExportOptions",
    "ExportResult",
    "ExportVerificationError",
    "OnnxRuntimeBackend",
    "OrtFrozenPath",
    "OrtOptions",
    "TensorRTBackend",
    "TensorRTConfig",
    "TensorSpec",
    "build_engine",
    "cached_engine",
    "doctor",
    "engine_cache_key",
    "export",
    "export_kind",
    "export_onnx_bytes",
    "import_onnx",
    "import_onnxruntime",
    "import_tensorrt",
    "initializer_map",
    "load_manifest",
    "manifest_path",
    "network_flags",
    "parse_dynamic",
    "plan_engine",
    "profile_shapes",
    "providers_for_device",
    "refit_plan",
    "resolve_providers",
    "set_initializers",
    "verify",
    "write_weights",
]
