"""Local CLIP assets: what a path holds (so that each backend names the right one) and CLIP's tokenizer offline.

A CLIP checkpoint comes in three layouts, one per library:

- **open_clip**: a single weights file (``open_clip_pytorch_model.bin``, ``*.safetensors``, ``*.pt``) loaded into a
  named architecture, or a folder with ``open_clip_config.json`` (``model_name="local-dir:<folder>"``);
- **transformers**: a folder with ``config.json``, weights, tokenizer files and ``preprocessor_config.json``;
- **sentence-transformers**: a folder with ``modules.json`` (the CLIP module in a subfolder such as
  ``0_CLIPModel/``, or at the root).

The ``check_*`` functions reject the other layouts with a message naming the backend that loads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
_SCHEMAS = ("local-dir:", "hf-hub:")
_LOADERS = {
    "open_clip": "OpenClipBackend.from_pretrained(model_name, pretrained=<weights file>) or "
    "OpenClipBackend.from_pretrained('local-dir:<folder>') (ClipDegradationEstimator.from_open_clip)",
    "transformers": "TransformersClipBackend.from_pretrained(<folder>) (ClipDegradationEstimator.from_transformers)",
    "sentence-transformers": "SentenceTransformersClipBackend.from_pretrained(<folder>) "
    "(ClipDegradationEstimator.from_sentence_transformers)",
}


def checkpoint_kind(path: str | os.PathLike[str]) -> str | None:
    """The library whose layout ``path`` has: ``"open_clip"``, ``"transformers"``, ``"sentence-transformers"``,
    ``"file"`` (a single file), or ``None`` (missing or unrecognised)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if not path.is_dir():
        return None
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    if (path / "modules.json").is_file():
        return "sentence-transformers"
    if (path / "config.json").is_file():
        return "transformers"
    return None


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.endswith(_WEIGHT_SUFFIXES)


def check_open_clip_inputs(model_name: str, pretrained: str | None, open_clip: Any) -> None:
    """Reject folders and missing files before ``open_clip`` sees them.

    Raises:
        ValueError: For a folder as ``pretrained`` or ``model_name``, or an unknown architecture.
        FileNotFoundError: For a ``pretrained`` path that does not exist.
    """
    for label, value in (("pretrained", pretrained), ("model_name", model_name)):
        if value is None or value.startswith(_SCHEMAS):
            continue
        kind = checkpoint_kind(value)
        if Path(value).is_dir():
            if kind == "open_clip":
                hint = f"load the folder with model_name='local-dir:{value}' (and no pretrained)"
            elif kind in _LOADERS:
                hint = f"it is a {kind} checkpoint: load it with {_LOADERS[kind]}"
            else:
                hint = "open_clip loads a single weights file (open_clip_pytorch_model.bin, *.safetensors)"
            raise ValueError(f"OpenClipBackend got the folder {label}={value!r}; {hint}")
        if label == "model_name" and kind == "file":
            raise ValueError(
                f"model_name={value!r} is a file; pass the architecture as model_name (e.g. 'ViT-B-32') and the "
                "weights file as pretrained="
            )
    if pretrained is not None and not Path(pretrained).is_file() and _looks_like_path(pretrained):
        raise FileNotFoundError(f"pretrained={pretrained!r}: no such file")
    if not model_name.startswith(_SCHEMAS) and open_clip.get_model_config(model_name.replace("/", "-")) is None:
        known = [name for name in open_clip.list_models() if name.lower()[:4] == model_name.lower()[:4]][:12]
        raise ValueError(
            f"open_clip has no architecture {model_name!r} (similar: {known or open_clip.list_models()[:12]}); "
            "register custom configs with open_clip.add_model_config(<folder of .json configs>)"
        )


def check_transformers_path(source: str) -> bool:
    """Whether ``source`` is a local transformers folder (``False``: a hub id).

    Raises:
        ValueError: For a file or a folder of another library.
        FileNotFoundError: For a path-like ``source`` that does not exist.
    """
    kind = checkpoint_kind(source)
    if kind == "file":
        raise ValueError(
            f"TransformersClipBackend needs a folder with config.json (or a hub id), got the file {source!r}; a "
            f"single weights file is an open_clip checkpoint: {_LOADERS['open_clip']}"
        )
    if kind == "open_clip" or (kind == "sentence-transformers" and not (Path(source) / "config.json").is_file()):
        raise ValueError(f"{source!r} is a {kind} checkpoint, not a transformers folder; load it with {_LOADERS[kind]}")
    if kind is None and Path(source).is_dir():
        raise ValueError(f"{source!r} has no config.json; a transformers CLIP folder is written by save_pretrained")
    if kind is None and _looks_like_path(source):
        raise FileNotFoundError(f"{source!r}: no such folder")
    return kind is not None


def check_sentence_transformers_path(source: str) -> bool:
    """Whether ``source`` is a local sentence-transformers (or transformers) folder (``False``: a hub id).

    Raises:
        ValueError: For a file or an open_clip folder.
        FileNotFoundError: For a path-like ``source`` that does not exist.
    """
    kind = checkpoint_kind(source)
    if kind in ("file", "open_clip"):
        raise ValueError(
            f"SentenceTransformersClipBackend needs a sentence-transformers folder (modules.json) or a hub id, got "
            f"{'the file' if kind == 'file' else 'the open_clip folder'} {source!r}; load it with "
            f"{_LOADERS['open_clip']}"
        )
    if kind is None and Path(source).is_dir():
        raise ValueError(f"{source!r} has neither modules.json nor config.json: not a sentence-transformers model")
    if kind is None and _looks_like_path(source):
        raise FileNotFoundError(f"{source!r}: no such folder")
    return kind is not None


def build_clip_tokenizer(save_to: str | os.PathLike[str] | None = None, *, pad_token: str = "<|endoftext|>") -> Any:
    """OpenAI CLIP's BPE tokenizer as a transformers ``CLIPTokenizer``, built offline.

    The BPE vocabulary ships inside the ``open_clip_torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``); it
    is read without importing ``open_clip``. The ids equal ``open_clip.get_tokenizer``'s up to the end token ("a photo
    of a cat" -> ``49406, 320, 1125, 539, 320, 2368, 49407``). Use it for a transformers CLIP checkpoint saved
    without tokenizer files, or for tiny test models.

    Args:
        save_to: If given, ``tokenizer.save_pretrained(save_to)`` so that ``CLIPTokenizer.from_pretrained(save_to)``
            loads it like any checkpoint's tokenizer.
        pad_token: ``"<|endoftext|>"`` (OpenAI's transformers checkpoints) or ``"!"`` (id 0: open_clip's padding
            and Stable Diffusion 2's tokenizer; a literal ``"!"`` in a prompt then becomes the pad token). CLIP's
            causal text encoder ignores everything after the end token, so padding never changes an embedding.

    Raises:
        ImportError: If ``open_clip_torch`` (the vocabulary's carrier) is not installed.
    """
    import gzip
    import importlib.util
    import json
    import tempfile

    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("build_clip_tokenizer reads the BPE vocabulary shipped with open_clip_torch: install it")
    vocab_file = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(vocab_file.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # 49,408 entries
    with tempfile.TemporaryDirectory() as folder:  # the files of a CLIP checkpoint: loads in transformers 4 and 5
        Path(folder, "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    if save_to is not None:
        tokenizer.save_pretrained(os.fspath(save_to))
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 printable stand-ins of bytes 0..255, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


__all__ = [
    "build_clip_tokenizer",
    "check_open_clip_inputs",
    "check_sentence_transformers_path",
    "check_transformers_path",
    "checkpoint_kind",
]
