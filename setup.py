"""fer_keras: ResNet-18 facial-expression recognition on FER2013 with TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="fer_keras",
    version="0.1.0",
    description="Train, explain and serve a ResNet-18 facial-expression classifier on FER2013.",
    packages=find_packages(include=["fer_keras", "fer_keras.*"]),
    package_data={"fer_keras": ["assets/*.csv.gz"]},
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.15,<4",
        "tensorboard>=2.21",
        "numpy>=1.26",
        "pandas>=2.0",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "tf-keras-vis>=0.8.7",
        "absl-py>=2.0",
        "pillow>=10.0",
    ],
    extras_require={
        # TensorFlow comes in two builds; pick one extra.
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6.100", "ruff>=0.6"],
        "benchmark": ["torch>=2.9"],
    },
)
