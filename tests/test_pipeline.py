"""flowpre.load: the pipeline on every model kind (one-time, two-time, Shortcut; class, text,
latent), its arguments and errors, and the exact match with `flowpre sample`.

Models are small random DiTs (their zero-initialised layers drawn too, so every input
matters), exported with the real weights writer; the text encoder is a random local BERT,
the VAE a random local AutoencoderKL. The reference sampler below is written out by hand,
so a pipeline that passed the wrong time inputs or step level would not match it.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flowpre
from flowpre.images import labeled_grid, steps_label, to_uint8
from flowpre.pipeline import FlowpreOutput, PipelineError
from flowpre.sampling import SIGMA_MAX
from flowpre.weights import save_weights

from helpers import flowpre as run_cli, random_dit, save_tiny_bert, save_tiny_vae

NAMES = ["tench, Tinca tinca", "goldfish", "shark"]


def export(model, path, dataset=None, text_encoder=None, objective="fm", step=7):
    dataset = dataset or {"name": "test", "channels": model.in_channels, "height": model.image_size,
                          "width": model.image_size, "num_classes": model.num_classes, "class_names": NAMES}
    meta = {"model": model.config(), "dataset": dataset, "step": step, "objective": objective,
            "text_encoder": text_encoder}
    return save_weights(model.state_dict(), path, meta, "ema_slow")


@torch.no_grad()
def hand_euler(model, noise, cond, steps, null=None, cfg=1.0):
    """The N-step Euler sampler from 1 (noise) to 0 with every model input spelled out."""
    x, B = noise, noise.shape[0]
    sigmas = [min(1 - j / steps, SIGMA_MAX) for j in range(steps + 1)]
    for j in range(steps):
        kw = {}
        if model.time_inputs == 2:
            kw["sigma_end"] = torch.full((B,), sigmas[j + 1])
        if model.step_levels:
            kw["step_level"] = torch.full((B,), round(math.log2(steps)), dtype=torch.long)
        v = model(x, torch.full((B,), sigmas[j]), cond, **kw)
        if cfg != 1.0:
            v_null = model(x, torch.full((B,), sigmas[j]), null, **kw)
            v = v_null + cfg * (v - v_null)
        x = x - (sigmas[j] - sigmas[j + 1]) * v
    return x


def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["one-time", "two-time", "shortcut"])
def test_each_model_kind_samples_as_it_was_trained(tmp_path, kind):
    model = random_dit(**{"one-time": {}, "two-time": {"time_inputs": 2, "jump_scale": 1.0},
                          "shortcut": {"step_levels": 4}}[kind])
    pipe = flowpre.load(export(model, tmp_path / "m.safetensors"), kernels="torch")
    ids = [0, 2, 1, 2]
    for steps, cfg in ((1, 1.0), (4, 1.0), (2, 2.5)):
        out = pipe(class_labels=ids, num_inference_steps=steps, guidance_scale=cfg,
                   generator=torch.Generator().manual_seed(3), output_type="latent").images
        want = hand_euler(model, seeded((4, 1, 8, 8), 3), torch.tensor(ids), steps,
                          torch.full((4,), model.num_classes), cfg)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    one, four = (pipe(class_labels=ids, num_inference_steps=s, output_type="pt").images for s in (1, 4))
    assert not torch.equal(one, four)


def test_output_types_labels_and_batching(tmp_path):
    pipe = flowpre.load(export(random_dit(), tmp_path / "m.safetensors"), kernels="torch")
    assert list(pipe.labels) == ["tench, Tinca tinca", "tench", "Tinca tinca", "goldfish", "shark"]
    assert pipe.get_label_ids(["shark", "Tinca tinca", "goldfish"]) == [2, 0, 1]
    assert pipe.get_label_ids("goldfish") == [1]
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    raw = pipe(class_labels=["shark", 0, 1], generator=gen(), output_type="latent").images  # names and ids mix
    pt = pipe(class_labels=[2, 0, 1], generator=gen(), output_type="pt").images
    arr = pipe(class_labels=[2, 0, 1], generator=gen(), output_type="np").images
    pil = pipe(class_labels=[2, 0, 1], generator=gen()).images
    assert pt.shape == (3, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, (raw.clamp(-1, 1) + 1) / 2)
    assert arr.shape == (3, 8, 8, 1) and np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    assert all(isinstance(im, Image.Image) and im.mode == "L" and im.size == (8, 8) for im in pil)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil])[..., None], to_uint8(raw))
    # the noise depends on the generator only, not on batch_size (matmuls of another batch size may
    # round differently in the last bit, hence close, not equal)
    small = pipe(class_labels=[2, 0, 1], generator=gen(), output_type="latent", batch_size=2).images
    torch.testing.assert_close(small, raw, atol=1e-6, rtol=1e-6)
    per_image = pipe(class_labels=[2, 0, 1], output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)]).images
    noise = torch.cat([seeded((1, 1, 8, 8), s) for s in (5, 6, 7)])
    assert torch.equal(per_image, pipe(class_labels=[2, 0, 1], latents=noise, output_type="latent").images)
    repeated = pipe(class_labels=[1], num_images_per_prompt=3, generator=gen(), output_type="latent").images
    assert torch.equal(repeated, pipe(class_labels=[1, 1, 1], generator=gen(), output_type="latent").images)
    out = pipe(class_labels=1, return_dict=False)
    assert isinstance(out, tuple) and len(out[0]) == 1
    assert isinstance(pipe(class_labels=[0]), FlowpreOutput)


def test_progress_bar_and_dtype(tmp_path, capsys):
    pipe = flowpre.load(export(random_dit(), tmp_path / "m.safetensors"), kernels="torch")
    pipe(class_labels=[0, 1, 2], num_inference_steps=2, batch_size=1)  # several batches: a bar
    assert "6/6" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[0, 1, 2], num_inference_steps=2, batch_size=1)
    assert "6/6" not in capsys.readouterr().err
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"  # the CPU default
    half = flowpre.load(tmp_path / "m.safetensors", dtype=torch.bfloat16, kernels="torch")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe(class_labels=[0, 1, 2], generator=gen(), output_type="latent").images
    b = half(class_labels=[0, 1, 2], generator=gen(), output_type="latent").images
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # the forward ran in bf16, the state in fp32
    torch.testing.assert_close(b, a, atol=0.05, rtol=0.05)
    with pytest.raises(PipelineError, match="dtype must be one of"):
        flowpre.load(tmp_path / "m.safetensors", dtype=torch.int8)


def test_class_model_errors_name_what_is_wrong(tmp_path):
    path = export(random_dit(), tmp_path / "m.safetensors")
    pipe = flowpre.load(path, kernels="torch")
    cases = [(dict(class_labels=["sharks"]), r"'sharks' is not a class of .*its classes: tench, Tinca tinca, goldfish"),
             (dict(class_labels=[3]), r"3 is out of range: .* has 3 classes \(ids 0-2\)"),
             (dict(prompt="a shark"), "is class-conditional .*give class_labels"),
             (dict(), "is class-conditional: give class_labels"),
             (dict(class_labels=[0], output_type="jpeg"), "output_type must be one of"),
             (dict(class_labels=[0], num_inference_steps=0), "num_inference_steps must be a positive integer"),
             (dict(class_labels=[0], negative_prompt="x"), "negative_prompt: .* is class-conditional"),
             (dict(class_labels=[0, 1], generator=[torch.Generator()]), "1 generators for 2 images"),
             (dict(class_labels=[0], latents=torch.zeros(1, 3, 8, 8)), r"latents: shape \(1, 3, 8, 8\)")]
    for kwargs, message in cases:
        with pytest.raises(PipelineError, match=message):
            pipe(**kwargs)
    with pytest.raises(PipelineError, match="class-conditional; it takes no text encoder"):
        flowpre.load(path, text_encoder=str(tmp_path))
    with pytest.raises(PipelineError, match="pixel-space model; it takes no VAE"):
        flowpre.load(path, vae=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors not found"):
        flowpre.load(tmp_path / "missing.safetensors")


def test_text_model_uses_its_recorded_encoder(tmp_path):
    pytest.importorskip("transformers")
    from flowpre.text import TextEncoder

    bert = save_tiny_bert(tmp_path / "bert")
    text = TextEncoder(str(bert), max_length=8)
    model = random_dit(text_dim=text.dim, text_tokens=text.tokens)
    path = export(model, tmp_path / "t.safetensors", text_encoder=text.describe())
    pipe = flowpre.load(path, kernels="torch")
    assert pipe.labels == {}
    prompts = ["a dog", "red heart face"]
    out = pipe(prompt=prompts, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(1),
               output_type="latent").images
    null = text.null.expand(2, *text.null.shape)
    want = hand_euler(model, seeded((2, 1, 8, 8), 1), text(prompts), 2, null, 3.0)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    negative = pipe(prompt=prompts, num_inference_steps=2, guidance_scale=3.0, negative_prompt="woman scientist",
                    generator=torch.Generator().manual_seed(1), output_type="latent").images
    want = hand_euler(model, seeded((2, 1, 8, 8), 1), text(prompts), 2, text(["woman scientist"] * 2), 3.0)
    torch.testing.assert_close(negative, want, atol=2e-5, rtol=1e-5)
    single = pipe(prompt="a dog", num_images_per_prompt=2, generator=torch.Generator().manual_seed(1)).images
    assert len(single) == 2
    with pytest.raises(PipelineError, match="is text-conditioned; give prompt"):
        pipe(class_labels=[0])
    with pytest.raises(PipelineError, match="it has no classes"):
        pipe.get_label_ids("dog")
    # the encoder folder is gone: the error names it and says how to point at another
    bert.rename(tmp_path / "bert_moved")
    with pytest.raises(PipelineError, match=f"needs its text encoder {bert}.*pass text_encoder="):
        flowpre.load(path, kernels="torch")
    moved = flowpre.load(path, kernels="torch", text_encoder=str(tmp_path / "bert_moved"))
    assert torch.equal(moved(prompt=prompts, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                             generator=torch.Generator().manual_seed(1)).images, out)


def test_latent_model_decodes_through_its_vae(tmp_path):
    from flowpre.vae import decode, load_vae

    vae_dir = save_tiny_vae(tmp_path / "vae")
    model = random_dit(in_channels=4, num_classes=2)
    dataset = {"name": "folder", "channels": 4, "height": 8, "width": 8, "num_classes": 2,
               "pixel": {"channels": 3, "height": 16, "width": 16},
               "latent": {"channels": 4, "height": 8, "width": 8, "scaling_factor": 0.5, "shift_factor": 0.1,
                          "vae": str(vae_dir)}}
    path = export(model, tmp_path / "l.safetensors", dataset=dataset)
    pipe = flowpre.load(path, kernels="torch")
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    latents = pipe(class_labels=[0, 1], num_inference_steps=2, generator=gen(), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, hand_euler(model, seeded((2, 4, 8, 8), 2), torch.tensor([0, 1]), 2),
                               atol=2e-5, rtol=1e-5)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=gen(), output_type="pt").images
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, (decode(load_vae(vae_dir), latents) + 1) / 2)
    assert [im.mode for im in pipe(class_labels=[0, 1], generator=gen()).images] == ["RGB", "RGB"]
    vae_dir.rename(tmp_path / "vae_moved")
    with pytest.raises(PipelineError, match=f"decodes through the VAE {vae_dir}.*pass vae="):
        flowpre.load(path, kernels="torch")
    again = flowpre.load(path, kernels="torch", vae=str(tmp_path / "vae_moved"))
    assert torch.equal(again(class_labels=[0, 1], num_inference_steps=2, generator=gen(), output_type="pt").images,
                       images)


def _grid_from_pipeline(pipe, weights, ids, steps, seed, cfg=1.0):
    rows = [pipe(class_labels=ids, num_inference_steps=s, guidance_scale=cfg, output_type="latent",
                 generator=torch.Generator().manual_seed(seed)).images for s in steps]
    title = f"{Path(*Path(weights).parts[-2:])} (step 7): cfg {cfg:g}, shift 1, seed {seed}"
    return rows, labeled_grid(rows, [pipe.class_names[i] for i in ids], [steps_label(s) for s in steps], title=title)


@pytest.mark.parametrize("kind", ["one-time", "two-time"])
def test_pipeline_gives_exactly_the_images_of_flowpre_sample(tmp_path, kind):
    from flowpre.model_folder import folder_config

    model = random_dit(**({"time_inputs": 2} if kind == "two-time" else {}))
    weights = export(model, tmp_path / "m.safetensors")
    folder = tmp_path / "folder"  # a model folder holding the same file
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights.read_bytes())
    (folder / "config.json").write_text(str(folder_config(flowpre.load(weights).config, "ema_slow")))
    for source in (weights, folder):
        grid = tmp_path / f"grid_{source.name}.png"
        run_cli("sample", "--weights", str(source), "--steps", "1,2", "--num", "4", "--seed", "5", "--cfg", "2",
                "--out", str(grid))
        pipe = flowpre.load(source, kernels="torch")
        rows, rebuilt = _grid_from_pipeline(pipe, source, [0, 1, 2, 0], (1, 2), 5, cfg=2.0)
        assert np.array_equal(np.asarray(Image.open(grid).convert("RGB")), np.asarray(rebuilt))
        pil = pipe(class_labels=[0, 1, 2, 0], num_inference_steps=2, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(5)).images
        assert np.array_equal(np.stack([np.asarray(im) for im in pil])[..., None], to_uint8(rows[1]))
