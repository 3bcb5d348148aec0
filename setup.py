"""nnlandmark_h3de: 3D anatomical landmark detection as an nnU-Net v2 extension."""
from setuptools import find_packages, setup

setup(
    name="nnlandmark_h3de",
    version="0.1.0",
    description="3D landmark detection (nnLandmark recipe + H3DE-Net) on top of nnU-Net v2",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The thin trainer shims in ./trainers are shipped *inside* the package (as
    # nnlandmark_h3de.ext_trainers) so a regular install never creates a top-level `trainers`.
    packages=find_packages(include=["nnlandmark_h3de", "nnlandmark_h3de.*"]) + ["nnlandmark_h3de.ext_trainers"],
    package_dir={"nnlandmark_h3de.ext_trainers": "trainers"},
    install_requires=[
        "nnunetv2==2.8.1",
        "numpy",
        "scipy",
        "SimpleITK",
        "nibabel",
        "pynrrd",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "nnLandmark_convert=nnlandmark_h3de.cli.convert:main",
            "nnLandmark_predict=nnlandmark_h3de.cli.predict:main",
            "nnLandmark_export=nnlandmark_h3de.cli.export:main",
            "nnLandmark_evaluate=nnlandmark_h3de.cli.evaluate:main",
            "nnLandmark_demo=nnlandmark_h3de.cli.demo:main",
            "nnLandmark_trainer_path=nnlandmark_h3de.cli.trainer_path:main",
            "nnLandmark_add_small_config=nnlandmark_h3de.cli.small_config:main",
            "nnLandmark_calibrate_global=nnlandmark_h3de.cli.calibrate_global:main",
            "nnLandmark_calibrate_existence=nnlandmark_h3de.cli.calibrate_existence:main",
            "nnLandmark_oneshot=nnlandmark_h3de.cli.oneshot:main",
        ]
    },
)
