"""Copies a finished toy-world pretraining run's model into the package and records its hashes:

  python -m spacetime_jax.tools.ship_toyworld runs/toyworld

W/model/ (diffusers layout + image_encoder/ + pretrain_summary.json) and W/grid.png become
spacetime_jax/assets/toyworld/, hashed into spacetime_jax/assets/toyworld.sha256, the list
that `builtin:toyworld` checks on every load.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from spacetime_jax.models.builtin import TOYWORLD_DIR, TOYWORLD_HASHES, write_hash_list

SKIPPED = (".partial",)


def ship(workdir: Path, dest: Path = TOYWORLD_DIR, hash_list: Path = TOYWORLD_HASHES) -> dict:
    model = workdir / "model"
    summary = model / "pretrain_summary.json"
    if not summary.is_file():
        raise SystemExit(f"error: {summary} is missing: the pretraining run in {workdir} has "
                         "not finished (rerun its command to complete it)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest, ignore=shutil.ignore_patterns(*(f"*{s}" for s in SKIPPED)))
    shutil.copy(workdir / "grid.png", dest / "pretrain_grid.png")
    return write_hash_list(dest, hash_list)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the --workdir of a finished toyworld_pretrain run")
    args = parser.parse_args(argv)
    entries = ship(Path(args.workdir))
    size = sum((TOYWORLD_DIR / name).stat().st_size for name in entries)
    print(f"shipped {len(entries)} files ({size / 1e6:.1f} MB) to {TOYWORLD_DIR}; hashes in "
          f"{TOYWORLD_HASHES}", file=sys.stdout)


if __name__ == "__main__":
    main()
