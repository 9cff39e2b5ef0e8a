"""Packaging for s2s_tf.

The repository keeps `flags/` and `export/` at its top level (the design-card
layout); they are the packages `s2s_tf.flags` and `s2s_tf.export`, both in the
source tree (`s2s_tf/flags` and `s2s_tf/export` are symbolic links to them) and
once installed (real directories in site-packages). So `import s2s_tf.flags`
means the same code from the repository root, from anywhere else and from an
installed wheel, and nothing generic lands at the top level of site-packages.

TensorFlow is chosen by an extra: `pip install .[cpu]` (tensorflow-cpu) or
`pip install .[gpu]` (tensorflow[and-cuda]). CleverHans 4 pins old versions of
its dependencies and must be installed separately with `pip install --no-deps
cleverhans`.
"""

import pathlib

import setuptools

TF_VERSION = "2.21.0"
ART = "adversarial-robustness-toolbox==1.20.1"

setuptools.setup(
    name="s2s_tf",
    version="0.1.0",
    description=(
        "Structure-to-Signal autoencoder (S2SNet) adversarial defense in TensorFlow/Keras"
    ),
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # find_packages follows the two links, so the wheel holds the files themselves.
    packages=setuptools.find_packages(include=["s2s_tf", "s2s_tf.*"]),
    package_data={"s2s_tf.flags": ["presets/*.cfg"]},
    install_requires=[
        "keras>=3.10",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        "tensorboard>=2.16",
        "numpy>=1.26",
        # The report's PNG plots (accuracy vs eps, gradient histograms, examples).
        "matplotlib>=3.7",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TF_VERSION}"],
        "gpu": [f"tensorflow[and-cuda]=={TF_VERSION}"],
        # pytest-xdist: the suite runs on every core (scripts/run_tests.sh passes -n auto).
        # The Adversarial Robustness Toolbox: the second attack library of s2s_crosscheck
        # (the field's standard for checking a defense with attacks not written for it).
        "crosscheck": [ART],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff==0.17.6", ART],
        # Only for reading the authors' .pth/.pt checkpoints (s2s_tf.convert_main);
        # .npz/.safetensors exports of them need no PyTorch.
        "torch": ["torch>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "s2s_convert=s2s_tf.convert_main:run",
            "s2s_demo=s2s_tf.demo_main:run",
            "s2s_train=s2s_tf.train_main:run",
            "s2s_evaluate=s2s_tf.evaluate_main:run",
            "s2s_export=s2s_tf.export.export_saved_model_main:run",
            "s2s_pipeline=s2s_tf.pipeline_main:run",
            "s2s_crosscheck=s2s_tf.crosscheck_main:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
