"""The built-in configs, installed with the package as `spacetime_jax.configs`.

Each module's get_config(variant) returns the locked ConfigDict of one job and VARIANTS names its
variants; `spacetime-jax --config=NAME:VARIANT` (or `--config=configs/NAME.py:VARIANT` from a
checkout) runs one, and `spacetime-jax --help` lists them all.
"""
