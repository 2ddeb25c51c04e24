"""Problem sets as a tensorflow-datasets builder, for random access through `tfds.data_source`.

    from fd_jax.data.tfds_builder import prepare_problem_source
    sources = prepare_problem_source("minif2f.jsonl", data_dir="~/tensorflow_datasets")
    problem = sources["test"][17]          # a `Problem`, read from array_record files

Any file `fd_jax.data.load_problems` reads (miniF2F JSONL, Lean Workbook, JSONL with a field map) is
written once into array_record files, one per split, under `data_dir`; later calls reuse them. Random access
by index needs no TensorFlow: tfds' array_record format and data sources run on numpy alone. Needs the
`tfds` extra (`pip install "fd_jax[tfds]"`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from fd_jax.data.problems import Problem, load_problems

try:
    import tensorflow_datasets as tfds
except ImportError:  # an optional extra; the error says how to install it
    tfds = None

FIELDS = ("id", "statement", "header", "informal")


def _require_tfds():
    if tfds is None:
        raise ImportError('the tensorflow-datasets builder needs the tfds extra: pip install "fd_jax[tfds]"')


def problem_from_example(example: Mapping[str, Any], split: str = "") -> Problem:
    """A `Problem` from one decoded tfds example (text features come back as bytes)."""
    text = {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in example.items()}
    return Problem(**{k: text[k] for k in FIELDS}, split=split)


if tfds is not None:

    class LeanProblems(tfds.core.GeneratorBasedBuilder):
        """Theorem statements with their header and informal text, one split per split of the source file.

        source: the problem file; format / options: as for `fd_jax.data.load_problems`. The version's
        config name is derived from the file's path and size, so two sources never share files.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "id, statement, header, informal per problem."}

        def __init__(self, *, source: str | os.PathLike, format: str = "minif2f", options=None, **kwargs):
            self._source = pathlib.Path(source).expanduser().absolute()
            self._format = format
            self._options = dict(options or {})
            super().__init__(**kwargs)

        def _info(self):
            # DatasetInfo directly: `dataset_info_from_configs` would look for metadata files beside this module.
            text = {name: tfds.features.Text() for name in FIELDS}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(text),
                                         description=f"fd_jax problems from {self._source}")

        def _split_generators(self, dl_manager):
            problems = load_problems(self._source, format=self._format, **self._options)
            splits: dict[str, list[Problem]] = {}
            for problem in problems:
                splits.setdefault(problem.split or "train", []).append(problem)
            return {name: self._generate_examples(rows) for name, rows in splits.items()}

        def _generate_examples(self, problems) -> Iterator[tuple[str, dict[str, str]]]:
            seen = set()
            for problem in problems:
                if problem.id in seen:  # tfds keys must be unique; the error names the problem
                    raise ValueError(f"{self._source}: problem id {problem.id!r} appears twice")
                seen.add(problem.id)
                yield problem.id, {name: getattr(problem, name) for name in FIELDS}


class ProblemSource:
    """Random access to one split: `len(source)`, `source[i] -> Problem`."""

    def __init__(self, data_source, split: str):
        self._data_source = data_source
        self.split = split

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> Problem:
        return problem_from_example(self._data_source[index], self.split)


def prepare_problem_source(
    source: str | os.PathLike, *, data_dir: str | os.PathLike, format: str = "minif2f", **options: Any
) -> dict[str, ProblemSource]:
    """Writes `source` as array_record files under `data_dir` (once) and returns one `ProblemSource` per split."""
    _require_tfds()
    path = pathlib.Path(source).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"prepare_problem_source: {path} does not exist")
    # The same data_dir may hold several problem files: a per-source subdirectory keeps them apart.
    digest = hashlib.sha1(f"{path}:{path.stat().st_size}:{format}".encode()).hexdigest()[:12]
    builder = LeanProblems(source=path, format=format, options=options,
                           data_dir=pathlib.Path(data_dir).expanduser() / f"{path.stem}-{digest}",
                           file_format="array_record")
    builder.download_and_prepare()
    return {split: ProblemSource(ds, split) for split, ds in builder.as_data_source().items()}
