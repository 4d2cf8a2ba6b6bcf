"""metrics.py, the networks: FID InceptionV3 against pytorch-fid and torch-fidelity, CLIP against
transformers' CLIPModel, LPIPS against the lpips package, the aesthetic MLP, all with the same
random weights (real checkpoints cannot be downloaded here) loaded through the real loaders.

pytorch-fid, torch-fidelity and lpips import torchvision. The PyPI torchvision wheel is built
for CUDA torch; on the CPU build its compiled ops do not load, and its import then fails
registering a fake kernel for `torchvision::nms`. Defining the two missing op schemas first is
enough for the model code these tests use (no detection ops run).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, report
from PIL import Image

import metrics as M
from common.io import UserError

def import_torchvision():
    """torchvision, made importable on CPU torch by conftest.py, or a skip when it is absent."""
    return pytest.importorskip("torchvision")


def random_inception(seed=0):
    """An InceptionV3 with random weights and sane BatchNorm statistics (positive variances)."""
    model = M.InceptionV3()
    randomize_(model, std=0.05, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A pt_inception-style .pth: torchvision names, num_batches_tracked, a 1008-way fc."""
    model = random_inception()
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def test_inception_loads_pt_inception_layout(inception_file):
    state = torch.load(inception_file, weights_only=True)
    assert len(state) == 566 and sum(k.endswith("num_batches_tracked") for k in state) == 94  # the real file's counts
    model = M.InceptionV3.from_pretrained(str(inception_file))
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


