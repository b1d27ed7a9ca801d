"""Choose how the segmenter's masks combine decoder and slot attention, on VALIDATION scenes (seed 1000).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/select_mask_source.py FOLDER N_OOD N_IN

FOLDER: a model folder (scripts/candidate_folder.py). Per image, before and after the slot_tta_fast recipe
(continual mode for one image, then reset), FG-ARI of masks = decoder x attention ** p renormalised over
the slots, for p in 0 (the decoder masks), 0.25, 0.5, 0.75, 1 (the plain product). Prints the mean per
split and over the OOD splits. Used to set models/slot-shapes-32 (scripts/ship_default_model.py).
"""
import sys, torch, numpy as np
import tta_runtime as tta
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.data.scenes import generate_scenes, OOD_SPLITS, VAL_SEED
from tta_runtime.metrics import fg_ari
torch.set_num_threads(1)
folder, n_ood, n_in = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = tta.Runtime.from_pretrained(folder, recipe="slot_tta_fast")
G = (0.0, 0.25, 0.5, 0.75, 1.0)
def segs(out):
    d = out.masks[0].double(); a = out.attention[0].double()
    r = []
    for g in G:
        j = d * a.clamp_min(1e-12) ** g
        r.append(j.argmax(0).reshape(32, 32).numpy())
    return r
res = {}
for split, n in [("in_dist", n_in)] + [(s, n_ood) for s in OOD_SPLITS]:
    ims, inst = generate_scenes(split, n, VAL_SEED, 32)
    b, a = [], []
    for i in range(n):
        with torch.no_grad(): o = rt.model(images_to_tensor(ims[i:i+1]))
        b.append([fg_ari(inst[i], s) for s in segs(o)])
        rt.adapt_and_predict(ims[i], mode="continual")
        with torch.no_grad(): o = rt.model(images_to_tensor(ims[i:i+1]))
        a.append([fg_ari(inst[i], s) for s in segs(o)])
        rt.reset()
    res[split] = (np.array(b), np.array(a))
    print(split, "before", np.round(np.mean(b, 0), 3), "after", np.round(np.mean(a, 0), 3), flush=True)
B = np.concatenate([res[s][0] for s in OOD_SPLITS]); A = np.concatenate([res[s][1] for s in OOD_SPLITS])
print("OOD mean before", np.round(B.mean(0), 3), "after", np.round(A.mean(0), 3), "gain", np.round((A - B).mean(0), 3))
