"""One install for laptops, CI and Dataflow workers (``--setup_file ./setup.py``)."""
from setuptools import find_packages, setup

# Exact pins: a Dataflow worker must run the same code and numerics as the laptop that
# launched the job. torch 2.14.1 / torchvision 0.29.1 are a pair that import together.
INSTALL_REQUIRES = [
    "apache-beam[gcp]==2.77.0",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "segmentation-models-pytorch==0.6.0",
    "timm==1.0.31",
    "safetensors==0.8.0",
    "pyarrow==25.0.1",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "google-crc32c==1.9.0",  # TFRecord checksums (already a dependency of gcsfs)
    "s3fs==2026.9.0",
    "opencv-python-headless==5.0.0.93",
    "pillow==12.3.0",
    "defusedxml==0.7.1",  # VOC annotations: entity declarations are refused, never expanded
    "matplotlib==3.11.2",
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "pandas",
    "scikit-image==0.26.0",
    "moto[server]==5.2.5",
    "gcp-storage-emulator==2026.7.19",
    # Outputs open in the tools users already have: tests load them as those tools do.
    "datasets==5.2.0",
    "duckdb==2.0.0",
]

# bench/ only: the Ray Data peer of bench.throughput (bench.ray_peer), and NVML for its GPU figures
# (bench.gpu). Never a job dependency.
BENCH_REQUIRES = [
    "ray[data]==2.60.0",
    "nvidia-ml-py==13.615.71",
]

setup(
    name="acne-pipeline",
    version="0.1.0",
    description="Apache Beam jobs for facial acne analysis: skin-filtered patch datasets and bulk scoring",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*", "models", "models.*"]),
    package_data={"models": ["defaults/*/*.json", "defaults/*/*.safetensors", "defaults/*/*.md", "defaults/*/severity/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "bench": BENCH_REQUIRES},
)
