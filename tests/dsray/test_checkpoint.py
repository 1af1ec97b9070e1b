"""Tests for dsray.checkpoint and dsray.fp8 on small hand-written safetensors checkpoints."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dsray.checkpoint import (
    PROGRESS_MIN_BYTES,
    Checkpoint,
    CheckpointError,
    LoadProgress,
    MissingTensorError,
    PickleCheckpointError,
    ProgressBar,
    ShapeMismatchError,
    print_progress,
)
from dsray.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

D, I, E = 16, 8, 4  # hidden, expert intermediate, routed experts
ATTN_FILE, EXPERTS_LO_FILE, EXPERTS_HI_FILE = (
    "attn.safetensors",
    "experts-0-2.safetensors",
    "experts-2-4.safetensors",
)


def attention_tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(32, D),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(D, D),
        "model.layers.0.input_layernorm.weight": torch.ones(D),
        "model.layers.0.mlp.gate.weight": torch.randn(E, D),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(E),
    }


def expert_tensors(first: int, last: int) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.0.mlp.experts.{e}.{proj}.weight": torch.randn(shape)
        for e in range(first, last)
        for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I)))
    }


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def write_sharded(directory: pathlib.Path, files: dict[str, dict[str, torch.Tensor]]) -> pathlib.Path:
    directory.mkdir(exist_ok=True)
    for file, tensors in files.items():
        save_file(tensors, directory / file)
    weight_map = {name: file for file, tensors in files.items() for name in tensors}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture
def sharded(tmp_path) -> tuple[pathlib.Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint with the attention side in one file and the experts split over two."""
    attn, lo, hi = attention_tensors(), expert_tensors(0, 2), expert_tensors(2, 4)
    write_sharded(tmp_path / "ckpt", {ATTN_FILE: attn, EXPERTS_LO_FILE: lo, EXPERTS_HI_FILE: hi})
    return tmp_path / "ckpt", {**attn, **lo}, hi


def test_single_file_and_sharded_index_load_the_same(tmp_path, sharded):
    path, role, hi = sharded
    single = tmp_path / "single"
    single.mkdir()
    save_file({**role, **hi}, single / "model.safetensors")
    expected = shapes({**role, **hi})
    a = Checkpoint(single).load(expected, torch.float32)
    b = Checkpoint(path).load(expected, torch.float32)
    assert a.keys() == b.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert Checkpoint(single).tensor_names() == Checkpoint(path).tensor_names() == sorted(expected)


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_role_opens_only_its_own_files(sharded, damage):
    path, role, hi = sharded
    if damage == "delete":
        (path / EXPERTS_HI_FILE).unlink()
    else:
        (path / EXPERTS_HI_FILE).write_bytes(b"\x00garbage, not a safetensors header" * 8)
    checkpoint = Checkpoint(path)
    loaded = checkpoint.load(shapes(role), torch.float32)
    assert loaded.keys() == role.keys()
    assert checkpoint.files_opened == {ATTN_FILE, EXPERTS_LO_FILE}
    with pytest.raises(CheckpointError, match=EXPERTS_HI_FILE):
        checkpoint.load(shapes(hi), torch.float32)


def test_expert_role_does_not_open_attention_file(sharded):
    path, _, hi = sharded
    checkpoint = Checkpoint(path)
    loaded = checkpoint.load(shapes(hi), torch.bfloat16)
    assert checkpoint.files_opened == {EXPERTS_HI_FILE}
    torch.testing.assert_close(loaded[next(iter(hi))], next(iter(hi.values())).bfloat16())


def test_missing_tensors_are_named_and_counted(sharded):
    path, role, _ = sharded
    wanted = {**shapes(role), **{f"model.layers.9.missing.{i}.weight": (D,) for i in range(15)}}
    with pytest.raises(MissingTensorError) as info:
        Checkpoint(path).load(wanted, torch.float32)
    message = str(info.value)
    assert "15 tensor(s)" in message and "model.layers.9.missing.0.weight" in message
    assert "and 5 more" in message and "model.layers.9.missing.14.weight" not in message


