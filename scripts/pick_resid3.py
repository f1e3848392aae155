"""Pick the shipped resid.3 dictionaries from grid runs (one per width found: 1024 → main,
4096 → wide).

Per width, the dictionary meeting the residual-stream bar (L0 <= 30, loss recovered >= 90%) with
the highest loss recovered; if none meets it, the sparsest one that recovers >= 90%; failing that,
the one with the highest loss recovered.

    python scripts/pick_resid3.py GRID_DIR [GRID_DIR ...] dictionaries/<model>
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SETS = {1024: "main", 4096: "wide"}


def rank(metrics: dict[str, float]) -> tuple[int, float]:
    """Sort key, best last: meets both bars (then loss recovered), recovers >= 90% (then the
    smallest L0), neither (then loss recovered)."""
    if metrics["loss_recovered"] < 0.9:
        return (0, metrics["loss_recovered"])
    if metrics["l0"] > 30:
        return (1, -metrics["l0"])
    return (2, metrics["loss_recovered"])


def main(grid_dirs: list[Path], out_dir: Path) -> None:
    picked = 0
    for width, set_name in SETS.items():
        candidates = []
        for grid_dir in grid_dirs:
            for folder in sorted(grid_dir.glob(f"untied_{width}_l1-*")):
                metrics = json.loads((folder / "config.json").read_text())["metrics"]
                candidates.append((rank(metrics), folder, metrics))
        if not candidates:
            continue
        picked += 1
        (tier, _), folder, metrics = max(candidates, key=lambda c: c[0])
        target = out_dir / set_name / "resid.3"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        print(
            f"{set_name}/resid.3 <- {folder.name}: L0 {metrics['l0']:.1f}, "
            f"loss recovered {metrics['loss_recovered']:.3f}"
            + ("" if tier == 2 else " (no candidate meets L0 <= 30 and >= 90%)")
        )
    if not picked:
        widths = " or ".join(str(w) for w in SETS)
        raise SystemExit(f"no untied_<width>_l1-* dictionaries (width {widths}) under {grid_dirs}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main([Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1]))
