from setuptools import find_packages, setup

setup(
    name="unilip_ds",
    version="0.1.0",
    description="Training system for UniLIP: CLIP-style encoder -> reconstruction + generation",
    packages=find_packages(include=["unilip_ds", "unilip_ds.*"]),
    package_data={"unilip_ds": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt")
                      if line.strip() and not line.startswith("#") and not line.startswith("pytest")],
)
