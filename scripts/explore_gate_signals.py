"""Exploration for #4's gate (2026-11-28): which per-input signal tells where adaptation pays, on selection
scenes only (seed 1500: neither the validation seed the calibrations were fitted on nor the test seed).

For each scene of each split: every calibrated scorer's score before adaptation, the recon MSE, FG-ARI before
and after the default recipe (always adapt), the steps run and the adaptation loss at the first and last step.
The gate analysis (`scripts/explore_gate_signals.py analyse`) reads the per-image rows back and, per signal,
traces compute share against gain kept on a half in-distribution / half shifted stream.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/explore_gate_signals.py run 48 in_dist,textured_background,unseen_colours,noise_blur
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/explore_gate_signals.py run 48 textured_objects,more_objects,unseen_shapes
    .venv/bin/python scripts/explore_gate_signals.py analyse    # -> docs/gate/gate_signals.json
"""
import glob, json, sys, numpy as np, torch
import tta_runtime as tta
from tta_runtime.metrics import fg_ari
from tta_runtime.ood import features_from_output, load_calibration
from tta_runtime.data.scenes import generate_scenes

SEL = 1500


def run(n: int, splits: list[str]) -> None:
    torch.set_num_threads(1)
    rt = tta.Runtime.from_pretrained()
    m = rt.model
    cals = load_calibration(rt.folder)
    for split in splits:
        imgs, truths = generate_scenes(split, n, seed=SEL, size=m.cfg.resolution)
        rows = []
        for i in range(n):
            x = torch.from_numpy(imgs[i : i + 1]).permute(0, 3, 1, 2).float() / 255
            row = {"split": split, "index": i}
            with torch.inference_mode():
                enc = m.encode(x)
                out = m.forward_features(enc)
                for emb in sorted({c.embedding for c in cals.values()}):
                    feats = features_from_output(m, x, out, encoded=enc, embedding=emb)
                    for name, cal in cals.items():
                        if cal.embedding == emb:
                            row[name] = float(cal.score(feats)[0])
                row["recon_mse"] = float(feats.recon_mse[0])
            before = rt.predict(imgs[i])
            after = rt.adapt_and_predict(imgs[i])
            rep = after.adaptation
            row.update(
                fg_ari_before=fg_ari(truths[i], before.segmentation), fg_ari_after=fg_ari(truths[i], after.segmentation),
                steps=rep.steps_run, loss_first=float(rep.losses[0]), loss_last=float(rep.final_loss if rep.final_loss is not None else rep.losses[-1]),
            )
            rows.append(row)
            print(split, i, round(row["fg_ari_after"] - row["fg_ari_before"], 3), flush=True)
        json.dump(rows, open(f"docs/gate/rows_{split}.json", "w"), indent=1)


