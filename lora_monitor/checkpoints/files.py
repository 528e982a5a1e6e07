"""LoRA files on disk: completeness, step/epoch, key format, and a fingerprint of their tensors.

Only safetensors files are ever read (no pickle). The header is parsed by hand so a file that is still
being written can be checked without loading it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from lora_monitor import events as ev

# kohya save names: {name}-step{step:08d}, {name}-{epoch:06d}, final {name}
STEP_RE = re.compile(r"-step(\d+)$")
EPOCH_RE = re.compile(r"-(\d{6})$")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class NotALoraError(ValueError):
    """The file is not a LoRA that lora-monitor can load (the message says why)."""


@dataclass(frozen=True)
class Header:
    size: int  # header length in bytes (the u64 at the start)
    tensors: dict[str, dict]
    metadata: dict[str, str]

    @property
    def data_end(self) -> int:
        """File size implied by the header: 8 + header + largest data offset."""
        end = max((t["data_offsets"][1] for t in self.tensors.values()), default=0)
        return 8 + self.size + end


def read_header(path: Path) -> Header:
    """Parse a safetensors header; ValueError if the file is not (yet) a valid safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size <= 0 or size > MAX_HEADER:
            raise ValueError("not a safetensors file (bad header length)")
        blob = fh.read(size)
    if len(blob) < size:
        raise ValueError("header incomplete")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a safetensors file ({exc.__class__.__name__} in header)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise ValueError(f"not a safetensors file (tensor {name!r} has no data_offsets)")
    return Header(size=size, tensors=header, metadata=metadata)


def is_complete(path: Path) -> bool:
    """True when the file's size equals what its header accounts for (kohya writes in place)."""
    try:
        header = read_header(path)
        return path.stat().st_size == header.data_end
    except (OSError, ValueError):
        return False


def why_incomplete(path: Path) -> str:
    """One phrase saying why `path` is not a complete safetensors file ('' when it is)."""
    try:
        header = read_header(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except ValueError as exc:
        return f"not a complete safetensors file ({exc})"
    size = path.stat().st_size
    if size != header.data_end:
        return f"truncated or still being written (header accounts for {header.data_end} bytes, file has {size})"
    return ""


def step_from_name(path: Path) -> tuple[int | None, int | None]:
    """(step, epoch) from a kohya save name; (None, None) for the final file or other names."""
    stem = path.stem
    if m := STEP_RE.search(stem):
        return int(m.group(1)), None
    if m := EPOCH_RE.search(stem):
        return None, int(m.group(1))
    return None, None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def step_of(path: Path, header: Header | None = None) -> int | None:
    """Step of a saved file: metadata `ss_steps` (every kohya LoRA has it), else the `-stepNNNNNNNN` name."""
    if header is None:
        try:
            header = read_header(path)
        except (OSError, ValueError):
            header = None
    if header is not None:
        step = _int(header.metadata.get("ss_steps"))
        if step is not None:
            return step
    return step_from_name(path)[0]


def is_final_name(path: Path, output_name: str | None) -> bool:
    return output_name is not None and path.stem == output_name


def lora_format(header: Header) -> str:
    """Name the key layout: 'kohya' (lora_unet_/lora_te*_), 'peft' (unet./text_encoder.), or raise NotALoraError."""
    keys = list(header.tensors)
    if not keys:
        raise NotALoraError("no tensors")
    lora_keys = [k for k in keys if "lora" in k.lower() or k.endswith(".alpha") or ".hada_" in k or ".lokr_" in k]
    if not lora_keys:
        raise NotALoraError(f"no LoRA tensors (first key: {keys[0]}); a full model or another kind of file")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) for k in keys):
        return "peft"
    if any(k.startswith(("base_model.model.", "diffusion_model.", "lora_transformer_")) for k in keys):
        return "other"
    raise NotALoraError(f"unrecognised LoRA key layout (first key: {keys[0]})")


def tensor_fingerprint(path: Path, header: Header | None = None) -> str:
    """SHA-256 of the tensor bytes and their names/shapes: equal for files with equal weights.

    The final kohya file repeats the last step file's weights with other metadata; this detects that.
    """
    header = header or read_header(path)
    digest = hashlib.sha256()
    for name in sorted(header.tensors):
        info = header.tensors[name]
        digest.update(f"{name}|{info.get('dtype')}|{info.get('shape')}".encode())
    digest.update(b"#")
    with open(path, "rb") as fh:
        fh.seek(8 + header.size)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ready_of(path: Path, output_name: str | None) -> ev.CheckpointReady:
    step = step_of(path)
    return ev.CheckpointReady(
        path=path, step=step, epoch=step_from_name(path)[1], is_final=is_final_name(path, output_name)
    )


def checkpoint_order(path: Path, output_name: str | None) -> tuple[int, int, str]:
    """Sort key of LoRA files: by step, a final file after the step file of the same step, then by name."""
    step = step_of(path)
    final = is_final_name(path, output_name)
    return (step if step is not None else 10**12, 1 if final else 0, path.name)
