"""Temporary: the old import path of the backend names, until runtime.py and the CLI import them from
`tta_runtime.deploy` (then this file goes)."""

from tta_runtime.deploy.doctor import doctor  # noqa: F401
from tta_runtime.deploy.engine_plan import TensorRTConfig, plan_engine  # noqa: F401
from tta_runtime.deploy.onnxruntime import (  # noqa: F401
    OnnxRuntimeBackend,
    OrtOptions,
    import_onnxruntime,
    providers_for_device,
    resolve_providers,
)
from tta_runtime.deploy.ort_frozen import OrtFrozenPath  # noqa: F401
from tta_runtime.deploy.tensorrt import TensorRTBackend, build_engine, import_tensorrt  # noqa: F401
from tta_runtime.errors import BackendUnavailableError  # noqa: F401
