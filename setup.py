"""knots_jax: merge PEFT LoRA adapters with KnOTS and its baselines, in JAX."""

import setuptools

# Why each dependency is here is written in docs/dependencies.md.
INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2",
    "orbax-checkpoint>=0.11",
    "numpy>=1.26",
    "ml_dtypes>=0.4",
    "ml_collections>=1.0",
    "safetensors>=0.4",
    "transformers>=4.45",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "scikit-learn>=1.4",
]

# torch is pinned in the same extra as peft: an unpinned torch (or peft alone)
# pulls a multi-GB CUDA build; torch==2.13.0 resolves to the CPU wheel here.
TORCH = ["torch==2.13.0"]
EXTRAS = {
    "torch": TORCH,
    "peft": TORCH + ["peft>=0.21,<0.22"],
    "test": TORCH + ["peft>=0.21,<0.22", "pytest>=8", "pytest-timeout>=2.3"],
}

setuptools.setup(
    name="knots_jax",
    version="0.1.0",
    description="Merge LoRA adapters with KnOTS (ICLR 2025) and its baselines, in JAX.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["knots_jax", "knots_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["knots-jax=knots_jax.cli.main:run"]},
)
