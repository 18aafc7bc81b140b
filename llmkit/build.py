"""`pull --from-source`: download a safetensors checkpoint, convert, quantize, register."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from llmkit import paths
from llmkit._fs import locked
from llmkit.catalog import get_spec
from llmkit.errors import UnsupportedModelError, UsageError
from llmkit.store import LocalModel, register

# Output types the converter writes directly; anything else is quantized from f16.
_DIRECT = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


@dataclass(frozen=True)
class BuildResult:
    """What `build_from_source` registered and kept."""

    model: LocalModel
    source_repo: str
    kept: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {"model": self.model.__dict__, "source_repo": self.source_repo,
                "kept": list(self.kept), "seconds": round(self.seconds, 2)}


def _target(ref: str, quant: str | None) -> tuple[str, str, str, str]:
    """(registered name, source repo, quantization, kind) for a catalog name or OWNER/REPO."""
    from llmkit.quantize import normalize_type

    name, _, given = ref.partition("@")
    if given and quant and given.lower() != quant.lower():
        raise UsageError(f"two quantizations given: '{given}' and --quant {quant}")
    chosen = given or quant
    spec = get_spec(name)
    if spec is not None:
        if not spec.supported:
            raise UnsupportedModelError(spec.name, spec.reason, spec.alternatives)
        if not spec.source_repo:
            raise UsageError(f"{spec.name} names no source checkpoint in the catalog")
        qtype = normalize_type(chosen or spec.default_quant)
        return spec.name, spec.source_repo, qtype, spec.kind
    from llmkit.hub import strip_hub_url

    repo = strip_hub_url(name)
    if repo.count("/") != 1:
        from llmkit.hub import _unknown

        raise _unknown(name)
    qtype = normalize_type(chosen or "Q4_K_M")
    return f"{repo}:{qtype}".lower(), repo, qtype, "text"


def build_from_source(ref: str, quant: str | None = None, *, keep: bool = False,
                      threads: int | None = None, quiet: bool = False) -> BuildResult:
    """Fetch a checkpoint's safetensors, convert them with llmkit's converter, quantize, register.

    The checkpoint stays in the Hugging Face cache; the GGUF goes to llmkit's models directory.
    The intermediate f16 file is deleted unless ``keep``.

    Raises:
        UsageError, UnsupportedModelError, ModelNotFoundError, HubError, ConvertError,
        QuantizeError.
    """
    from llmkit.convert import convert
    from llmkit.hub import checkpoint_dir
    from llmkit.quantize import quantize

    name, repo, qtype, kind = _target(ref, quant)
    _check_convertible(repo, name, quiet=quiet)
    started = time.perf_counter()
    safe = name.replace("/", "--").replace(":", "-")
    out_dir = paths.models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{safe}.gguf"
    with locked(paths.home() / "locks" / f"{safe}.lock"):
        directory = checkpoint_dir(repo, quiet=quiet)
        weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        # The f16 intermediate is about as large as a 16-bit checkpoint, the result smaller.
        from llmkit.hub import check_free_space

        check_free_space(out_dir, weights * 2, f"converting {repo}")
        kept: list[str] = []
        from llmkit.convert import PROJECTORS, SELF_CONTAINED_VISION, read_config

        architectures = read_config(directory).get("architectures") or []
        mmproj = out_dir / f"mmproj-{safe}.gguf" if any(
            a in PROJECTORS for a in architectures) else None
        # A guard stays a guard: Llama Guard 3 Vision is a Llama 3.2 Vision checkpoint.
        if kind != "guard" and (mmproj is not None
                                or any(a in SELF_CONTAINED_VISION for a in architectures)):
            kind = "vision"
        if qtype in _DIRECT:
            convert(directory, final, outtype=_DIRECT[qtype], mmproj=mmproj)
        else:
            intermediate = out_dir / f"{safe}.f16.gguf"
            try:
                convert(directory, intermediate, outtype="f16",
                        mmproj=mmproj)
                quantize(intermediate, qtype, final, threads=threads, force=True)
            finally:
                if keep and intermediate.exists():
                    kept.append(str(intermediate))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        intermediate.unlink()
        model = register(LocalModel(name=name, path=str(final), source="convert", kind=kind,
                                    quant=qtype, size_bytes=final.stat().st_size,
                                    mmproj=str(mmproj) if mmproj is not None else ""),
                         replace=True)
    return BuildResult(model, repo, tuple(kept), time.perf_counter() - started)


def _check_convertible(repo: str, name: str, *, quiet: bool) -> None:
    """Read the checkpoint's config.json alone first, so an architecture the converter does
    not know is refused before gigabytes of weights are downloaded.

    Raises:
        ConvertError: the architecture is not supported.
        HubError: the repository cannot be reached.
    """
    from llmkit.convert import CONVERTERS, read_config
    from llmkit.errors import ConvertError
    from llmkit.hub import fetch_file

    # Read as a checkpoint's config is (not JSON, or not an object: a ConvertError naming it).
    config = read_config(fetch_file(repo, "config.json", quiet=quiet).parent)
    listed = config.get("architectures")
    architectures = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
    if not any(a in CONVERTERS for a in architectures):
        raise ConvertError(
            f"{name} ({repo}) is a {', '.join(architectures) or 'model of unknown architecture'}"
            f" checkpoint, which llmkit's converter does not support (supported are "
            f"{', '.join(sorted(CONVERTERS))})",
            hint=f"pull its prebuilt GGUF instead: llmkit pull {name}")