def test_mis_shaped_tensor_names_expected_and_found(sharded):
    path, role, _ = sharded
    wanted = {**shapes(role), "model.layers.0.self_attn.o_proj.weight": (D, D + 1)}
    with pytest.raises(ShapeMismatchError) as info:
        Checkpoint(path).load(wanted, torch.float32)
    assert f"model.layers.0.self_attn.o_proj.weight: expected ({D}, {D + 1}), found ({D}, {D})" in str(info.value)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "unpickled"

    class Booby:
        def __reduce__(self):
            return pathlib.Path.touch, (sentinel,)

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Booby()}, f)
    torch.save({"w": torch.zeros(2)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(PickleCheckpointError) as info:
        Checkpoint(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message
    assert "safe_serialization=True" in message and "arbitrary code" in message
    assert not sentinel.exists()
    with open(tmp_path / "pytorch_model.bin", "rb") as f:
        pickle.load(f)  # the payload is live: unpickling it would have left the sentinel
    assert sentinel.exists()


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path)


def test_several_files_without_index_are_refused(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Checkpoint(tmp_path)


def test_fp8_round_trip_error_is_small():
    weight = torch.randn(256, 384)
    fp8, scale_inv = quantize_fp8_blocks(weight)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)
    restored = dequantize_fp8_blocks(fp8, scale_inv, dtype=torch.float32)
    assert (restored - weight).norm() / weight.norm() < 0.04


def test_fp8_shapes_not_multiple_of_block_and_zero_blocks():
    weight = torch.randn(300, 200)
    weight[:128, :128] = 0  # an all-zero block must not turn into NaN
    weight[256:, 128:] *= 1000  # per-block scales: a loud block does not drown the others
    fp8, scale_inv = quantize_fp8_blocks(weight)
    assert fp8.shape == (300, 200) and scale_inv.shape == (3, 2)
    restored = dequantize_fp8_blocks(fp8, scale_inv, dtype=torch.float32)
    assert torch.isfinite(restored).all() and (restored[:128, :128] == 0).all()
    for rows, cols in ((slice(128, 256), slice(0, 128)), (slice(256, 300), slice(128, 200))):
        block, back = weight[rows, cols], restored[rows, cols]
        assert (back - block).norm() / block.norm() < 0.04
    with pytest.raises(ValueError, match="needs \\(3, 2\\)"):
        dequantize_fp8_blocks(fp8, scale_inv[:2])


def write_fp8_checkpoint(directory, originals, block_size=None, drop_scale=None):
    tensors = {"model.norm.weight": torch.ones(D)}
    for name, weight in originals.items():
        fp8, scale_inv = quantize_fp8_blocks(weight, block_size or (128, 128))
        tensors[name], tensors[name + "_scale_inv"] = fp8, scale_inv
    tensors.pop(drop_scale, None)
    save_file(tensors, directory / "model.safetensors")
    if block_size:
        quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block_size)}
        (directory / "config.json").write_text(json.dumps({"quantization_config": quant}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [None, (64, 32)])
def test_fp8_checkpoint_loads_dequantised(tmp_path, dtype, block_size):
    originals = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(300, 200),
        "lm.weight": torch.randn(8, 16),
    }
    write_fp8_checkpoint(tmp_path, originals, block_size)
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.block_size == (block_size or (128, 128))
    loaded = checkpoint.load({**shapes(originals), "model.norm.weight": (D,)}, dtype)
    assert loaded.keys() == {*originals, "model.norm.weight"}  # scales are consumed, not returned
    for name, weight in originals.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == weight.shape
        assert (loaded[name].float() - weight).norm() / weight.norm() < 0.05


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    write_fp8_checkpoint(tmp_path, {name: torch.randn(64, 64)}, drop_scale=name + "_scale_inv")
    with pytest.raises(MissingTensorError, match=f"{name}_scale_inv"):
        Checkpoint(tmp_path).load({name: (64, 64)}, torch.bfloat16)


