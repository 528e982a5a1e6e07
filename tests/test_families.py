"""Model families: from kohya's script, a LoRA file's metadata and its key layout; unsupported ones fail at
config load with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from lora_monitor import families
from lora_monitor.config import parse_config
from lora_monitor.errors import UserError
from lora_monitor.run_spec import eval_dir_spec, train_spec

FIXTURES = Path(__file__).parent / "fixtures" / "kohya-families"
# fixture folder -> the family its file is for (written by kohya's own network code for that family)
FIXTURE_FAMILIES = {"sd1": None, "flux": "flux", "flux-fullwidth": "flux", "sd3": "sd3", "lumina": "lumina",
                    "anima": "anima", "hunyuan_image": "hunyuan_image"}


def _read(folder: str) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(FIXTURES / folder / "tiny-step00000004.safetensors"), "pt") as f:
        return list(f.keys()), f.metadata() or {}


@pytest.mark.parametrize(
    ("script", "sdxl", "family"),
    [
        (None, False, "sd"),
        (None, True, "sdxl"),
        ("train_network.py", False, "sd"),
        ("sdxl_train_network.py", False, "sdxl"),  # the script says SDXL even without `sdxl = true`
        ("/opt/sd-scripts/flux_train_network.py", False, "flux"),
        ("sd3_train_network.py", False, "sd3"),
        ("lumina_train_network.py", False, "lumina"),
        ("anima_train_network.py", False, "anima"),
        ("hunyuan_image_train_network.py", False, "hunyuan_image"),
        ("my_trainer.py", True, "sdxl"),  # a script of one's own: `sdxl` decides
        ("my_trainer.py", False, "sd"),
    ],
)
def test_run_family(script: str | None, sdxl: bool, family: str) -> None:
    assert families.run_family(script, sdxl) == family


@pytest.mark.parametrize(
    ("version", "family"),
    [
        ("sd_v1", "sd"), ("sd_v2", "sd"), ("sd_1.5", "sd"), ("sdxl_base_v1-0", "sdxl"), ("sdxl_", "sdxl"),
        ("flux1", "flux"), ("FLUX.1-dev", "flux"), ("flux2_klein_9b", "flux2"), ("5-large", "sd3"),
        ("3-medium", "sd3"), ("lumina2", "lumina"), ("anima", "anima"), ("hunyuan-image-2.1", "hunyuan_image"),
        ("something-else", None), ("", None),
    ],
)
def test_family_of_base_model_version(version: str, family: str | None) -> None:
    assert families.family_of_metadata({"ss_base_model_version": version}) == family


@pytest.mark.parametrize("folder", sorted(FIXTURE_FAMILIES))
def test_fixture_files_name_their_family_by_metadata_and_by_keys(folder: str) -> None:
    keys, metadata = _read(folder)
    expected = FIXTURE_FAMILIES[folder]
    assert families.family_of_metadata(metadata) == (expected or "sd")
    # the key layout alone: SD 1.x's diffusers-named modules could be SDXL's too, so it does not judge them
    assert families.family_of_keys(keys) == expected


@pytest.mark.parametrize(
    ("lora", "base", "note"),
    [
        ("flux", "sd", "a LoRA for FLUX.1 cannot be applied to this run's SD 1.x/2.x base model"),
        ("sd", "sdxl", "a LoRA for SD 1.x/2.x cannot be applied to this run's SDXL base model"),
        ("sd", "sd", None),
        (None, "sd", None),
    ],
)
def test_mismatch_note_names_both_families(lora: str | None, base: str, note: str | None) -> None:
    text = families.mismatch(lora, base)
    assert text == note or (note is not None and text is not None and text.startswith(note))


def _config(tmp_path: Path, kohya: str) -> str:
    (tmp_path / "sd-scripts").mkdir(exist_ok=True)
    return f'[kohya]\nsd_scripts = "sd-scripts"\n{kohya}\n[kohya.args]\noutput_dir = "out"\n'


def test_sdxl_with_sd_script_fails_at_config_load_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        parse_config(_config(tmp_path, 'script = "train_network.py"\nsdxl = true'), tmp_path / "c.toml")
    text = str(err.value)
    assert "kohya.sdxl = true but kohya.script = 'train_network.py'" in text and "\n" not in text


def test_a_family_not_evaluated_fails_at_config_load_in_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kohya trainer of today is evaluated; a trainer kohya adds later, known but not evaluated, is refused
    before kohya starts, naming what is supported."""
    future = families.Family("future", "Future 1", "future_train_network.py", False)
    monkeypatch.setitem(families.BY_SCRIPT, future.script, future)
    with pytest.raises(UserError) as err:
        parse_config(_config(tmp_path, 'script = "future_train_network.py"'), tmp_path / "c.toml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{tmp_path / 'c.toml'}: kohya.script = 'future_train_network.py' trains Future 1 "
                           "LoRAs, which lora-monitor cannot evaluate yet")
    assert text.endswith("supported: SD 1.x/2.x (train_network.py), SDXL (sdxl_train_network.py), "
                         "FLUX.1 (flux_train_network.py), SD3.x (sd3_train_network.py), "
                         "Lumina 2 (lumina_train_network.py), Anima (anima_train_network.py), "
                         "HunyuanImage 2.1 (hunyuan_image_train_network.py)")


