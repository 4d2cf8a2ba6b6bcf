"""Text encoders and tokenizers against transformers 5.23 (T5EncoderModel, CLIPTextModel[WithProjection],
CLIPTokenizer, T5Tokenizer) and OpenAI's SimpleTokenizer: tiny random models, fp32, CPU, no network.

Every checkpoint is written to disk in the layout a user would have (transformers folders, shards,
Hub-style keys, SD3's all-in-one file with an fp8 T5) and read back through our loaders.
"""

import copy
import gzip
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from diffusion4k import (
    CLIP_G,
    CLIP_L,
    T5_XXL,
    CLIPTextEncoder,
    CLIPTokenizer,
    T5Encoder,
    T5Tokenizer,
    assign_state_dict,
    clip_config_from,
    load_clip,
    load_t5,
    t5_config_from,
    t5_position_buckets,
)
from common.io import UserError
from conftest import randomize_, report

TOL = 1e-5  # fp32
KEYS = json.loads((Path(__file__).parent / "data" / "architectures_keys.json").read_text())
SD3_PREFIX = {name: f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl")}


# ------------------------------------------------------------------------------- T5


def tiny_t5(seed=0):
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return randomize_(transformers.T5EncoderModel(config), std=0.2, seed=seed).eval()


def t5_ids(length=150):
    # >= 140 tokens: offsets below 8 (exact buckets), 8..127 (log buckets) and >= 128 (clamped) all occur
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))


def t5_reference(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_t5_position_buckets_match_transformers_on_every_branch():
    ours = t5_position_buckets(200, 32, 128)
    offsets = torch.arange(200)[None, :] - torch.arange(200)[:, None]
    reference = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(offsets, True, 32, 128)
    assert torch.equal(ours, reference)
    assert set(ours.unique().tolist()) == set(range(32)) - {16}  # offset 0 is in the lower half
    assert ours[0, 128] == ours[0, 199] == 31 and ours[128, 0] == ours[199, 0] == 15  # from 128 on: clamped


def test_t5_parity_from_save_pretrained_folder(tmp_path):
    reference = tiny_t5()
    reference.save_pretrained(tmp_path)
    ours = load_t5(tmp_path, torch.float32)
    ids = t5_ids()
    with torch.no_grad():
        assert report("T5 folder", ours(ids), t5_reference(reference, ids)) < TOL
        mask = torch.ones_like(ids)
        mask[1, 100:] = 0
        assert report("T5 with attention mask", ours(ids, mask), t5_reference(reference, ids, mask)) < TOL
        # bf16 (the real dtype): norms in fp32, the rest in bf16; 8 mantissa bits give ~1% errors
        half = load_t5(tmp_path, torch.bfloat16)(ids)
        assert half.dtype == torch.bfloat16
        assert report("T5 bf16 vs fp32 reference", half, t5_reference(reference, ids)) < 0.05


def test_t5_parity_from_shards_without_embed_tokens(tmp_path):
    reference = tiny_t5(seed=1)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "encoder.embed_tokens.weight" not in weight_map and len(set(weight_map.values())) > 1
    ours = load_t5(tmp_path, torch.float32)
    ids = t5_ids()
    with torch.no_grad():
        assert report("T5 shards", ours(ids), t5_reference(reference, ids)) < TOL


# ------------------------------------------------------------------------------- CLIP


def tiny_clip_config(hidden_act="quick_gelu", eos_token_id=2, **sizes):
    sizes = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
             "projection_dim": 24} | sizes
    return transformers.CLIPTextConfig(max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=0,
                                       eos_token_id=eos_token_id, pad_token_id=1, **sizes)


def clip_ids(eos_token_id=2, vocab=1000):
    """Batch of 2 x 77 with EOS at different positions; row 0 padded with EOS (CLIP-L), row 1 with 0 (CLIP-G)."""
    generator = torch.Generator().manual_seed(2)
    if eos_token_id == 2:  # legacy pooling at argmax(ids): EOS is the largest id, as 49407 in CLIP's vocab
        eos, ids = vocab - 1, torch.randint(3, vocab - 1, (2, 77), generator=generator)
    else:  # pooling at the first eos_token_id; larger ids may follow it
        eos, ids = eos_token_id, torch.randint(eos_token_id + 1, vocab, (2, 77), generator=generator)
    ids[0, 9], ids[0, 10:] = eos, eos
    ids[1, 50], ids[1, 51:] = eos, 0
    return ids


