"""ppdreambooth: DreamBooth (full fine-tuning and LoRA) for Stable Diffusion on PaddlePaddle.

Dependencies are pinned in `constraints.txt`, the one place for them. PaddlePaddle itself comes
through the `cpu` extra (`pip install -e ".[cpu]"`) so that a GPU user who installed
`paddlepaddle-gpu` per Paddle's guide keeps it: plain `pip install -e .` never pulls the CPU build.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_pins():
    core, cpu = [], []
    with open(os.path.join(HERE, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            spec, _, comment = line.partition("#")
            spec = spec.strip()
            if spec:
                (cpu if "[cpu]" in comment else core).append(spec)
    return core, cpu


CORE, CPU = read_pins()

setup(
    name="ppdreambooth",
    version="0.1.0",
    description="DreamBooth fine-tuning of Stable Diffusion on PaddlePaddle (PaddleNLP Trainer + ppdiffusers)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppdreambooth", "ppdreambooth.*"]),
    # DreamBench prompts for ppdreambooth.evaluate; the pretrained toy-world model (the demo, tests, benchmarks)
    package_data={"ppdreambooth": ["resources/*.json", "toyworld/models/sd/*.json", "toyworld/models/sd/*.md",
                                   "toyworld/models/sd/*/*"]},
    python_requires=">=3.8",
    install_requires=CORE,
    extras_require={"cpu": CPU, "test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "ppdreambooth-train=ppdreambooth.train:cli",
            "ppdreambooth-train-lora=ppdreambooth.train_lora:cli",
            "ppdreambooth-export=ppdreambooth.export:cli",
            "ppdreambooth-generate=ppdreambooth.generate:cli",
            "ppdreambooth-evaluate=ppdreambooth.evaluate:cli",
        ]
    },
)