@pytest.mark.parametrize(
    ("kohya", "family", "sdxl"),
    [
        ("", "sd", False),
        ('script = "sdxl_train_network.py"', "sdxl", True),
        ("sdxl = true", "sdxl", True),
        ('script = "flux_train_network.py"', "flux", False),
        ('script = "sd3_train_network.py"', "sd3", False),
        ('script = "lumina_train_network.py"', "lumina", False),
        ('script = "hunyuan_image_train_network.py"', "hunyuan_image", False),
        ('script = "anima_train_network.py"', "anima", False),
    ],
)
def test_run_spec_family(tmp_path: Path, kohya: str, family: str, sdxl: bool) -> None:
    config = parse_config(_config(tmp_path, kohya), tmp_path / "c.toml")
    for spec in (train_spec(config), eval_dir_spec(config, tmp_path / "out")):
        assert (spec.family, spec.sdxl) == (family, sdxl)


def test_flux_run_spec_carries_kohyas_separate_model_files(tmp_path: Path) -> None:
    """flux_train_network.py takes CLIP-L, T5-XXL and the autoencoder as separate files: the spec resolves them."""
    text = _config(tmp_path, 'script = "flux_train_network.py"') + (
        'pretrained_model_name_or_path = "models/flux1-dev.safetensors"\nclip_l = "models/clip_l.safetensors"\n'
        't5xxl = "/abs/t5xxl_fp16.safetensors"\nae = "models/ae.safetensors"\n')
    spec = train_spec(parse_config(text, tmp_path / "c.toml"))
    assert dict(spec.model_parts) == {"clip_l": str(tmp_path / "models/clip_l.safetensors"),
                                      "t5xxl": "/abs/t5xxl_fp16.safetensors",
                                      "ae": str(tmp_path / "models/ae.safetensors")}


def test_sd3_run_spec_carries_kohyas_separate_model_files(tmp_path: Path) -> None:
    """sd3_train_network.py takes CLIP-L, CLIP-G, T5-XXL, the VAE and the tokenizers' folder as separate files."""
    text = _config(tmp_path, 'script = "sd3_train_network.py"') + (
        'pretrained_model_name_or_path = "models/sd3.5_medium.safetensors"\nclip_l = "models/clip_l.safetensors"\n'
        'clip_g = "models/clip_g.safetensors"\nt5xxl = "/abs/t5xxl_fp16.safetensors"\nvae = "models/vae.safetensors"\n'
        'tokenizer_cache_dir = "tokenizers"\n')
    spec = train_spec(parse_config(text, tmp_path / "c.toml"))
    assert dict(spec.model_parts) == {"clip_l": str(tmp_path / "models/clip_l.safetensors"),
                                      "clip_g": str(tmp_path / "models/clip_g.safetensors"),
                                      "t5xxl": "/abs/t5xxl_fp16.safetensors",
                                      "vae": str(tmp_path / "models/vae.safetensors"),
                                      "tokenizer_cache_dir": str(tmp_path / "tokenizers")}


@pytest.mark.parametrize(("script", "args"), [
    ("lumina_train_network.py", {"gemma2": "models/gemma_2_2b.safetensors", "ae": "models/ae.safetensors"}),
    ("hunyuan_image_train_network.py", {"text_encoder": "models/qwen_2.5_vl_7b.safetensors",
                                        "byt5": "models/byt5_small.safetensors", "vae": "models/vae.safetensors"}),
    ("anima_train_network.py", {"qwen3": "models/qwen_3_06b.safetensors", "vae": "/abs/qwen_image_vae.safetensors",
                                "t5_tokenizer_path": "tokenizers/t5",
                                "llm_adapter_path": "models/adapter.safetensors"}),
])
def test_newer_families_run_spec_carries_kohyas_separate_model_files(tmp_path: Path, script: str,
                                                                     args: dict[str, str]) -> None:
    """Each trainer's own arguments for its separate model files reach the pipeline loader, resolved like kohya's
    other paths (relative to the config file)."""
    text = _config(tmp_path, f'script = "{script}"') + 'pretrained_model_name_or_path = "models/dit.safetensors"\n'
    text += "".join(f'{key} = "{value}"\n' for key, value in args.items())
    spec = train_spec(parse_config(text, tmp_path / "c.toml"))
    assert dict(spec.model_parts) == {k: v if v.startswith("/") else str(tmp_path / v) for k, v in args.items()}