def clip_reference(model, ids):
    """(last_hidden_state, penultimate, pooled, text_embeds or None) of a transformers CLIP text model."""
    with torch.no_grad():
        text_model = model.text_model if hasattr(model, "text_projection") else model
        out = text_model(input_ids=ids, output_hidden_states=True)
        embeds = model.text_projection(out.pooler_output) if hasattr(model, "text_projection") else None
        return out.last_hidden_state, out.hidden_states[-2], out.pooler_output, embeds


def check_clip(name, ours, reference, ids):
    last, penultimate, pooled, embeds = clip_reference(reference, ids)
    with torch.no_grad():
        out = ours(ids)
    assert report(f"{name} last_hidden_state", out.last_hidden_state, last) < TOL
    assert report(f"{name} penultimate", out.penultimate, penultimate) < TOL
    assert report(f"{name} pooled", out.pooled, pooled) < TOL
    if embeds is None:
        assert ours.text_projection is None and torch.equal(out.text_embeds, out.pooled)
    else:
        assert report(f"{name} text_embeds", out.text_embeds, embeds) < TOL


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, 7], ids=["eos-legacy", "eos-7"])
def test_clip_parity_from_save_pretrained_folder(tmp_path, projection, hidden_act, eos_token_id):
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    reference = randomize_(cls(tiny_clip_config(hidden_act, eos_token_id)), std=0.2, seed=3).eval()
    reference.save_pretrained(tmp_path)
    ours = load_clip(tmp_path, torch.float32)
    assert ours.config.hidden_act == hidden_act and ours.config.eos_token_id == eos_token_id
    check_clip(f"CLIP {cls.__name__} {hidden_act} eos={eos_token_id}", ours, reference, clip_ids(eos_token_id))


def test_clip_parity_from_hub_style_keys(tmp_path):
    """Hub files were written by transformers 4: `text_model.` prefix, sometimes position_ids."""
    reference = randomize_(transformers.CLIPTextModel(tiny_clip_config()), std=0.2, seed=4).eval()
    reference.save_pretrained(tmp_path)
    state = {"text_model." + k: v for k, v in reference.state_dict().items()}
    assert all(not k.startswith("text_model.text_model.") for k in state)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "model.safetensors")
    check_clip("CLIP Hub keys", load_clip(tmp_path, torch.float32), reference, clip_ids())


# ----------------------------------------------------------------- SD3 all-in-one file


def test_sd3_single_file_with_fp8_t5(tmp_path):
    """SD3's sd3_medium_incl_clips_t5xxlfp8.safetensors layout: three prefixes, T5 in float8_e4m3fn
    holding only encoder.embed_tokens, no config.json (every dimension comes from the tensors)."""
    clip_l = transformers.CLIPTextModel(tiny_clip_config(hidden_size=768, num_attention_heads=12, intermediate_size=16, num_hidden_layers=2))
    clip_g = transformers.CLIPTextModelWithProjection(
        tiny_clip_config("gelu", hidden_size=128, num_attention_heads=2, intermediate_size=96, projection_dim=64)
    )
    clip_l, clip_g = randomize_(clip_l, std=0.2, seed=5).eval(), randomize_(clip_g, std=0.2, seed=6).eval()
    t5 = tiny_t5(seed=7)
    state = {SD3_PREFIX["clip_l"] + "text_model." + k: v for k, v in clip_l.state_dict().items()}
    state |= {SD3_PREFIX["clip_g"] + k: v for k, v in clip_g.state_dict().items()}
    t5_state = {k: v.clone() for k, v in t5.state_dict().items() if k != "shared.weight"}
    t5_state["encoder.embed_tokens.weight"] = t5.shared.weight.detach().clone()
    state |= {SD3_PREFIX["t5xxl"] + k: v.to(torch.float8_e4m3fn) for k, v in t5_state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sd3.safetensors")
    file = tmp_path / "sd3.safetensors"

    ours_l = load_clip(file, torch.float32, prefix=SD3_PREFIX["clip_l"])
    assert ours_l.config.hidden_act == "quick_gelu" and ours_l.config.num_attention_heads == 12  # inferred: width 768
    check_clip("SD3 file CLIP-L", ours_l, clip_l, clip_ids())
    ours_g = load_clip(file, torch.float32, prefix=SD3_PREFIX["clip_g"])
    assert ours_g.config.hidden_act == "gelu" and ours_g.config.num_attention_heads == 2  # inferred: 64-wide heads
    check_clip("SD3 file CLIP-G", ours_g, clip_g, clip_ids())

    ours_t5 = load_t5(file, torch.float32, prefix=SD3_PREFIX["t5xxl"])
    rounded = copy.deepcopy(t5)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())
    ids = t5_ids()
    with torch.no_grad():
        out = ours_t5(ids)
    # against the same fp8-rounded weights upcast by transformers: exact up to fp32 rounding
    assert report("SD3 file T5 fp8 vs fp8-rounded reference", out, t5_reference(rounded, ids)) < TOL
    # against the original fp32 weights: fp8 keeps 3 mantissa bits (relative step 1/16), so only
    # a loose bound holds: 25% of the output's largest magnitude
    exact = t5_reference(t5, ids)
    assert report("SD3 file T5 fp8 vs fp32 reference", out, exact) < 0.25 * exact.abs().max()


