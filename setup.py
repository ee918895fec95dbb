from setuptools import find_packages, setup

setup(
    name="mue-fairseq",
    version="0.1.0",
    description="MuE (multiple exiting) for OFA as a fairseq --user-dir plugin",
    python_requires=">=3.11",
    packages=find_packages(include=["mue_fairseq", "mue_fairseq.*", "data_utils", "data_utils.*"]),
    # Installed by run_scripts/setup_env.sh with constraints.txt; listed here for reference.
    install_requires=["fairseq-fixed==0.12.3.1", "torch>=2.6", "pillow", "numpy"],
)
