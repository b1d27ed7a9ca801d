# Sourced by the GPU scripts (from the repository root).
# `gpu_defaults DEFAULT_OUT`: OUT (default DEFAULT_OUT, created), DEVICE (cuda), PY (python3), SMOKE (0), and this
# repository on PYTHONPATH.
gpu_defaults() {
  OUT=${OUT:-$1}
  DEVICE=${DEVICE:-cuda}
  PY=${PY:-python3}
  SMOKE=${SMOKE:-0}
  mkdir -p "$OUT"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# `check_env` writes $OUT/env.txt (date, Python, torch, CUDA, the GPU, modules the
# project needs) and exits 2 when a module is missing, so a run without them measures nothing.
check_env() {
  {
    date -u +%FT%TZ
    "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for mod in ("numpy", "pydantic", "safetensors", "tqdm", "scipy", "skimage", "cv2"):
    try:
        __import__(mod)
    except ImportError as e:
        print("MISSING", mod, e)
PYEOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  if grep -q '^MISSING' "$OUT/env.txt"; then
    echo "a module the run needs is missing (above): nothing run" >&2
    exit 2
  fi
}
