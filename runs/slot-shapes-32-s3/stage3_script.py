import sys, torch, logging
from pathlib import Path
from tta_runtime.training.slot import TrainConfig, train
from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.training import checkpoint
logging.basicConfig(level=logging.INFO)
run = Path(sys.argv[1]); attn = float(sys.argv[2]); steps = int(sys.argv[3])
old = torch.load("/work/long/run/ckpt.pt", map_location="cpu", weights_only=True)
base = TrainConfig.model_validate_json(old["config"])
cfg = base.model_copy(update=dict(steps=steps, lr=3e-4, warmup=100, lr_final_fraction=0.05,
    mask_weight=1.0, mask_weight_final=1.0, attn_weight=attn, eval_every=500, val_images=128))
cfg = TrainConfig.model_validate(cfg.model_dump())
if not (run / "ckpt.pt").exists():
    run.mkdir(parents=True, exist_ok=True)
    m = SlotSegmenter(cfg.segmenter); m.load_state_dict(old["model"])
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    checkpoint.save(run / "ckpt.pt", cfg, m, opt, 0, 0.0)
train(cfg, run, progress=False)
