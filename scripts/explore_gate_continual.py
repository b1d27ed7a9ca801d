"""Exploration for #4's gate (2026-11-28): the gate in continual mode, on selection scenes only (seed 1500).

Episodic adaptation gains on in-distribution scenes as much as on shifted ones, so an OOD gate gives that up
(`scripts/explore_gate_signals.py`). In continual mode the adapted weights carry over: an in-distribution
scene the gate skips is still predicted by the weights adapted on the shifted scenes before it. This measures
whether that keeps the gain. Three runtimes see the same interleaved stream (n in-distribution + n shifted,
cycling over the shifts): the shipped weights (predict only), always-adapt and adapt="when_ood", both
continual with the stream recipe (`slot_tta_stream`, `steps` a scene).

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/explore_gate_continual.py 32 10 [seed]  # -> docs/gate/continual_<seed>.json
"""
import json, sys, numpy as np, torch
import tta_runtime as tta
from tta_runtime.evaluation.bench_gate import mixed_stream
from tta_runtime.metrics import fg_ari

torch.set_num_threads(1)
n, steps = int(sys.argv[1]), int(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
shifts = ["textured_background", "unseen_shapes", "textured_objects", "unseen_colours", "noise_blur", "more_objects"]
kw = dict(recipe="slot_tta_stream", mode="continual", steps=steps)
base = tta.Runtime.from_pretrained()
always = tta.Runtime.from_pretrained(**kw)
gated = tta.Runtime.from_pretrained(adapt="when_ood", **kw)
rows = []
for split, image, truth in mixed_stream(n, shifts, seed=seed, size=base.input_size):
    b = base.predict(image)
    a = always.adapt_and_predict(image)
    g = gated.adapt_and_predict(image)
    rows.append({
        "split": split, "is_ood": g.is_ood, "fg_ari_base": fg_ari(truth, b.segmentation),
        "fg_ari_always": fg_ari(truth, a.segmentation), "fg_ari_gated": fg_ari(truth, g.segmentation),
        "steps_always": a.adaptation.steps_run, "steps_gated": g.adaptation.steps_run,
        "reset_always": a.adaptation.reset, "reset_gated": g.adaptation.reset,
    })
m = lambda k, pred=lambda r: True: float(np.mean([r[k] for r in rows if pred(r)]))
ind = lambda r: r["split"] == "in_dist"
shf = lambda r: r["split"] != "in_dist"
gain_a, gain_g = m("fg_ari_always") - m("fg_ari_base"), m("fg_ari_gated") - m("fg_ari_base")
out = {
    "seed": seed, "n": n, "steps_per_scene": steps, "recipe": "slot_tta_stream", "mode": "continual",
    "flagged": {"in_dist": m("is_ood", ind), "shifted": m("is_ood", shf)},
    "fg_ari": {k: m(f"fg_ari_{k}") for k in ("base", "always", "gated")},
    "gain_in_dist": {"always": m("fg_ari_always", ind) - m("fg_ari_base", ind), "gated": m("fg_ari_gated", ind) - m("fg_ari_base", ind)},
    "gain_shifted": {"always": m("fg_ari_always", shf) - m("fg_ari_base", shf), "gated": m("fg_ari_gated", shf) - m("fg_ari_base", shf)},
    "gain_always": gain_a, "gain_gated": gain_g, "gain_kept": gain_g / gain_a if gain_a else None,
    "compute_share_steps": sum(r["steps_gated"] for r in rows) / max(1, sum(r["steps_always"] for r in rows)),
    "resets": {"always": sum(r["reset_always"] for r in rows), "gated": sum(r["reset_gated"] for r in rows)},
    "rows": rows,
}
print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
json.dump(out, open(f"docs/gate/continual_{seed}.json", "w"), indent=1)
