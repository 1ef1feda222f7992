"""kdsearch.infra.tensor_cache: content keys, build once, read back intact or not at all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kdsearch.infra.tensor_cache import META, TENSORS, TensorCache, content_key, file_sha256

FIELDS = {"teacher": "abc", "steps": 8}


def _builder(calls: list, tensors: dict | None = None, extra: dict | None = None):
    def build(scratch):
        calls.append(scratch)
        assert scratch.is_dir() and scratch.name == "partial"
        return tensors if tensors is not None else {"x": torch.arange(6.0).reshape(2, 3)}, extra or {}

    return build


def test_content_key_is_a_sha256_prefix_of_the_sorted_json():
    expected = hashlib.sha256(b'{"a": 1, "b": [2, 3]}').hexdigest()[:24]
    assert content_key({"b": [2, 3], "a": 1}) == content_key({"a": 1, "b": (2, 3)}) == expected
    assert content_key({"a": 1, "b": [3, 2]}) != expected  # order within a value matters
    assert content_key({"path": Path("/x")}) == content_key({"path": "/x"})  # default=str


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"kdsearch")
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"kdsearch").hexdigest()


def test_a_missing_artefact_loads_as_none_and_creates_nothing(tmp_path):
    assert TensorCache(tmp_path / "cache").load("kind", FIELDS) is None
    assert not (tmp_path / "cache").exists()


def test_get_or_build_builds_once_and_writes_tensors_and_meta(tmp_path):
    cache, calls = TensorCache(tmp_path), []
    built = cache.get_or_build("kind", FIELDS, _builder(calls, extra={"note": "hi"}))
    again = cache.get_or_build("kind", FIELDS, _builder(calls))
    assert len(calls) == 1
    directory = tmp_path / "kind" / content_key(FIELDS)
    assert built.path == again.path == directory == cache.directory("kind", FIELDS)
    assert sorted(p.name for p in directory.iterdir()) == [META, TENSORS]  # the scratch folder is gone
    torch.testing.assert_close(again.tensors["x"], torch.arange(6.0).reshape(2, 3))
    meta = json.loads((directory / META).read_text())
    assert meta == {
        "key_fields": FIELDS,
        "file_bytes": (directory / TENSORS).stat().st_size,
        "file_sha256": hashlib.sha256((directory / TENSORS).read_bytes()).hexdigest(),
        "shapes": {"x": [2, 3]},
        "note": "hi",
    }
    assert again.meta == meta


def test_other_fields_or_kind_are_another_artefact(tmp_path):
    cache, calls = TensorCache(tmp_path), []
    cache.get_or_build("kind", FIELDS, _builder(calls))
    cache.get_or_build("kind", {**FIELDS, "steps": 9}, _builder(calls))
    cache.get_or_build("other", FIELDS, _builder(calls))
    assert len(calls) == 3


def test_a_non_contiguous_tensor_is_stored_contiguous(tmp_path):
    transposed = torch.arange(6.0).reshape(2, 3).t()
    artifact = TensorCache(tmp_path).get_or_build("kind", FIELDS, _builder([], {"t": transposed}))
    assert artifact.tensors["t"].is_contiguous() and torch.equal(artifact.tensors["t"], transposed)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[:-10]),  # truncated
        lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1])),  # a flipped bit
        lambda path: path.unlink(),  # gone
    ],
    ids=["truncated", "flipped", "missing"],
)
def test_a_damaged_tensors_file_is_rebuilt(tmp_path, damage):
    cache, calls = TensorCache(tmp_path), []
    first = cache.get_or_build("kind", FIELDS, _builder(calls))
    damage(first.path / TENSORS)
    assert cache.load("kind", FIELDS) is None
    rebuilt = cache.get_or_build("kind", FIELDS, _builder(calls, {"x": torch.ones(2)}))
    assert len(calls) == 2 and torch.equal(rebuilt.tensors["x"], torch.ones(2))


def test_unreadable_meta_is_a_miss(tmp_path):
    cache = TensorCache(tmp_path)
    artifact = cache.get_or_build("kind", FIELDS, _builder([]))
    (artifact.path / META).write_text("{not json")
    assert cache.load("kind", FIELDS) is None
    (artifact.path / META).write_text(json.dumps({"key_fields": FIELDS}))  # no size or digest
    assert cache.load("kind", FIELDS) is None


def test_a_failed_build_keeps_its_scratch_for_the_next_try(tmp_path):
    cache = TensorCache(tmp_path)

    def crash(scratch):
        (scratch / "half.pt").write_text("partial result")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cache.get_or_build("kind", FIELDS, crash)
    assert cache.load("kind", FIELDS) is None
    seen = []

    def resume(scratch):
        seen.append((scratch / "half.pt").read_text())
        return {"x": torch.zeros(1)}, {}

    cache.get_or_build("kind", FIELDS, resume)
    assert seen == ["partial result"] and not (cache.directory("kind", FIELDS) / "partial").exists()