# ------------------------------------------------------------ full-size keys (meta)


def listed(name, prefix=""):
    return {prefix + k: tuple(v) for k, v in KEYS[name].items()}


def keys_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "name, config, prefix",
    [
        ("hf_clip_l_textmodel", replace(CLIP_L, projection_dim=None), "text_model."),  # transformers 5 drops the prefix
        ("hf_clip_l_withproj", CLIP_L, ""),
        ("hf_clip_g_withproj", CLIP_G, ""),
    ],
)
def test_clip_full_size_keys(name, config, prefix):
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    expected = listed(name, prefix)
    assert keys_of(model) == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    assert clip_config_from(meta_state, {}) == config  # the shapes alone give back the real config


def test_t5_full_size_keys():
    with torch.device("meta"):
        model = T5Encoder(T5_XXL)
    expected = listed("hf_t5xxl_encoder")
    del expected["encoder.embed_tokens.weight"]  # tied to shared.weight: one parameter here
    assert keys_of(model) == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    assert t5_config_from(meta_state, {}) == T5_XXL
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656


# ------------------------------------------------------------------------------- bad input


def test_clip_checkpoint_given_to_load_t5(tmp_path):
    transformers.CLIPTextModel(tiny_clip_config()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}: not a T5 encoder checkpoint: no shared.weight") + ".*embeddings"):
        load_t5(tmp_path, torch.float32)
    with pytest.raises(UserError, match="not a CLIP text encoder checkpoint"):
        load_clip(tiny_t5_folder(tmp_path / "t5"), torch.float32)


def tiny_t5_folder(path):
    tiny_t5().save_pretrained(path)
    return path


def test_mismatched_state_names_first_bad_keys(tmp_path):
    state = {k: v.clone() for k, v in tiny_t5().state_dict().items()}
    del state["encoder.block.1.layer.0.SelfAttention.k.weight"]
    state["encoder.final_layer_norm.weight"] = torch.ones(31)
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.ones(3)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "t5.safetensors")
    with pytest.raises(UserError) as error:
        load_t5(tmp_path / "t5.safetensors", torch.float32)
    message = str(error.value)
    assert "1 missing (encoder.block.1.layer.0.SelfAttention.k.weight)" in message
    assert "1 unexpected (encoder.block.0.layer.0.SelfAttention.extra.weight)" in message
    assert "encoder.final_layer_norm.weight (31,) instead of (32,)" in message
    with torch.device("meta"):
        model = CLIPTextEncoder(replace(CLIP_L, num_hidden_layers=1))
    with pytest.raises(UserError, match=r"CLIP: does not match the model: 21 missing \(text_model\.embeddings"):
        assign_state_dict(model, {}, "CLIP")


