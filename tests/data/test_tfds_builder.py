"""The tensorflow-datasets builder: array_record random access gives back exactly the loaded problems."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra: pip install 'fd_jax[tfds]'")

from fd_jax.data import load_minif2f  # noqa: E402
from fd_jax.data.tfds_builder import prepare_problem_source  # noqa: E402


def test_minif2f_random_access_equals_the_loader(shared_data, tmp_path):
    path = shared_data / "minif2f.jsonl"
    sources = prepare_problem_source(path, data_dir=tmp_path)
    assert {k: len(v) for k, v in sources.items()} == {"valid": 244, "test": 244}
    for split in ("valid", "test"):
        expected = {p.id: p for p in load_minif2f(path, split=split)}
        got = [sources[split][i] for i in range(len(sources[split]))]
        assert {p.id: p for p in got} == expected  # every field, unicode included
    again = prepare_problem_source(path, data_dir=tmp_path)  # reuses the prepared files
    assert again["test"][3] == sources["test"][3]


def test_duplicate_ids_are_named(tmp_path):
    rows = [{"name": "p1", "split": "valid", "formal_statement": "theorem p1 : True := by\n", "header": "",
             "informal_prefix": ""}] * 2
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="'p1' appears twice"):
        prepare_problem_source(path, data_dir=tmp_path / "data")
