"""Atomic save (issue #17), `diffusers_ptq.save_pretrained`: a save killed at any step leaves the old or the new
checkpoint whole, never a mix of the two; the user's own files in the folder survive; a corrupt weight group size in
the metadata fails clearly. (diffusers' own `save_pretrained` writes in place: diffusers has no hook for this.)"""

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_transformer, tiny_inputs
from diffusers import DiTTransformer2DModel
from safetensors import safe_open

import diffusers_ptq
from diffusers_ptq import BaselineConfig, quantize
from diffusers_ptq.serialization import (
    METADATA_KEY,
    CheckpointError,
    recover_interrupted_save,
    save_atomic,
)

FAST = {"num_samples": 2, "num_inference_steps": 2}
WEIGHTS = "diffusion_pytorch_model.safetensors"
USER_FILES = {"notes.txt": b"my notes", "samples/grid.txt": b"a subfolder of the user's"}
# Every filesystem step a save can be killed at: shard writes, the model card, fsyncs, renames, deletions.
STEPS = [(safetensors.torch, "save_file"), (Path, "write_text"), (os, "fsync"), (os, "rename"), (os, "replace"),
         (shutil, "rmtree"), (os, "unlink"), (os, "rmdir")]


class Killed(Exception):
    """The simulated kill -9 / power loss."""


class Killer:
    """Lets the first n filesystem steps run; the (n+1)-th and every later one raise Killed, as if the process had
    died there (so the save's own clean-up after an exception cannot run either)."""

    def __init__(self, patch, n: int):
        self.n, self.done, self.dead = n, [], False
        for owner, name in STEPS:
            patch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, real):
        def step(*args, **kwargs):
            if self.dead or len(self.done) == self.n:
                self.dead = True
                raise Killed(f"killed before step {self.n} ({name})")
            self.done.append(name)
            return real(*args, **kwargs)
        return step


def snapshot(folder: Path) -> dict[str, object]:
    """Every file under folder: its bytes; for safetensors, (header, tensor bytes), since safetensors writes the
    header's metadata map in a random order (two saves of one model differ in those bytes only)."""
    files = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".safetensors":
                size = int.from_bytes(data[:8], "little")
                data = json.loads(data[8:8 + size]), data[8 + size:]
            files[path.relative_to(folder).as_posix()] = data
    return files


def checkpoint_part(files: dict[str, object]) -> dict[str, object]:
    return {name: data for name, data in files.items() if name not in USER_FILES}


def add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def models():
    """Two different quantized transformers: the checkpoint on disk (old) and the one saved over it (new)."""
    old = quantize(make_tiny_transformer(seed=0), BaselineConfig(weight_bits=8, act_bits=8, **FAST), progress=False)
    new = quantize(make_tiny_transformer(seed=1), BaselineConfig(weight_bits=4, act_bits=8, **FAST), progress=False)
    return old, new


def reference(model, folder: Path, shard: str, user_files: bool) -> dict[str, object]:
    """Save a clean checkpoint of `model`, check that it loads as `model`, and return its files."""
    diffusers_ptq.save_pretrained(model, folder, max_shard_size=shard)
    with torch.no_grad():
        assert torch.equal(DiTTransformer2DModel.from_pretrained(folder)(**tiny_inputs()).sample,
                           model(**tiny_inputs()).sample)
    if user_files:
        add_user_files(folder)
    return snapshot(folder)


