"""Tiny random Flux and SD3 pipelines written by diffusers / transformers `save_pretrained`.

They have the real folder layout (model_index.json, transformer/, vae/, text_encoder*/,
tokenizer*/) so the CLIs load them through exactly the code path of the real Hub weights.
Every parameter is random (norm scales included).
"""

import contextlib
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.attention import cpu_flash_breaks
from conftest import randomize_

WORDS = "a photo of cat cats sitting on mat lighthouse at dawn red rocket over tokyo ultra high resolution image".split()


def reference_sdpa(device="cpu"):
    """diffusers and transformers call SDPA themselves: on a CPU where PyTorch's flash kernel raises
    in bf16 (`common.attention.cpu_flash_breaks`), they take the math backend, as `attention` does."""
    if torch.device(device).type == "cpu" and cpu_flash_breaks():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def byte_alphabet() -> list[str]:
    """GPT-2's reversible map of the 256 bytes to printable characters, in CLIP's vocab order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


def write_clip_tokenizer(folder: Path):
    """A small CLIP BPE vocabulary: the byte alphabet plus merges that build a few whole words."""
    merges, tokens = [], set()
    for word in WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            piece = char + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current += piece
            tokens.add(current)
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    import transformers

    transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77).save_pretrained(folder)
    return len(vocab)


def write_t5_tokenizer(folder: Path):
    import sentencepiece
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    corpus.unlink()
    transformers.T5TokenizerFast(vocab_file=str(folder / "spiece.model"), model_max_length=512).save_pretrained(folder)


def tiny_text_encoders(clip_vocab: int, t5_width: int, seed: int, t5_max_distance: int = 32):
    import transformers

    def clip(seed, width, projection, hidden_act="quick_gelu"):
        config = transformers.CLIPTextConfig(
            vocab_size=clip_vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width, hidden_act=hidden_act,
            bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
        )
        model_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        return randomize_(model_class(config).eval(), 0.2, seed)

    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=160, d_model=t5_width, d_kv=8, d_ff=2 * t5_width, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=t5_max_distance,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ))
    return clip, randomize_(t5.eval(), 0.2, seed + 1)


def tiny_vae(seed: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    return randomize_(vae.eval(), 0.05, seed)


def write_tokenizers(folder: Path, names_clip, name_t5) -> int:
    vocab = 0
    for name in names_clip:
        vocab = write_clip_tokenizer(folder / name)
    write_t5_tokenizer(folder / name_t5)
    return vocab


def make_flux_pipeline(folder: Path, guidance: bool = True, seed: int = 0, real_heads: bool = False) -> Path:
    """A tiny FLUX.1-dev (guidance=True) or schnell (False) pipeline folder. real_heads: Flux's own
    head dim 128 and RoPE split (16, 56, 56), which single files imply (they do not store it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    import transformers

    folder = Path(folder)
    clip_vocab = write_tokenizers(folder, ["tokenizer"], "tokenizer_2")
    clip, t5 = tiny_text_encoders(clip_vocab, 32, seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128 if real_heads else 16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56) if real_heads else (4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=guidance, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift=1.0
        ),
        vae=tiny_vae(seed + 2, 0.3611, 0.1159),
        text_encoder=clip(seed + 3, 32, projection=False),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
        transformer=randomize_(transformer.eval(), 0.2, seed + 4),
    )
    pipe.save_pretrained(folder)
    return folder


def make_sd3_pipeline(folder: Path, seed: int = 0, real_heads: bool = False) -> Path:
    """A tiny SD3-Medium-shaped pipeline folder (CLIP-L, CLIP-G, T5, MMDiT, VAE). real_heads: SD3's
    own head dim 64, which single files imply (they do not store the head count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    import transformers

    folder = Path(folder)
    clip_vocab = write_tokenizers(folder, ["tokenizer", "tokenizer_2"], "tokenizer_3")
    # real_heads: 2 heads of 64 (what a single file implies), and gelu as CLIP-G (only 768-wide CLIP-L is quick_gelu)
    clip_width, clip_act = (128, "gelu") if real_heads else (32, "quick_gelu")
    # real_heads also uses T5's own max distance 128, which single files imply too
    clip, t5 = tiny_text_encoders(clip_vocab, 4 * clip_width if real_heads else 64, seed, 128 if real_heads else 32)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64 if real_heads else 8,
        num_attention_heads=2, joint_attention_dim=4 * clip_width if real_heads else 64,
        caption_projection_dim=128 if real_heads else 16, pooled_projection_dim=2 * clip_width, out_channels=4, pos_embed_max_size=32,
    )
    transformer = randomize_(transformer.eval(), 0.2, seed + 4)
    with torch.no_grad():  # a smooth table like the real sin-cos one rather than noise
        table = transformer.pos_embed.pos_embed
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed + 2, 1.5305, 0.0609),
        text_encoder=clip(seed + 3, clip_width, projection=True, hidden_act=clip_act),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=clip(seed + 5, clip_width, projection=True, hidden_act=clip_act),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=t5,
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_3"),
    )
    pipe.save_pretrained(folder)
    return folder