def analyse() -> None:
    rows = [r for f in sorted(glob.glob("docs/gate/rows_*.json")) for r in json.load(open(f))]
    ind = [r for r in rows if r["split"] == "in_dist"]
    shifts = sorted({r["split"] for r in rows} - {"in_dist"})
    signals = [k for k in ind[0] if k not in ("split", "index", "fg_ari_before", "fg_ari_after", "steps", "loss_last")]
    gain = lambda rs: np.array([r["fg_ari_after"] - r["fg_ari_before"] for r in rs])
    report = {"seed": SEL, "n_per_split": len(ind), "mean_gain": {s: float(gain([r for r in rows if r["split"] == s]).mean()) for s in ["in_dist", *shifts]}}
    curves = {}
    for sig in signals:
        curves[sig] = {}
        for mix in [[s] for s in shifts] + [shifts]:
            sh = [r for r in rows if r["split"] in mix]
            stream = ind + sh
            w = np.array([0.5 / len(ind)] * len(ind) + [0.5 / len(sh)] * len(sh))  # half in-dist, half shifted
            g = gain(stream)
            s = np.array([r[sig] for r in stream])
            total = float((w * g).sum())
            pts = []
            for q in np.linspace(0, 1, 21):  # threshold at the q-quantile of the in-distribution scores
                t = np.quantile([r[sig] for r in ind], q) if q < 1 else np.inf
                sel = s > t if q > 0 else np.ones_like(s, bool)
                pts.append({"tpr": round(float(q), 2), "compute": float((w * sel).sum()) , "gain_kept": float((w * g * sel).sum() / total)})
            ok = [p for p in pts if p["compute"] <= 0.6 and p["gain_kept"] >= 0.95]
            curves[sig]["+".join(mix)] = {"total_gain": total, "points": pts, "meets": bool(ok)}
    # the best any gate could do: adapt exactly the inputs that gain most (an oracle that reads the labels)
    sh = [r for r in rows if r["split"] != "in_dist"]
    g = np.r_[gain(ind), gain(sh)]
    w = np.r_[np.full(len(ind), 0.5 / len(ind)), np.full(len(sh), 0.5 / len(sh))]
    order = np.argsort(-g)
    share, kept = np.cumsum(w[order]), np.cumsum((w * g)[order]) / (w * g).sum()
    report["oracle_gain_kept"] = {f"{c:.1f}": float(kept[np.searchsorted(share, c)]) for c in (0.4, 0.5, 0.6)}
    report["in_dist_share_of_gain"] = float((w[: len(ind)] * g[: len(ind)]).sum() / (w * g).sum())
    # a gate on the true segmentation quality before adaptation (it reads the labels): worst scenes first
    order_q = np.argsort([r["fg_ari_before"] for r in ind + sh], kind="stable")
    share_q, kept_q = np.cumsum(w[order_q]), np.cumsum((w * g)[order_q]) / (w * g).sum()
    report["quality_gate_gain_kept"] = {f"{c:.1f}": float(kept_q[np.searchsorted(share_q, c)]) for c in (0.4, 0.5, 0.6)}
    from scipy.stats import spearmanr

    every = ind + sh
    report["spearman_with_gain"] = {
        sig: float(spearmanr([r[sig] for r in every], g)[0])
        for sig in [*signals, "fg_ari_before"]
    }
    report["spearman_with_gain"]["loss_drop"] = float(spearmanr([r["loss_first"] - r["loss_last"] for r in every], g)[0])
    report["curves"] = curves
    summary = {sig: {mix: max((p["gain_kept"] for p in c["points"] if p["compute"] <= 0.6), default=None) for mix, c in cs.items()} for sig, cs in curves.items()}
    report["best_gain_kept_at_60pct_compute"] = summary
    for sig, v in summary.items():
        print(f"{sig:20s}", {k: round(x, 2) if x is not None else None for k, x in v.items()})
    print("mean gain", {k: round(v, 3) for k, v in report["mean_gain"].items()})
    print("oracle", report["oracle_gain_kept"], "in-dist share", round(report["in_dist_share_of_gain"], 3))
    print("quality gate (labels)", report["quality_gate_gain_kept"])
    print("spearman", {k: round(v, 3) for k, v in report["spearman_with_gain"].items()})
    json.dump(report, open("docs/gate/gate_signals.json", "w"), indent=1)
    # the picture: gain kept against compute share on the all-shifts stream, resampled on a 5% grid
    from tta_runtime.visual import line_plot, save_png

    grid = np.linspace(0, 1, 21)
    mix = "+".join(shifts)
    series = {"oracle (labels)": np.interp(grid, np.r_[0, share], np.r_[0, kept])}
    for sig in ("recon_error", "mask_entropy", "mask_disagreement", "mahalanobis", "knn"):
        pts = sorted(curves[sig][mix]["points"], key=lambda p: p["compute"])
        series[sig] = np.interp(grid, [p["compute"] for p in pts], [p["gain_kept"] for p in pts])
    series["target: 95% kept"] = np.full(len(grid), 0.95)
    save_png("docs/gate/gate_curves.png", line_plot(
        series, size=(320, 760), title="share of always-adapt's FG-ARI gain kept (seed 1500, all shifts)",
        x_label="compute share of always-adapt in 5% steps (20 = 100%); the target is at most 12 (60%)",
    ))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), sys.argv[3].split(","))
    else:
        analyse()