@pytest.mark.parametrize("old_shard, new_shard", [(None, "10GB"), ("10GB", "10GB"), ("20KB", "100KB")],
                         ids=["into-a-new-folder", "one-file-over-one-file", "8-shards-over-4-shards"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(models, tmp_path, old_shard, new_shard):
    old_model, new_model = models
    old = None if old_shard is None else reference(old_model, tmp_path / "old", old_shard, user_files=True)
    new = reference(new_model, tmp_path / "new", new_shard, user_files=old is not None)  # user files carried over
    if old_shard == "20KB":  # the case a file-by-file move could mix: different shard counts, each with an index
        assert {f"{WEIGHTS}.index.json", "diffusion_pytorch_model-00008-of-00008.safetensors"} <= old.keys()
        assert f"{WEIGHTS}.index.json" in new and "diffusion_pytorch_model-00004-of-00004.safetensors" in new
        assert not any("of-00008" in name for name in new)
    assert old is None or checkpoint_part(old)["config.json"] != new["config.json"]
    outcomes = []
    for n in itertools.count():
        run = tmp_path / f"run{n}"
        target = run / "transformer"
        run.mkdir()
        if old is not None:
            shutil.copytree(tmp_path / "old", target)
        with pytest.MonkeyPatch.context() as patch:
            killer = Killer(patch, n)
            try:
                diffusers_ptq.save_pretrained(new_model, target, max_shard_size=new_shard)
            except Killed:
                assert killer.dead
        if not killer.dead:  # n is past the last step: the save ran to its end
            assert snapshot(target) == new and os.listdir(run) == ["transformer"]
            break
        # Right after the kill, before any recovery: the folder holds the old or the new checkpoint whole (the
        # user's files may still be on their way over), or, killed between the two renames, it is missing and the
        # old folder waits whole in one `.transformer.old-*` sibling.
        if target.exists():
            state = checkpoint_part(snapshot(target))
            assert state in ([checkpoint_part(old)] if old else []) + [checkpoint_part(new)], killer.done
        else:
            kept = list(run.glob(".transformer.old-*"))
            assert old is None and not kept or [snapshot(p) for p in kept] == [old], (killer.done, os.listdir(run))
        if old is not None and not target.exists():  # the next save puts the old folder back first: user files kept
            again = tmp_path / f"again{n}"
            shutil.copytree(run, again, symlinks=True)
            diffusers_ptq.save_pretrained(new_model, again / "transformer", max_shard_size=new_shard)
            assert snapshot(again / "transformer") == new and os.listdir(again) == ["transformer"]
        recover_interrupted_save(target)
        after = snapshot(target) if target.exists() else None
        assert after in ([old] if old else [None]) + [new], killer.done
        assert os.listdir(run) == (["transformer"] if target.exists() else [])  # no temporary folder left
        outcomes.append("new" if after == new else "old" if after is not None else "none")
        with torch.no_grad():
            if after is not None:
                loaded = DiTTransformer2DModel.from_pretrained(target)(**tiny_inputs()).sample
                expected = (new_model if after == new else old_model)(**tiny_inputs()).sample
                assert torch.equal(loaded, expected)
    first = "old" if old is not None else "none"
    assert outcomes[0] == first and outcomes[-1] == "new"  # killed early: old; killed late: new
    assert outcomes == sorted(outcomes, key=lambda o: o == "new")  # never back to the old once the new is in
    steps = killer.done  # every step of the complete save was a kill point
    assert steps.count("rename") >= (1 if old is None else 2) and (old is None or "rmtree" in steps)
    assert steps.count("fsync") >= len(new) and "save_file" in steps


def test_save_atomic_keeps_its_contract(models, tmp_path, monkeypatch):
    _, model = models
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file: save_pretrained needs a folder"):
        diffusers_ptq.save_pretrained(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    diffusers_ptq.save_pretrained(model, tmp_path / "empty")  # an empty existing folder is fine
    assert {"config.json", WEIGHTS, "README.md"} == set(os.listdir(tmp_path / "empty"))
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    diffusers_ptq.save_pretrained(model, tmp_path / "link")  # a link is followed: the folder it points to is swapped
    assert (tmp_path / "link").is_symlink() and snapshot(tmp_path / "link") == snapshot(tmp_path / "empty")

    def failing_check(folder):
        raise CheckpointError("check failed")

    before = snapshot(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="check failed"):  # check runs before anything is published
        save_atomic(lambda tmp: Path(tmp, "config.json").write_text("{}"), tmp_path / "empty", check=failing_check)
    assert snapshot(tmp_path / "empty") == before
    monkeypatch.setattr("diffusers_ptq.distributed.is_main_process", lambda: False)
    save_atomic(lambda tmp: pytest.fail("a non-main process wrote"), tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "link"]


def test_a_pipeline_is_saved_atomically_as_one_folder_with_the_card_at_its_root(tmp_path, monkeypatch):
    from diffusers import DiTPipeline

    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = quantize(load_pipeline("bundled"), BaselineConfig(weight_bits=8, **FAST), progress=False)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)  # diffusers' own save, in place: no card
    assert not (folder / "README.md").exists() and not (folder / "transformer" / "README.md").exists()
    add_user_files(folder)
    diffusers_ptq.save_pretrained(pipe, folder)  # over it, as one folder
    card = (folder / "README.md").read_text()
    assert "quantized DiTPipeline" in card and "baseline" in card
    assert not (folder / "transformer" / "README.md").exists()
    assert {"model_index.json", f"transformer/{WEIGHTS}", "vae/config.json", *USER_FILES} <= set(snapshot(folder))
    assert os.listdir(tmp_path) == ["pipe"]  # no temporary folder left
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
    reloaded = DiTPipeline.from_pretrained(folder)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                  timestep=torch.tensor([999, 10]), class_labels=torch.tensor([3, 7]))
    with torch.no_grad():
        assert torch.equal(reloaded.transformer(**inputs).sample, pipe.transformer(**inputs).sample)


def test_recovery_refuses_to_guess_between_two_earlier_folders(tmp_path):
    for suffix in ("aaaa", "bbbb"):
        (tmp_path / f".ckpt.old-{suffix}").mkdir()
    with pytest.raises(CheckpointError, match="several earlier folders.*rename the one to keep to ckpt"):
        recover_interrupted_save(tmp_path / "ckpt")
    (tmp_path / ".ckpt.old-aaaa.old-cccc").mkdir()  # another folder's leftover ("ckpt.old-aaaa"): not ours
    shutil.rmtree(tmp_path / ".ckpt.old-bbbb")
    recover_interrupted_save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == [".ckpt.old-aaaa.old-cccc", "ckpt"]


@pytest.fixture(scope="module")
def grouped_checkpoints(tmp_path_factory):
    """A W4A8 checkpoint with weight groups of 16 and a W8A8 one (group size null)."""
    folders = {}
    for bits, group in ((4, 16), (8, None)):
        model = quantize(make_tiny_transformer(), BaselineConfig(weight_bits=bits, weight_group_size=group, **FAST),
                         progress=False)
        folders[bits] = tmp_path_factory.mktemp(f"w{bits}") / "ckpt"
        model.save_pretrained(folders[bits])  # diffusers' own save: the metadata comes from the quantizer's hook
    return folders


@pytest.mark.parametrize("bits, group", [(4, 0), (4, -16), (4, "16"), (4, 2.5), (4, True), (4, 5), (8, 0), (8, 16)])
def test_a_bad_weight_group_size_in_the_metadata_fails_clearly(grouped_checkpoints, tmp_path, bits, group):
    folder = tmp_path / "ckpt"
    shutil.copytree(grouped_checkpoints[bits], folder)
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        header = f.metadata()
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    metadata = json.loads(header[METADATA_KEY])
    layer = "transformer_blocks.0.attn1.to_q"
    assert metadata["modules"][layer]["weight_group_size"] == (16 if bits == 4 else None)
    metadata["modules"][layer]["weight_group_size"] = group
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS), metadata={**header, METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(CheckpointError) as info:
        DiTTransformer2DModel.from_pretrained(folder)
    message = str(info.value)
    assert message.startswith(f"{layer}: weight_group_size={group!r}")
    assert ("positive integer that divides in_features (32)" if bits == 4 else "4-bit weights only") in message
    assert "save the model again" in message