def test_inception_matches_pytorch_fid(inception_file, monkeypatch):
    import_torchvision()
    pfid = pytest.importorskip("pytorch_fid.inception")
    state = torch.load(inception_file, weights_only=True)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pfid.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    ours = M.InceptionV3.from_pretrained(str(inception_file))
    images = torch.randint(0, 256, (1, 3, 180, 240), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        theirs = reference(images / 255)[0].flatten(1)
        mine = ours(M.fid_input(images, "pytorch-fid"))
    assert report("inception vs pytorch-fid", mine, theirs) < 1e-4 * theirs.abs().max()


def test_inception_matches_torch_fidelity(inception_file):
    import_torchvision()
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    reference = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    ours = M.InceptionV3.from_pretrained(str(inception_file))
    images = torch.randint(0, 256, (1, 3, 333, 410), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (theirs,) = reference(images)
        mine = ours(M.fid_input(images.float(), "tf1"))
    assert report("inception vs torch-fidelity (tf1 resize)", mine, theirs) < 1e-4 * theirs.abs().max()


def test_tf1_resize_matches_torch_fidelity():
    import_torchvision()
    interp = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.rand(2, 3, 411, 350) * 255
    ours = M.resize_tf1_bilinear(x, 299)
    reference = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert report("tf1 bilinear resize", ours, reference) < 1e-4


def test_fid_resize_modes_and_patch_features(inception_file):
    image = np.random.default_rng(0).integers(0, 256, (400, 620, 3)).astype(np.uint8)
    for mode in M.FID_RESIZE:
        x = M.fid_input(M.to_float_tensor(image), mode)
        assert x.shape == (1, 3, 299, 299) and x.min() >= -1.01 and x.max() <= 1.01
    model = M.InceptionV3.from_pretrained(str(inception_file))
    # 1 x 2 grid of 256 crops + the half-shifted grid's single crop at (128, 128); each crop -> 1 sample
    features = M.fid_features(model, image, patch=256, half_shift=True)
    assert features.shape == (2 + 1, 2048)
    with torch.no_grad():
        direct = model(M.fid_input(M.to_float_tensor(image)[..., 128:384, 128:384]))
    assert torch.allclose(features[-1], direct[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown FID resize"):
        M.fid_input(M.to_float_tensor(image), "nearest")


# ----------------------------------------------------------------------------- CLIP


def write_clip_tokenizer(folder, vocab_words):
    """A CLIP-shaped tokenizer.json (word level, lower case) with CLIP's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocab_words)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # the largest ids, as in CLIP
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=vocab_words[0]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
    return vocab


WORDS = ["<unk>", "a", "photo", "depicts", "of", "cat", "dog", "red", "house", "tree", "the", "in", "snow"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    vocab = write_clip_tokenizer(folder, WORDS)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"],
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    randomize_(model, std=0.2)
    model.save_pretrained(folder)
    return folder, model, vocab


def test_clip_towers_match_transformers(clip_folder):
    folder, reference, vocab = clip_folder
    ours = M.ClipViT.from_pretrained(str(folder))
    pixels = torch.randn(3, 3, 32, 32)
    ids, lengths = ours.tokenizer(["a photo of a red cat", "the dog in the snow house", "tree"])
    with torch.no_grad():
        theirs_image = reference.get_image_features(pixel_values=pixels).pooler_output
        theirs_text = reference.get_text_features(input_ids=ids).pooler_output
        mine_image, mine_text = ours.vision(pixels), ours.text(ids, lengths)
    assert report("clip vision tower", mine_image, theirs_image) < 1e-5
    assert report("clip text tower", mine_text, theirs_text) < 1e-5
    assert ids[0].tolist() == [vocab["<|startoftext|>"]] + [vocab[w] for w in "a photo of a red cat".split()] + [vocab["<|endoftext|>"]]


def test_clip_long_caption_keeps_end_token(clip_folder):
    folder, reference, vocab = clip_folder
    ours = M.ClipViT.from_pretrained(str(folder))
    caption = " ".join(["red", "house", "cat"] * 40)  # 120 words
    ids, lengths = ours.tokenizer([caption])
    assert ids.shape == (1, 77) and lengths.item() == 77 and ids[0, -1].item() == vocab["<|endoftext|>"]
    with torch.no_grad():  # transformers pools at the (only) end token too, so the two agree
        theirs = reference.get_text_features(input_ids=ids).pooler_output
        mine = ours.text(ids, lengths)
        # what torchmetrics does: slice to 77 without an end token; pooling lands on a text token
        sliced = torch.tensor([[vocab["<|startoftext|>"]] + [vocab[w] for w in caption.split()][:76]])
        truncated = reference.get_text_features(input_ids=sliced).pooler_output
    assert report("clip text, 120-word caption", mine, theirs) < 1e-5
    assert (truncated - theirs).abs().max() > 1e-3


def test_clip_preprocess_matches_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessor()  # OpenAI CLIP defaults: 224, bicubic, centre crop
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3)).astype(np.uint8))
    theirs = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
    ours = M.clip_preprocess(image, 224)
    error = report("clip preprocess vs CLIPImageProcessor", ours, theirs)
    assert ours.shape == (3, 224, 224)
    assert error < 0.05  # both Pillow bicubic; transformers rounds to uint8 after resizing


def test_clip_score_forms(clip_folder):
    folder, reference, _ = clip_folder
    ours = M.ClipViT.from_pretrained(str(folder))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3)).astype(np.uint8)) for i in range(4)]
    captions = ["a red house", "a dog in the snow", "tree", "the cat"]
    pixels = torch.stack([M.clip_preprocess(im, 32) for im in images])

    def reference_cos(texts):
        with torch.no_grad():
            img = torch.nn.functional.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            txt = torch.nn.functional.normalize(reference.get_text_features(input_ids=ours.tokenizer(texts)[0]).pooler_output, dim=-1)
        return (img * txt).sum(-1)

    cos = (ours.encode_images(images) * ours.encode_texts(captions)).sum(-1)
    assert report("clip cosine", cos, reference_cos(captions)) < 1e-6
    assert torch.allclose(M.clip_score(ours, images, captions, "torchmetrics"), (100 * cos).clamp(min=0), atol=1e-5)
    hessel_cos = reference_cos(["A photo depicts " + c for c in captions])
    assert torch.allclose(M.clip_score(ours, images, captions, "hessel"), 2.5 * hessel_cos.clamp(min=0), atol=1e-6)


# ----------------------------------------------------------------------------- aesthetics


def test_aesthetic_mlp_loads_released_layout_and_is_affine(tmp_path, clip_folder):
    shapes = {"layers.0": (1024, 24), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64), "layers.7": (1, 16)}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.1
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    mlp = M.AestheticMLP.from_pretrained(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    e = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    manual = e
    for name in shapes:  # the released predictor: five linear layers, no activation between them
        manual = manual @ state[f"{name}.weight"].T + state[f"{name}.bias"]
    assert report("aesthetic MLP", mlp(e), manual[:, 0]) < 1e-5

    folder, reference, _ = clip_folder
    clip = M.ClipViT.from_pretrained(str(folder), towers=("vision",))
    assert clip.text is None
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 48, 3)).astype(np.uint8))
    with torch.no_grad():
        embedding = reference.get_image_features(pixel_values=M.clip_preprocess(image, 32)[None]).pooler_output
        expected = mlp(torch.nn.functional.normalize(embedding, dim=-1))
    assert report("aesthetic score", M.aesthetic_score(clip, mlp, [image]), expected) < 1e-5


def test_clip_batches_score_each_image_as_alone(clip_folder):
    """ClipBatches, a folder run's CLIPScore and aesthetics: batches of 1, 3 (a partial last batch)
    and 32 give each image its score of one image per call (clip_score, aesthetic_score) up to float
    rounding, in the order added, with at most one batch of preprocessed images held."""
    folder, _, _ = clip_folder
    clip = M.ClipViT.from_pretrained(str(folder))
    mlp = randomize_(M.AestheticMLP(24), std=0.05).eval()
    rng = np.random.default_rng(5)
    shapes = [(40, 56), (64, 48), (33, 33), (120, 80), (50, 50), (47, 90), (32, 32)]
    images = [Image.fromarray(rng.integers(0, 256, (*hw, 3)).astype(np.uint8)) for hw in shapes]
    captions = ["a red house", "a dog in the snow", "tree", "the cat in the snow of a red house",
                "a", "photo of a tree", "the dog"]  # padded to the longest caption in a batch
    names = [f"{i:04d}" for i in range(len(images))]
    with torch.no_grad():  # random towers: make the cosines positive on the whole, few clamp to 0
        cos = (clip.encode_images(images) * clip.encode_texts(captions)).sum(-1)
        clip.text.proj.weight.mul_(cos.mean().sign())

    def batched(batches, size):
        for i, (name, image, caption) in enumerate(zip(names, images, captions)):
            batches.add(name, image, caption)
            assert len(batches.pixels) == (i + 1) % size  # a full batch is scored at once
        values = batches.flush()
        assert list(values) == names and not batches.pixels
        return torch.tensor(list(values.values()))

    for form in M.CLIP_FORMS:
        alone = torch.cat([M.clip_score(clip, [im], [c], form) for im, c in zip(images, captions)])
        scale = 100 if form == "torchmetrics" else 2.5  # compared as cosines
        assert (alone > 0).sum() >= 4
        for size in (1, 3, 32):
            scores = batched(M.ClipBatches.clip(clip, form, size), size)
            name = f"clip {form}, batches of {size} vs 1"
            assert report(name, scores / scale, alone / scale) < 1e-6
    alone = torch.cat([M.aesthetic_score(clip, mlp, [image]) for image in images])
    for size in (1, 3, 32):
        scores = batched(M.ClipBatches.aesthetic(clip, mlp, size), size)
        assert report(f"aesthetic, batches of {size} vs 1", scores, alone) < 1e-5


# ----------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_package(net, tmp_path):
    import_torchvision()
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()  # random backbone, real lin layers
    backbone = {}
    for key, value in reference.net.state_dict().items():  # slice{k}.{index}.weight -> features.{index}.weight
        _, index, kind = key.split(".")
        backbone[f"features.{index}.{kind}"] = value
    torch.save(backbone, tmp_path / "backbone.pth")
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    ours = M.LPIPSMetric.from_pretrained(net, linear=str(lin), backbone=str(tmp_path / "backbone.pth"))
    a, b = torch.rand(2, 3, 64, 80) * 2 - 1, torch.rand(2, 3, 64, 80) * 2 - 1
    with torch.no_grad():
        theirs = reference(a, b).flatten()
        mine = ours(a, b)
    assert report(f"lpips-{net}", mine, theirs) < 1e-5


def test_lpips_tiles_cover_the_image():
    assert M.tiles(100, 80, 512) == [(0, 0, 100, 80)]
    boxes = M.tiles(1100, 1024, 512)
    assert {(r, c) for r, c, _, _ in boxes} == {(0, 0), (0, 512), (512, 0), (512, 512), (588, 0), (588, 512)}
    covered = np.zeros((1100, 1024), bool)
    for r, c, h, w in boxes:
        covered[r : r + h, c : c + w] = True
    assert covered.all()


def test_lpips_alex_without_backbone_is_a_clear_error():
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):
        M.LPIPSMetric.from_pretrained("alex")


def test_missing_weights_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="FID Inception weights") as error:
        M.InceptionV3.from_pretrained("nobody/no-such-repo/pt_inception.pth")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="neither a file"):
        M.AestheticMLP.from_pretrained(str(tmp_path / "missing.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable weights file"):
        M.AestheticMLP.from_pretrained(str(tmp_path / "broken.pth"))
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="missing"):
        M.AestheticMLP.from_pretrained(str(tmp_path / "wrong.pth"))
