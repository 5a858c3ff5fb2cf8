"""Save and load FLARE adapters in PEFT's layout (safetensors only; nothing is ever unpickled).

A saved adapter directory::

    adapter_config.json          PEFT LoraConfig (peft_type LORA, r, lora_alpha, target_modules = the
                                 adapted projections' full module paths, modules_to_save, task_type)
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight [r, in], ...lora_B.weight [out, r],
                                 base_model.model.<saved module path>.<param> (modules_to_save)
    flare_config.json            FLARE's settings: the FlareConfig, the fusion projections' paths,
                                 the fusion parameter file
    flare_fusion.safetensors     cross_attention parameters (base_model.model.<path>.fusion_module.q.weight, ...),
                                 only for that fusion
    flare_mt.safetensors         FLARE MT's map (flare_mt.map.weight [hidden, d_nllb], flare_mt.map.bias), only
                                 for FLARE MT; flare_config.json's "mt" names the NLLB checkpoint (its frozen
                                 encoder is referenced, not saved) and the language codes

Plain PEFT reads the first two files and ignores the rest, so ``peft.PeftModel.from_pretrained``
loads a FLARE adapter as a LoRA adapter with the fusion dropped: its output equals
``FlareModel`` called WITHOUT a source stream (fusion needs the English stream, which PEFT does
not run). ``load_flare_model`` also loads plain PEFT LoRA adapters (as ``fusion="none"``).
Every file is written to a temporary name and renamed, so an interrupted save never leaves a
half-written adapter behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import FlareConfig
from .modeling.targets import name_matches

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FLARE_CONFIG = "flare_config.json"
FUSION_WEIGHTS = "flare_fusion.safetensors"
MT_WEIGHTS = "flare_mt.safetensors"
FORMAT_VERSION = 1
_PICKLED = ("adapter_model.bin", "pytorch_model.bin")

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForTokenClassification": "TOKEN_CLS",
}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        from .data.files import follow_umask

        follow_umask(tmp)  # safetensors writes 0600 whatever the umask
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: store compact CPU copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def peft_lora_config(flare_model) -> dict:
    """The ``adapter_config.json`` content: a PEFT LoraConfig for the adapted projections."""
    model, cfg, targets = flare_model.base_model, flare_model.config, flare_model.targets
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": name,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        # Full module paths: exact, and never matching a head the way a short name like "dense" would.
        "target_modules": list(targets.adapted),
        "modules_to_save": list(targets.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_flare_adapter(flare_model, path) -> Path:
    """Write ``flare_model``'s adapter to directory ``path`` (created if needed); returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    main, fusion, mt = {}, {}, {}
    for kind, key, tensor in flare_model._adapter_tensors():
        {"fusion": fusion, "mt": mt}.get(kind, main)[key] = tensor
    meta = {"format": "pt", "flare_format_version": str(FORMAT_VERSION)}
    _write_tensors(path / ADAPTER_WEIGHTS, main, meta)
    for file, tensors in ((FUSION_WEIGHTS, fusion), (MT_WEIGHTS, mt)):
        if tensors:
            _write_tensors(path / file, tensors, meta)
        elif (path / file).exists():
            (path / file).unlink()  # a stale file from an earlier save would be loaded back
    source = flare_model.mt_source
    _write_json(path / ADAPTER_CONFIG, peft_lora_config(flare_model))
    _write_json(
        path / FLARE_CONFIG,
        {
            "format_version": FORMAT_VERSION,
            "flare_config": flare_model.config.to_dict(),
            "target_modules": list(flare_model.targets.adapted),
            "fusion_targets": list(flare_model.targets.fusion),
            "modules_to_save": list(flare_model.targets.modules_to_save),
            "fusion_weights": FUSION_WEIGHTS if fusion else None,
            "padding_side": flare_model.padding_side,
            "base_model_class": type(flare_model.base_model).__name__,
            "mt": None
            if source is None
            else {
                "model_path": source.model_path,
                "language_codes": source.language_codes,
                "in_features": source.map.in_features,
                "out_features": source.map.out_features,
            },
        },
    )
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _config_from_peft(peft: dict, path: Path) -> FlareConfig:
    """A plain PEFT LoRA adapter as a FlareConfig with fusion "none"; unsupported variants are errors."""
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"{path}: only LoRA adapters can be loaded, got peft_type {peft.get('peft_type')!r}")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if peft.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={peft[key]!r} is not supported")
    if peft.get("bias", "none") != "none":
        raise ValueError(f"{path}: LoRA bias={peft['bias']!r} is not supported")
    if peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern is not supported")
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters"):
        # Each narrows or widens PEFT's selection: ignored, the strict load would fail with "does not fit".
        if peft.get(key):
            raise ValueError(f"{path}: {key}={peft[key]!r} is not supported; list the adapted modules in target_modules")
    targets = peft.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{path}: regular-expression target_modules ({targets!r}) are not supported; list the modules")
    return FlareConfig(
        r=int(peft["r"]),
        lora_alpha=peft.get("lora_alpha", 8),
        lora_dropout=peft.get("lora_dropout", 0.0),
        fusion="none",
        fusion_modules=(),
        lora_modules=targets,
        modules_to_save=tuple(peft.get("modules_to_save") or ()),
    )


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def load_flare_model(model: nn.Module, path, *, is_trainable: bool = False, mt_model: str | None = None):
    """Wrap ``model`` (a fresh transformers model) and load the adapter saved at ``path``.

    Reads safetensors files only: a directory holding only a pickled ``adapter_model.bin`` is
    refused rather than unpickled. With ``is_trainable=False`` (the default, as in PEFT) the
    adapters are frozen and the model is put in eval mode; pass True to continue training.
    ``mt_model``: for a FLARE MT adapter, the NLLB checkpoint to load instead of the one it records
    (a run folder that moved: ``flare eval --run-dir`` passes the run's own). Returns a :class:`FlareModel`.
    """
    from .model import get_flare_model

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter directory at {path}")
    if not (path / ADAPTER_WEIGHTS).exists():
        pickled = [p for p in _PICKLED if (path / p).exists()]
        if pickled:
            raise ValueError(
                f"{path} holds only pickled weights ({pickled[0]}); flare loads safetensors only (never unpickles). "
                "Convert it with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise FileNotFoundError(f"{path / ADAPTER_WEIGHTS} not found")
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found")
    peft = _read_json(path / ADAPTER_CONFIG)
    if (path / FLARE_CONFIG).exists():
        flare = _read_json(path / FLARE_CONFIG)
        version = flare.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path / FLARE_CONFIG}: format version {version!r}, this flare reads {FORMAT_VERSION}")
        saved = FlareConfig.from_dict(flare["flare_config"])
        config = FlareConfig(
            r=saved.r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout, fusion=saved.fusion,
            fusion_modules=tuple(flare["fusion_targets"]) or saved.fusion_modules,
            lora_modules=tuple(flare["target_modules"]), source_site=saved.source_site,
            modules_to_save=tuple(flare["modules_to_save"]),
            cross_attention_heads=saved.cross_attention_heads, attention_dropout=saved.attention_dropout,
        )  # fmt: skip
        if saved.fuses and not flare["fusion_targets"]:
            raise ValueError(f"{path / FLARE_CONFIG}: fusion {saved.fusion!r} but no fusion projections listed")
    else:
        config = _config_from_peft(peft, path)
        # PEFT lists every head name its task type may use (SEQ_CLS: "classifier" and "score") and
        # wraps those the model has; so do we. A head whose weights are missing fails the strict load.
        present = [p for p, _ in model.named_modules() if p]

        def in_model(names) -> tuple[str, ...]:
            return tuple(n for n in names if any(name_matches(p, n) for p in present))

        config.modules_to_save = in_model(config.modules_to_save)
        if not isinstance(config.lora_modules, str):
            # Likewise target_modules: PEFT needs one name to match, so lists written for several
            # architectures (["q_proj", "query", ...]) load there. If none matches, resolve_targets says so.
            config.lora_modules = in_model(config.lora_modules) or config.lora_modules
    state = _load_tensors(path / ADAPTER_WEIGHTS)
    fusion_file = path / FUSION_WEIGHTS
    if config.fuses and config.fusion == "cross_attention":
        if not fusion_file.exists():
            raise FileNotFoundError(f"{fusion_file} not found (cross_attention parameters)")
        state.update(_load_tensors(fusion_file))
    flare_model = get_flare_model(model, config)
    mt = flare.get("mt") if (path / FLARE_CONFIG).exists() else None
    if mt:
        from .modeling.mt_source import load_mt_source

        if not (path / MT_WEIGHTS).exists():
            raise FileNotFoundError(f"{path / MT_WEIGHTS} not found (FLARE MT's map)")
        device = next(model.parameters()).device
        flare_model.attach_mt_source(
            load_mt_source(mt_model or mt["model_path"], int(mt["out_features"]), language_codes=mt["language_codes"],
                           device=device)  # fmt: skip
        )
        state.update(_load_tensors(path / MT_WEIGHTS))
    try:
        flare_model.load_adapter_state_dict(state, strict=True)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: the adapter does not fit this model: {exc}") from exc
    if not is_trainable:
        for p in flare_model.parameters():
            p.requires_grad_(False)
        flare_model.eval()
    return flare_model
