"""The AUROC table behind the default classifier OOD scorer (docs/custom_models.md): photos and corruptions.

    python tools/release/ood_photo_table.py --model digits-cnn-bn --model digits-cnn-gn [--trust-code] [--json out.json]

Each model's own calibration (<model>/ood/) is scored; see tta_runtime.evaluation.ood_photos for the data.
"""

from __future__ import annotations

import argparse
import json

import torch

from tta_runtime import Runtime
from tta_runtime.evaluation.ood_photos import photo_table, scorer_report
from tta_runtime.ood import load_calibration


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="classifier model name or folder (repeatable)")
    p.add_argument("--trust-code", action="store_true", help="allow python: model folders (written by Runtime.save)")
    p.add_argument("--json", default=None, help="write the per-scorer numbers here")
    p.add_argument("--split", default="test", choices=["val", "test"],
                   help="digits split of the clean and corrupted sets: val to choose the scorer, test to report it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    reports = []
    for name in args.model:
        rt = Runtime.from_pretrained(name, trust_code=args.trust_code)
        reports.append(scorer_report(rt, load_calibration(rt.folder), split=args.split))
    print("\n".join(photo_table(reports)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
