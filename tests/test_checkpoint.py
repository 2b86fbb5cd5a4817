"""Checkpoints: round trip in fp32 and fp16, and every kind of broken file rejected with a CheckpointError."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from engine.model.checkpoint import (FORMAT, META_KEY, CheckpointError, load_checkpoint, meta_digest, read_meta, save_checkpoint,
                               weights_digest)
from engine.model.network import ModelConfig, PoemModel
from engine.poem.vocab import Vocab


@pytest.fixture
def vocab():
    return Vocab.build(["床前明月光疑是地上霜举头望低思故乡"])


@pytest.fixture
def model(vocab):
    torch.manual_seed(0)
    return PoemModel(ModelConfig(vocab_size=len(vocab), cell="lstm", embed_dim=8, hidden_dim=12, num_layers=2,
                                 dropout=0.0)).eval()


@pytest.fixture
def good(tmp_path, model, vocab):
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, model, vocab, {"corpus_hash": "abc", "metrics": {"val_ppl": 9.5}})
    return path


@pytest.mark.parametrize("half,tol", [(False, 0.0), (True, 1e-2)])
def test_a_saved_checkpoint_loads_back_the_same_model(tmp_path, model, vocab, half, tol):
    path = tmp_path / "m.safetensors"
    written = save_checkpoint(path, model, vocab, {"metrics": {"val_ppl": 12.0}}, half=half)
    ckpt = load_checkpoint(path)
    assert ckpt.vocab.tokens == vocab.tokens
    assert ckpt.model.config == model.config
    assert ckpt.meta == written and ckpt.version == written["version"]
    assert ckpt.meta["dtype"] == ("float16" if half else "float32")
    assert ckpt.meta["metrics"] == {"val_ppl": 12.0}
    assert not ckpt.model.training
    tokens = torch.randint(0, len(vocab), (2, 6))
    torch.testing.assert_close(ckpt.model(tokens)[0], model(tokens)[0], rtol=tol, atol=tol)
    # The engine computes in fp32 whatever was stored.
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())


def test_fp16_checkpoints_are_about_half_the_size(tmp_path, model, vocab):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_checkpoint(full, model, vocab)
    save_checkpoint(half, model, vocab, half=True)
    weights = 4 * model.num_parameters()
    assert full.stat().st_size - half.stat().st_size == pytest.approx(weights / 2, rel=0.05)


def test_metadata_holds_what_the_engine_and_the_readme_need(good, vocab):
    meta = read_meta(good)
    for key in ("format", "format_version", "config", "vocab", "form_tokens", "version", "created_at", "dtype",
                "num_parameters", "weights_sha256", "corpus_hash", "metrics"):
        assert key in meta, key
    assert meta["format"] == FORMAT and meta["vocab"] == vocab.tokens


def test_a_trained_checkpoint_from_the_trainer_loads(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.meta["train"]["cell"] == "lstm" and "val_ppl" in ckpt.meta["metrics"]
    assert len(ckpt.meta["corpus_hash"]) == 16


def test_saving_with_a_vocabulary_of_the_wrong_size_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="vocab has"):
        save_checkpoint(tmp_path / "x.safetensors", model, Vocab.build(["月"]))


def test_saving_replaces_the_old_file_atomically_and_leaves_no_temporary_file(tmp_path, model, vocab):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, vocab, {"metrics": {"n": 1}})
    save_checkpoint(path, model, vocab, {"metrics": {"n": 2}})
    assert read_meta(path)["metrics"] == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


# -- every way a checkpoint can be broken ---------------------------------------------------------------------
def _tensors_and_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        # Copies: the loaded tensors map the file, which the corruption is about to overwrite.
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        meta = json.loads(f.metadata()[META_KEY])
    return tensors, meta


def _rewrite(path, tensors, meta, fix_digest=True, raw_meta=None):
    if fix_digest:  # correct digests, so that only the check under test can catch the corruption
        meta = dict(meta, weights_sha256=weights_digest(tensors))
        meta["meta_sha256"] = meta_digest(meta)
    header = {META_KEY: raw_meta if raw_meta is not None else json.dumps(meta, ensure_ascii=False)}
    path.write_bytes(st_save(tensors, metadata=header if raw_meta != "" else None))


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path):
    path.write_bytes(b"")


def random_bytes(path):
    path.write_bytes(os.urandom(4096))


def flipped_weight_byte(path):
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 100] ^= 0x40  # inside the tensor data: still parses, digest no longer matches
    path.write_bytes(bytes(data))


def nan_weights(path):
    tensors, meta = _tensors_and_meta(path)
    tensors["head.weight"][0, 0] = float("nan")
    _rewrite(path, tensors, meta)  # a correct digest: only the NaN check can catch it


def vocab_character_swapped(path):
    tensors, meta = _tensors_and_meta(path)
    meta["vocab"][-1], meta["vocab"][-2] = meta["vocab"][-2], meta["vocab"][-1]  # still valid JSON and a valid vocab
    _rewrite(path, tensors, meta, fix_digest=False)


def infinite_weights(path):
    tensors, meta = _tensors_and_meta(path)
    tensors["embed.weight"][1, 1] = float("inf")
    _rewrite(path, tensors, meta)


def metadata_missing(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta, raw_meta="")


def metadata_not_json(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta, raw_meta="{config: lstm")


def metadata_not_an_object(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta, raw_meta="[1, 2]")


def wrong_format(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"format": "some-other-model"})


def future_format_version(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"format_version": 99})


def lacks_weights_digest(path):
    tensors, meta = _tensors_and_meta(path)
    del meta["weights_sha256"]
    _rewrite(path, tensors, meta, fix_digest=False)


def lacks_config(path):
    tensors, meta = _tensors_and_meta(path)
    del meta["config"]
    _rewrite(path, tensors, meta)


def other_form_tokens(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"form_tokens": ["<wujue>", "<qijue>"]})


def vocab_config_mismatch(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"vocab": meta["vocab"] + ["龘"]})


def unknown_config_key(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"config": meta["config"] | {"heads": 8}})


def bad_config_value(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"config": meta["config"] | {"cell": "transformer"}})


def vocab_with_latin(path):
    tensors, meta = _tensors_and_meta(path)
    _rewrite(path, tensors, meta | {"vocab": meta["vocab"][:-1] + ["x"]})


def wrong_tensor_shapes(path):
    tensors, meta = _tensors_and_meta(path)
    tensors["head.weight"] = torch.zeros(tensors["head.weight"].shape[0], 5)
    _rewrite(path, tensors, meta)


def missing_tensor(path):
    tensors, meta = _tensors_and_meta(path)
    del tensors["head.bias"]
    _rewrite(path, tensors, meta)


def extra_tensor(path):
    tensors, meta = _tensors_and_meta(path)
    tensors["attention.weight"] = torch.zeros(2, 2)
    _rewrite(path, tensors, meta)


def integer_tensor(path):
    tensors, meta = _tensors_and_meta(path)
    tensors["head.bias"] = torch.zeros_like(tensors["head.bias"], dtype=torch.int32)
    _rewrite(path, tensors, meta)


def config_far_larger_than_its_weights(path):
    """A 25 KB file whose header asks for hidden_dim 2^22: building that model first raised a RuntimeError
    (or took gigabytes) instead of a CheckpointError."""
    tensors, meta = _tensors_and_meta(path)
    meta["config"] = dict(meta["config"], hidden_dim=1 << 22)
    _rewrite(path, tensors, meta)


def int8_scales_per_column(path):
    ckpt = load_checkpoint(path)
    save_checkpoint(path, ckpt.model, ckpt.vocab, int8=True)
    tensors, meta = _tensors_and_meta(path)
    tensors["head.weight.scale"] = torch.ones(tensors["head.weight"].shape[1])  # one per column, not per row
    _rewrite(path, tensors, meta)


def pickle_renamed(path):
    tensors, _ = _tensors_and_meta(path)
    torch.save(tensors, path)  # a torch pickle under the .safetensors name


def directory(path):
    path.unlink()
    path.mkdir()


def deleted(path):
    path.unlink()


CORRUPTIONS = [truncated, empty, random_bytes, flipped_weight_byte, nan_weights, vocab_character_swapped,
               infinite_weights, metadata_missing,
               metadata_not_json, metadata_not_an_object, wrong_format, future_format_version, lacks_weights_digest,
               lacks_config, other_form_tokens, vocab_config_mismatch, unknown_config_key, bad_config_value,
               vocab_with_latin, wrong_tensor_shapes, missing_tensor, extra_tensor, integer_tensor, pickle_renamed,
               directory, deleted, config_far_larger_than_its_weights, int8_scales_per_column]

EXPECTED_PROBLEM = {
    flipped_weight_byte: "SHA-256", nan_weights: "NaN", vocab_character_swapped: "metadata does not match", infinite_weights: "NaN", metadata_missing: "metadata",
    metadata_not_json: "not valid JSON", wrong_format: "format", future_format_version: "format_version",
    lacks_weights_digest: "weights_sha256", lacks_config: "config", other_form_tokens: "form tokens",
    vocab_config_mismatch: "vocabulary has", unknown_config_key: "unknown model config keys",
    bad_config_value: "cell", vocab_with_latin: "non-Han", wrong_tensor_shapes: "wrong shape",
    missing_tensor: "missing", extra_tensor: "extra", pickle_renamed: "safetensors", deleted: "no such file",
    config_far_larger_than_its_weights: "wrong shape", int8_scales_per_column: "one float per row",
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_every_broken_checkpoint_is_rejected_with_an_error_naming_the_file(good, corrupt):
    corrupt(good)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good)
    assert str(good) in str(info.value) and info.value.path == str(good)
    assert EXPECTED_PROBLEM.get(corrupt, "") in info.value.problem
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("corrupt", [truncated, random_bytes, metadata_missing, metadata_not_json, wrong_format,
                                     lacks_config, pickle_renamed, deleted], ids=lambda f: f.__name__)
def test_read_meta_rejects_a_broken_header_without_loading_weights(good, corrupt):
    corrupt(good)
    with pytest.raises(CheckpointError, match=str(good)):
        read_meta(good)


def test_the_trainer_eval_command_reports_a_broken_checkpoint_in_one_line(good, tmp_path, capsys):
    from trainer.__main__ import main

    truncated(good)
    poems = tmp_path / "poems.txt"
    poems.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(good), "--poems", str(poems)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(good) in err and err.count("\n") == 1
