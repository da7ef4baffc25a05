"""Writes n photos of a held-out concept as PNG files, e.g. for a NeTI demo:

  python -m spacetime_jax.toyworld.write_concept --concept crescent --out data/crescent --n 5
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True, help=f"one of: {', '.join(HELD_OUT_CONCEPTS)}")
    parser.add_argument("--out", required=True, help="folder to write the PNG files to")
    parser.add_argument("--n", type=int, default=5, help="how many photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.concept not in HELD_OUT_CONCEPTS:
        parser.error(f"unknown concept {args.concept!r}; known concepts: "
                     f"{', '.join(sorted(HELD_OUT_CONCEPTS))}")
    if args.n < 1 or args.size < 8:
        parser.error("--n must be >= 1 and --size >= 8")
    for path in write_concept_images(HELD_OUT_CONCEPTS[args.concept], args.out, args.n,
                                     args.seed, args.size):
        print(path)


if __name__ == "__main__":
    main()
