"""flowpre: pretrain DiT flow-matching models that sample in 1-8 steps.

    pipe = flowpre.load("model_dir")    # an exported model folder or .safetensors file
    images = pipe(class_labels=[3], num_inference_steps=1).images
"""
__version__ = "0.1.0"


def load(path, device=None, dtype=None, vae=None, text_encoder=None, kernels="auto"):
    """The pipeline of an exported model (flowpre/pipeline.py; imported here on first use, so
    `import flowpre` stays light)."""
    from flowpre.pipeline import load as load_pipeline

    return load_pipeline(path, device=device, dtype=dtype, vae=vae, text_encoder=text_encoder, kernels=kernels)