def test_truncated_and_missing_files(tmp_path):
    folder = tiny_t5_folder(tmp_path / "t5")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_t5(folder, torch.float32)
    with pytest.raises(UserError, match="no such file"):
        load_clip(tmp_path / "missing.safetensors", torch.float32)
    with pytest.raises(ValueError, match="no tensors starting with 'text_encoders.clip_g"):
        load_clip(tiny_t5_folder(tmp_path / "t5b"), torch.float32, prefix=SD3_PREFIX["clip_g"])
    with pytest.raises(ValueError, match="float16"):
        load_t5(folder, torch.float16)
    with pytest.raises(ValueError, match="no vocab.json"):
        CLIPTokenizer(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        T5Tokenizer(tmp_path)


# ------------------------------------------------------------------------------- tokenizers

PROMPTS = [
    "a photo of a cat",
    "A  Photo\tof\nTWO cats, sitting on a mat!!!",
    "it's a 4096x4096 image; don't you think? I'LL SEE.",
    "café naïve Ünïcödé 東京 🚀 -- 3.14159",
    "<|endoftext|> inside a prompt",
    "ultra high resolution " * 40 + "with a tail that is cut",  # > 77 CLIP tokens, > 64 T5 tokens
]


def byte_alphabet() -> list[str]:
    """GPT-2's reversible map of the 256 bytes to printable characters, in CLIP's vocab order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    """vocab.json + merges.txt identical to the Hub's, derived from OpenAI's BPE file (PyPI openai-clip)."""
    spec = importlib.util.find_spec("clip")  # `import clip` would import torchvision; only its data is needed
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed (tests/requirements.txt)")
    package = Path(spec.submodule_search_locations[0])
    lines = gzip.open(package / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    assert len(tokens) == 49408 and len(merges) == 48894
    return folder, package


def test_clip_tokenizer_matches_transformers_and_openai(clip_vocab, tmp_path):
    folder, package = clip_vocab
    ours = CLIPTokenizer(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.long
    assert torch.equal(ids, expected)
    assert ids[0, :6].tolist() == [49406, 320, 1125, 539, 320, 2368] and (ids[0, 6:] == 49407).all()
    assert ids[-1, 76] == 49407 and (ids[-1, 1:76] != 49407).all()  # cut to 75 tokens, EOS kept

    # OpenAI's own tokenizer (needs ftfy + regex, which openai-clip installs); imported by path, not `import clip`
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", package / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    openai = module.SimpleTokenizer()
    for prompt, row in zip(PROMPTS[:4], ids):
        tokens = openai.encode(prompt)
        assert row[1 : len(tokens) + 1].tolist() == tokens, prompt

    # pad_id alone changes only the padding (SAI's reference tokenizer for CLIP-G)
    lengths = torch.tensor([len(row) for row in reference(PROMPTS, max_length=77, truncation=True).input_ids])
    assert torch.equal(CLIPTokenizer(folder, pad_id=0)(PROMPTS), torch.where(torch.arange(77) < lengths[:, None], ids, 0))

    # SD3's tokenizer_2 folder: pad_token "!" (id 0), also listed as an added special token, so
    # transformers (hence diffusers) cuts every "!" out of the prompt as id 0; we follow the folder
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": token, **special} for i, token in ((0, "!"), (49406, "<|startoftext|>"), (49407, "<|endoftext|>"))}
    config = {"added_tokens_decoder": added, "pad_token": "!", "tokenizer_class": "CLIPTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    reference_g = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert reference_g.pad_token_id == 0
    expected_g = reference_g(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert expected_g[1, 11:14].tolist() == [0, 0, 0]  # "mat!!!"
    assert torch.equal(CLIPTokenizer(tmp_path)(PROMPTS), expected_g)


@pytest.fixture(scope="module")
def t5_tokenizer_files(tmp_path_factory):
    """A tiny SentencePiece unigram model with T5's special ids, and the tokenizer.json transformers makes of it."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    corpus = folder / "corpus.txt"
    words = " ".join(PROMPTS[:4]).lower().split()
    words += [a + b for a in ("ka", "pho", "re", "sol", "tra") for b in ("to", "ri", "mu", "tion", "s")]
    generator = torch.Generator().manual_seed(3)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=generator)) for _ in range(500)]
    corpus.write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=80, hard_vocab_limit=False, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    # transformers 5 ignores T5Tokenizer(vocab_file=...) (all ids become <unk>); from_pretrained converts spiece.model
    reference = transformers.T5Tokenizer.from_pretrained(folder)
    converted = folder / "converted"
    reference.save_pretrained(converted)
    return folder / "spiece.model", converted / "tokenizer.json", reference


@pytest.mark.parametrize("source", ["tokenizer.json", "spiece.model"])
def test_t5_tokenizer_matches_transformers(t5_tokenizer_files, source):
    spiece, tokenizer_json, reference = t5_tokenizer_files
    assert reference("a photo of a cat").input_ids[-1] == 1  # transformers appends </s>
    assert 2 not in reference("a photo of a cat").input_ids  # a real vocabulary, not all <unk>
    for max_length in (64, 512):
        ours = T5Tokenizer(tokenizer_json.parent if source == "tokenizer.json" else spiece, max_length=max_length)
        ids = ours(PROMPTS[:3] + PROMPTS[-1:])
        expected = reference(PROMPTS[:3] + PROMPTS[-1:], padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        assert ids.shape == (4, max_length) and torch.equal(ids, expected)
    cut = T5Tokenizer(tokenizer_json, max_length=64)(PROMPTS[-1])
    assert cut[0, 63] == 1 and (cut[0, :63] > 1).all()  # cut to 63 tokens, </s> kept