def test_fp8_scale_of_wrong_block_size_is_an_error(tmp_path):
    name = "w.weight"
    write_fp8_checkpoint(tmp_path, {name: torch.randn(300, 200)}, block_size=(64, 64))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with pytest.raises(ShapeMismatchError, match="weight_block_size"):
        Checkpoint(tmp_path, quantization_config=quant).load({name: (300, 200)}, torch.bfloat16)


def test_unsupported_quantization_is_refused(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="gptq"):
        Checkpoint(tmp_path, quantization_config={"quant_method": "gptq"})


def test_dtype_cast_and_fp32_keep_rules(tmp_path):
    tensors = {**attention_tensors(), "model.layers.0.counts": torch.arange(4)}
    save_file(
        {n: t.bfloat16() if t.is_floating_point() else t for n, t in tensors.items()},
        tmp_path / "a.safetensors",
    )
    expected = shapes(tensors)
    loaded = Checkpoint(tmp_path).load(expected, torch.float16)
    gate, bias = "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.e_score_correction_bias"
    assert loaded[gate].dtype == loaded[bias].dtype == torch.float32  # router stays fp32 by default
    assert loaded["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float16
    assert loaded["model.layers.0.counts"].dtype == torch.int64  # integer tensors are never cast
    kept = Checkpoint(tmp_path).load(expected, torch.bfloat16, keep_fp32={"model.embed_tokens.weight"})
    assert kept["model.embed_tokens.weight"].dtype == torch.float32 and kept[gate].dtype == torch.bfloat16
    none_kept = Checkpoint(tmp_path).load(expected, torch.bfloat16, keep_fp32=lambda name: False)
    assert {t.dtype for n, t in none_kept.items() if n != "model.layers.0.counts"} == {torch.bfloat16}


def test_progress_callback_reports_every_tensor_and_file(sharded):
    path, role, _ = sharded
    events: list[LoadProgress] = []
    Checkpoint(path).load(shapes(role), torch.bfloat16, progress=events.append)
    assert len(events) == len(role)
    last = events[-1]
    assert last.files_done == last.num_files == 2 and last.tensors_done == last.num_tensors == len(role)
    assert last.bytes_done == last.total_bytes == sum(t.numel() * 4 for t in role.values())
    assert sum(e.file_complete for e in events) == 2


def test_progress_false_and_default_are_quiet_for_small_loads(sharded, capsys):
    path, role, _ = sharded
    Checkpoint(path).load(shapes(role), torch.bfloat16)
    Checkpoint(path).load(shapes(role), torch.bfloat16, progress=False)
    assert capsys.readouterr().err == ""


def test_default_progress_prints_a_line_per_file_for_big_loads(capsys):
    event = dict(file="a", files_done=3, num_files=12, tensors_done=9, num_tensors=40)
    sizes = dict(bytes_done=1_200_000_000, total_bytes=max(4_800_000_000, PROGRESS_MIN_BYTES))
    print_progress(LoadProgress(file_complete=False, **event, **sizes))
    print_progress(LoadProgress(file_complete=True, **event, **sizes))
    assert capsys.readouterr().err == "dsray: loading 3/12 files, 1.2/4.8 GB\n"


def test_default_progress_is_a_bar_over_the_bytes_for_big_loads(capsys):
    bar = ProgressBar()
    total = 2 * PROGRESS_MIN_BYTES
    event = dict(file="a", num_files=2, tensors_done=1, num_tensors=2, total_bytes=total)
    bar(LoadProgress(file_complete=True, files_done=1, bytes_done=total // 2, **event))
    bar(LoadProgress(file_complete=True, files_done=2, bytes_done=total, **event))
    err = capsys.readouterr().err
    assert "dsray: loading" in err and "100%" in err and "2/2 files" in err
