"""LoRA files: completeness from the header, step/epoch from metadata and names, formats, fingerprints."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.checkpoints.files import (
    NotALoraError,
    is_complete,
    lora_format,
    read_header,
    step_from_name,
    step_of,
    tensor_fingerprint,
)


def kohya_lora(path: Path, steps: int | None = 6, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1),
    }
    meta = {"ss_output_name": "testlora"}
    if steps is not None:
        meta["ss_steps"] = str(steps)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("testlora-step00000002.safetensors", (2, None)),
        ("testlora-step00001200.safetensors", (1200, None)),
        ("testlora-000001.safetensors", (None, 1)),
        ("my-lora-000010.safetensors", (None, 10)),
        ("testlora.safetensors", (None, None)),
        ("testlora-v2.safetensors", (None, None)),
        ("sdxl_lora-step00000050.safetensors", (50, None)),
    ],
)
def test_step_from_name(name: str, expected: tuple) -> None:
    assert step_from_name(Path(name)) == expected


def test_metadata_step_wins_over_name(tmp_path: Path) -> None:
    # kohya's final and epoch files carry their step only in ss_steps
    assert step_of(kohya_lora(tmp_path / "testlora.safetensors", steps=6)) == 6
    assert step_of(kohya_lora(tmp_path / "testlora-000001.safetensors", steps=4)) == 4
    assert step_of(kohya_lora(tmp_path / "x-step00000008.safetensors", steps=None)) == 8


def test_completeness_while_written_in_place(tmp_path: Path) -> None:
    full = kohya_lora(tmp_path / "full.safetensors").read_bytes()
    part = tmp_path / "part.safetensors"
    for cut in (0, 5, 8, 100, len(full) - 1):
        part.write_bytes(full[:cut])
        assert not is_complete(part), cut
    part.write_bytes(full)
    assert is_complete(part)
    part.write_bytes(full + b"\0")  # longer than the header says: still being rewritten
    assert not is_complete(part)


def test_formats(tmp_path: Path) -> None:
    assert lora_format(read_header(kohya_lora(tmp_path / "k.safetensors"))) == "kohya"
    peft = tmp_path / "p.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}, str(peft))
    assert lora_format(read_header(peft)) == "peft"
    full_model = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, str(full_model))
    with pytest.raises(NotALoraError, match="no LoRA tensors"):
        lora_format(read_header(full_model))
    junk = tmp_path / "j.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError):
        read_header(junk)


def test_fingerprint_equal_weights_other_metadata(tmp_path: Path) -> None:
    a = kohya_lora(tmp_path / "a-step00000006.safetensors", steps=6, seed=1)
    b = kohya_lora(tmp_path / "a.safetensors", steps=6, seed=1)
    c = kohya_lora(tmp_path / "c.safetensors", steps=6, seed=2)
    assert tensor_fingerprint(a) == tensor_fingerprint(b)
    assert tensor_fingerprint(a) != tensor_fingerprint(c)
