"""The Runtime's own doors to the export stage: backend="onnxruntime" and Runtime.export."""

from __future__ import annotations

import numpy as np
import pytest

import tta_runtime

pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs the 'onnx' extra")


def test_onnxruntime_backend_serves_predict_like_torch_even_after_continual_adaptation(ood_image):
    torch_rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", mode="continual", steps=3)
    ort_rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", mode="continual", steps=3, backend="onnxruntime", onnxruntime_threads=1)
    a, b = torch_rt.predict(ood_image), ort_rt.predict(ood_image)
    assert (a.backend, b.backend) == ("torch", "onnxruntime")
    np.testing.assert_allclose(b.masks, a.masks, atol=1e-4)
    assert b.ood_score == pytest.approx(a.ood_score, abs=1e-4)
    torch_rt.adapt_and_predict(ood_image)
    ort_rt.adapt_and_predict(ood_image)  # adaptation runs in PyTorch; the graph gets the new weights by name
    np.testing.assert_allclose(ort_rt.predict(ood_image).masks, torch_rt.predict(ood_image).masks, atol=1e-4)


def test_onnxruntime_backend_scores_with_the_loaded_weights_after_continual_adaptation(ood_image, scene):
    """The graph runs the adapted weights for the prediction; the score stays that of the loaded weights."""
    ort_rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", mode="continual", steps=3, backend="onnxruntime", onnxruntime_threads=1)
    before = ort_rt.predict(ood_image)
    ort_rt.adapt_and_predict(scene("noise_blur", 1))
    after = ort_rt.predict(ood_image)
    assert np.abs(after.masks - before.masks).max() > 1e-4  # the graph has the adapted weights
    assert after.ood_score == pytest.approx(before.ood_score, abs=1e-4)


def test_onnxruntime_backend_refuses_classifiers():
    with pytest.raises(tta_runtime.ConfigError, match="segmenter only"):
        tta_runtime.Runtime.from_pretrained("digits-cnn-bn", backend="onnxruntime")


def test_runtime_export_writes_a_verified_onnx_file_of_the_adapted_weights(tmp_path, ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", mode="continual", steps=2)
    rt.adapt_and_predict(ood_image)
    result = rt.export(tmp_path / "adapted.onnx", part="predictor")
    assert result.onnx_path.is_file() and result.manifest_path.is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    x = rt.predict(ood_image)  # adapted weights (continual)
    s = rt.input_size
    inp = (ood_image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    assert inp.shape[-1] == s
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: inp}), strict=True))
    np.testing.assert_allclose(outs["masks"][0].reshape(x.masks.shape), x.masks, atol=1e-4)
