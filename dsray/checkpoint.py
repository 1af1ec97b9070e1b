"""Safetensors checkpoint reading: which file holds which tensor, and loading a role's tensors.

A role (the attention side, or one expert shard) asks for exactly the tensors it owns;
:meth:`Checkpoint.load` opens only the shard files that hold them, checks every shape,
dequantises FP8 block-quantised weights and casts to the model dtype. Pickle checkpoints
(``*.bin``, ``*.pt``, ``*.pth``) are refused: unpickling can run arbitrary code.

FP8 is detected per tensor from its safetensors dtype (``F8_E4M3``); its block scale is the
companion ``<name>_scale_inv``. The block size comes from ``quantization_config`` — given to
:class:`Checkpoint` or read from ``config.json`` — and defaults to DeepSeek's 128×128.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dsray.fp8 import DEFAULT_BLOCK_SIZE, dequantize_fp8_blocks, scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
SCALE_SUFFIX = "_scale_inv"
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
PROGRESS_MIN_BYTES = 256 * 2**20  # smaller loads finish too fast for progress lines to help
MAX_NAMES_SHOWN = 10
CONVERT_HINT = (
    "Convert it once with transformers: `AutoModelForCausalLM.from_pretrained(src, torch_dtype='auto')"
    ".save_pretrained(dst, safe_serialization=True)`, or load the state dict in a trusted environment "
    "and write it with `safetensors.torch.save_file(state_dict, 'model.safetensors')`."
)


class CheckpointError(ValueError):
    """A checkpoint is absent, unreadable or does not match what the model expects."""


class PickleCheckpointError(CheckpointError):
    """The directory only holds pickle checkpoints, which dsray refuses to unpickle."""


class MissingTensorError(CheckpointError):
    """Tensors the model needs (or an FP8 weight's scale) are not in the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's stored shape differs from the shape the model expects."""


def default_keep_fp32(name: str) -> bool:
    """The MoE router's weight and correction bias stay fp32: routing is decided in fp32."""
    return name.endswith(".mlp.gate.weight") or name.endswith(".e_score_correction_bias")


@dataclass(frozen=True)
class LoadProgress:
    """Where a :meth:`Checkpoint.load` stands; passed to the progress callback after each tensor."""

    file: str
    file_complete: bool
    files_done: int
    num_files: int
    tensors_done: int
    num_tensors: int
    bytes_done: int
    total_bytes: int


def print_progress(event: LoadProgress) -> None:
    """Default progress reporter: a stderr line per finished file, for loads big enough to wait on."""
    if event.file_complete and event.total_bytes >= PROGRESS_MIN_BYTES:
        print(
            f"dsray: loading {event.files_done}/{event.num_files} files, "
            f"{event.bytes_done / 1e9:.1f}/{event.total_bytes / 1e9:.1f} GB",
            file=sys.stderr,
            flush=True,
        )


class ProgressBar:
    """Default progress reporter: a tqdm bar over the bytes read, for loads big enough to wait on."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, event: LoadProgress) -> None:
        if event.total_bytes < PROGRESS_MIN_BYTES:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=event.total_bytes, unit="B", unit_scale=True, desc="dsray: loading", file=sys.stderr)
        self._bar.set_postfix_str(f"{event.files_done - (not event.file_complete)}/{event.num_files} files")
        self._bar.update(event.bytes_done - self._bar.n)
        if event.file_complete and event.files_done == event.num_files:
            self._bar.close()


def _block_size(quantization_config: Mapping[str, Any] | None) -> tuple[int, int]:
    """Validate a ``quantization_config`` and return its FP8 block size."""
    if not quantization_config:
        return DEFAULT_BLOCK_SIZE
    method, fmt = quantization_config.get("quant_method", "fp8"), quantization_config.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise CheckpointError(
            f"quantization_config has quant_method={method!r}, fmt={fmt!r}; dsray reads only fp8 e4m3 "
            "block-quantised weights (DeepSeek-V3 style) or unquantised bf16/fp32 checkpoints"
        )
    block = tuple(quantization_config.get("weight_block_size", DEFAULT_BLOCK_SIZE))
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block}")
    return block  # type: ignore[return-value]


def _names_preview(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f" (and {len(names) - MAX_NAMES_SHOWN} more)" if len(names) > MAX_NAMES_SHOWN else "")


class Checkpoint:
    """A safetensors checkpoint directory: ``model.safetensors`` or a sharded index.

    ``quantization_config`` overrides the one in ``config.json`` (if any). Nothing but a
    directory listing happens on construction; the index or header is parsed on first use.
    ``files_opened`` records every file name (relative to ``path``) this object has opened.
    """

    def __init__(self, path: str | Path, quantization_config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(
                f"checkpoint directory {self.path} does not exist or is not a directory; pass the "
                "directory that holds config.json and the *.safetensors files"
            )
        self._index_file, self._single_file = self._find_weights()
        if quantization_config is None:
            quantization_config = self._read_config().get("quantization_config")
        self.quantization_config = quantization_config
        self.block_size = _block_size(quantization_config)
        self.files_opened: set[str] = set()
        self._weight_map: dict[str, str] | None = None

    def _find_weights(self) -> tuple[Path | None, Path | None]:
        """Pick the index or the single file; refuse pickle-only directories."""
        if (self.path / INDEX_FILE).is_file():
            return self.path / INDEX_FILE, None
        if (self.path / SINGLE_FILE).is_file():
            return None, self.path / SINGLE_FILE
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) == 1:  # a lone file under another name, e.g. consolidated.safetensors
            return None, files[0]
        if files:
            raise CheckpointError(
                f"{self.path} holds {len(files)} .safetensors files but no single {INDEX_FILE}; write "
                "one mapping each tensor name to its file ({'weight_map': {name: file}}) or keep one file"
            )
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in self.path.glob(pattern))
        if pickles:
            raise PickleCheckpointError(
                f"{self.path} holds only pickle checkpoints ({_names_preview(pickles)}); dsray refuses "
                f"them because unpickling can run arbitrary code. It reads safetensors. {CONVERT_HINT}"
            )
        raise CheckpointError(f"no weights in {self.path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shard files")

    def _read_config(self) -> dict[str, Any]:
        config_file = self.path / "config.json"
        if not config_file.is_file():
            return {}
        try:
            return json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot parse {config_file}: {e}") from e

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → file name (relative to ``path``), parsed on first use."""
        if self._weight_map is None:
            self._weight_map = self._read_index() if self._index_file else self._read_header()
        return self._weight_map

    def _read_index(self) -> dict[str, str]:
        try:
            weight_map = json.loads(self._index_file.read_text()).get("weight_map")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"cannot parse checkpoint index {self._index_file}: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(
                f"{self._index_file} has no 'weight_map' object mapping tensor names to shard file names"
            )
        return weight_map

    def _read_header(self) -> dict[str, str]:
        name = self._single_file.name
        with self._open(name) as f:
            return dict.fromkeys(f.keys(), name)

    def _open(self, file: str):
        """Open one safetensors file (header only; data is memory-mapped on read) and record it."""
        self.files_opened.add(file)
        try:
            return safe_open(self.path / file, framework="pt")
        except (OSError, SafetensorError) as e:
            raise CheckpointError(
                f"cannot open checkpoint file {self.path / file}: {e}. It is missing or corrupt: "
                "re-download it (a partial download leaves truncated shards)"
            ) from e

    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self.weight_map)

    def load(
        self,
        expected: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype = torch.bfloat16,
        keep_fp32: set[str] | Callable[[str], bool] = default_keep_fp32,
        progress: bool | Callable[[LoadProgress], None] = True,
        keep_fp8: Callable[[str], bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read exactly the tensors in ``expected`` (name → shape), opening only their files.

        FP8 weights come back dequantised, except those ``keep_fp8`` selects: they stay
        float8_e4m3fn and their block scales come along as ``name + "_scale_inv"`` (fp32).
        Floating tensors are cast to ``dtype``, except the
        names ``keep_fp32`` selects (a set of names, or a predicate), which come back fp32.
        Extra tensors in the files are ignored. ``progress`` is True (a progress bar for big
        loads), False, or a callback taking a :class:`LoadProgress` after every tensor.
        """
        keep = keep_fp32.__contains__ if isinstance(keep_fp32, (set, frozenset)) else keep_fp32
        report = ProgressBar() if progress is True else progress or None
        missing = [name for name in expected if name not in self.weight_map]
        if missing:
            raise MissingTensorError(
                f"checkpoint {self.path} lacks {len(missing)} tensor(s) the model needs: "
                f"{_names_preview(missing)}. Does config.json match these weights (model type, layer "
                "and expert counts), and is the download complete?"
            )
        with ExitStack() as stack:
            handles: dict[str, Any] = {}

            def handle(file: str):
                if file not in handles:
                    handles[file] = stack.enter_context(self._open(file))
                return handles[file]

            # Every header is checked before any data is read, so a wrong shape or a missing
            # shard fails in seconds rather than after gigabytes.
            by_file, scales, total_bytes = self._plan(expected, handle)
            tensors: dict[str, torch.Tensor] = {}
            kept: dict[str, torch.Tensor] = {}  # the block scales of the fp8 weights kept fp8
            bytes_done = 0
            for files_done, (file, names) in enumerate(by_file.items(), start=1):
                for i, name in enumerate(names):
                    tensor = handle(file).get_tensor(name)
                    bytes_done += tensor.numel() * tensor.element_size()
                    if name in scales and keep_fp8 is not None and keep_fp8(name):
                        tensors[name] = tensor  # float8_e4m3fn, as stored
                        kept[name + SCALE_SUFFIX] = handle(self.weight_map[scales[name]]).get_tensor(scales[name])
                    else:
                        tensors[name] = self._convert(name, tensor, scales.get(name), dtype, keep, handle)
                    if report:
                        complete = i == len(names) - 1
                        done = (files_done if complete else files_done - 1, len(by_file))
                        counts = (len(tensors), len(expected), bytes_done, total_bytes)
                        report(LoadProgress(file, complete, *done, *counts))
        return {name: tensors[name] for name in expected} | {name: s.float() for name, s in kept.items()}

    def _plan(self, expected: Mapping[str, tuple[int, ...]], handle: Callable):
        """Check shapes and FP8 scales from headers; group names by file; count bytes."""
        by_file: dict[str, list[str]] = {}
        scales: dict[str, str] = {}
        mismatched: list[str] = []
        total_bytes = 0
        for name, want in expected.items():
            file = self.weight_map[name]
            info = handle(file).get_slice(name)
            found, stored = tuple(info.get_shape()), info.get_dtype()
            if found != tuple(want):
                mismatched.append(f"{name}: expected {tuple(want)}, found {found}")
            total_bytes += DTYPE_BYTES.get(stored, 1) * torch.Size(found).numel()
            by_file.setdefault(file, []).append(name)
            if stored == "F8_E4M3":
                scales[name] = self._check_scale(name, found, handle)
            elif stored.startswith("F8"):
                raise CheckpointError(f"{name} is stored as {stored}; dsray reads only e4m3 FP8 weights")
        if mismatched:
            raise ShapeMismatchError(
                f"{len(mismatched)} tensor(s) in {self.path} have the wrong shape: "
                f"{_names_preview(mismatched)}. The checkpoint does not match the model's config."
            )
        return dict(sorted(by_file.items())), scales, total_bytes

    def _check_scale(self, name: str, weight_shape: tuple[int, ...], handle: Callable) -> str:
        scale = name + SCALE_SUFFIX
        if scale not in self.weight_map:
            raise MissingTensorError(
                f"{name} is FP8 (float8_e4m3fn) but its block scale {scale} is not in the checkpoint; "
                "FP8 weights cannot be used without their scales: re-export the checkpoint with them"
            )
        found = tuple(handle(self.weight_map[scale]).get_slice(scale).get_shape())
        want = scale_shape(weight_shape, self.block_size) if len(weight_shape) == 2 else None
        if found != want:
            raise ShapeMismatchError(
                f"{scale} has shape {found} but a {weight_shape} weight with block size {self.block_size} "
                f"needs {want}; check quantization_config.weight_block_size"
            )
        return scale

    def _convert(self, name, tensor, scale, dtype, keep, handle) -> torch.Tensor:
        """Dequantise FP8 and cast to the load dtype (fp32 for kept names)."""
        target = torch.float32 if keep(name) else dtype
        if scale is not None:
            scale_inv = handle(self.weight_map[scale]).get_tensor(scale)  # [Bo, Bi]
            return dequantize_fp8_blocks(tensor, scale_inv, self.block_size, target)  # [out, in]
        return tensor.to(target) if tensor.is_floating_point() else tensor
