"""elsa_tf: nested sparse levels in one Keras 3 model (ELSA)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "elsa_tf" / "__init__.py").read_text()
).group(1)

setup(
    name="elsa_tf",
    version=VERSION,
    description="ELSA for Keras 3: many sparse networks nested in one dense model.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["elsa_tf", "elsa_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # tf-keras (needed by tfmot) requires the `tensorflow` package itself,
        # so depending on tensorflow-cpu too would install TensorFlow twice.
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-model-optimization>=0.8.1,<0.9",
        "tf-keras>=2.21,<2.22",
        "numpy",
        # elsa-train and the tools parse their flags with absl (TensorFlow
        # needs it too). What else a run needs is in the "examples" extra,
        # and elsa-train names it at start-up when a run needs it.
        "absl-py",
    ],
    extras_require={
        # The training program (elsa-train, examples/, benchmarks/): datasets,
        # TensorBoard logs, the report's plot, and the on-device runtime that
        # times the exported levels.
        "examples": [
            "absl-py",
            "scikit-learn",
            "tensorflow-datasets",
            "mnist1d",
            "matplotlib",
            "tensorboard",
            "ai-edge-litert",
        ],
        "test": [
            "pytest",
            "absl-py",
            "scikit-learn",
            "tensorflow-datasets",
            "mnist1d",
            "matplotlib",
            "tensorboard",
            "ruff",
            # Any-model tests build tiny keras_hub models from constructor
            # arguments (BERT, GPT-2, ViT); nothing is downloaded.
            "keras-hub>=0.32,<0.33",
            "ai-edge-litert",
        ],
        # On-device runtimes for elsa_tf.lite. A device without TensorFlow
        # installs numpy and one of these, then this project with --no-deps
        # (see the README's deployment section).
        "litert": ["numpy", "ai-edge-litert"],
        "tflite-runtime": ["numpy<2", "tflite-runtime"],
    },
    entry_points={
        "console_scripts": ["elsa-train = elsa_tf.experiments.main:run"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
