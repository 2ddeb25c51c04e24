"""Hugging Face safetensors directories in and out of fd_jax parameters.

`load_hf` builds the model abstractly (no memory), then reads one tensor at a time, converts it to fd_jax's
layout and puts it straight onto its sharding, so host memory peaks near one copy of the weights plus one
tensor. `save_hf` writes sharded safetensors with an index, `config.json` and `generation_config.json`, in
the layout `transformers` and vLLM load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_dtypes
from safetensors.numpy import save_file

from fd_jax.models.config import ModelConfig
from fd_jax.models.transformer import Transformer
from fd_jax import sharding as sharding_lib

# Buffers that some checkpoints carry and that hold no learned weight.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple  # path of the parameter in the fd_jax state
    name: str  # tensor name in the Hugging Face checkpoint
    to_fd: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _entries(cfg: ModelConfig) -> Iterator[_Entry]:
    """The name and layout mapping for every parameter of `cfg`'s model."""
    d, h, g, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads_in(n):  # HF [n*hd, d] <-> fd [d, n, hd]
        return (lambda w: w.T.reshape(d, n, hd)), (lambda w: w.reshape(d, n * hd).T)

    def heads_bias(n):  # HF [n*hd] <-> fd [n, hd]
        return (lambda b: b.reshape(n, hd)), (lambda b: b.reshape(n * hd))

    yield _Entry(("embed",), "model.embed_tokens.weight", _identity, _identity)
    for i in range(cfg.num_layers):
        p, hf = ("layers", i), f"model.layers.{i}"
        yield _Entry(p + ("attn_norm", "scale"), f"{hf}.input_layernorm.weight", _identity, _identity)
        yield _Entry(p + ("mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", _identity, _identity)
        for ours, theirs, n in (("q", "q_proj", h), ("k", "k_proj", g), ("v", "v_proj", g)):
            yield _Entry(p + ("attn", ours), f"{hf}.self_attn.{theirs}.weight", *heads_in(n))
            if cfg.qkv_bias:
                yield _Entry(p + ("attn", f"{ours}_bias"), f"{hf}.self_attn.{theirs}.bias", *heads_bias(n))
        yield _Entry(
            p + ("attn", "o"),
            f"{hf}.self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, hd, d),
            lambda w: w.reshape(h * hd, d).T,
        )
        if cfg.o_bias:
            yield _Entry(p + ("attn", "o_bias"), f"{hf}.self_attn.o_proj.bias", _identity, _identity)
        if cfg.qk_norm:
            yield _Entry(p + ("attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", _identity, _identity)
            yield _Entry(p + ("attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", _identity, _identity)
        for ours in ("gate", "up", "down"):
            yield _Entry(p + ("mlp", ours), f"{hf}.mlp.{ours}_proj.weight", _transpose, _transpose)
            if cfg.mlp_bias:
                yield _Entry(p + ("mlp", f"{ours}_bias"), f"{hf}.mlp.{ours}_proj.bias", _identity, _identity)
    yield _Entry(("final_norm", "scale"), "model.norm.weight", _identity, _identity)
    if not cfg.tie_word_embeddings:
        yield _Entry(("lm_head",), "lm_head.weight", _transpose, _transpose)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    """Reads single tensors from a .safetensors file with plain reads, never mapping the whole file.

    safetensors' own `safe_open` memory-maps the file, and mapped pages stay resident for as long as the
    file is open, which would put the whole checkpoint in host memory on top of the placed parameters.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = np.frombuffer(f.read(8), dtype="<u8")
            header = json.loads(f.read(int(n)))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + int(n)

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            buffer = bytearray(end - start)
            f.readinto(buffer)
        return np.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def _weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> safetensors file, from the index if the checkpoint is sharded."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.exists():
        return {name: single for name in _SafetensorsFile(single).keys()}
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json (found {found}); fd_jax reads "
        "safetensors only: convert a pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)"
    )


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory (its config.json)."""
    directory = pathlib.Path(path)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"load_hf: {directory} is not a directory (expected a Hugging Face model folder)")
    if not config_file.exists():
        raise FileNotFoundError(f"load_hf: {config_file} does not exist")
    return ModelConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file))


def init_model(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    param_dtype=None,
    remat: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> Transformer:
    """A randomly initialised model. With a mesh, the weights are drawn in one jitted program that writes
    each straight into its sharding (never the whole model on one device first)."""

    def build() -> Transformer:
        return Transformer(cfg, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat, rngs=nnx.Rngs(seed))

    if mesh is None:
        return build()
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=sharding_lib.state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def load_hf(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face Llama / Qwen2 / Qwen3 directory into an fd_jax `Transformer`.

    dtype: compute dtype; param_dtype: storage dtype of the weights (default: `dtype`).
    mesh: when given, every tensor is placed directly onto its sharding as it is read.
    Raises FileNotFoundError for a missing directory/config/weights, ValueError for an unsupported
    architecture, a missing or unexpected tensor, or a tensor of the wrong shape (each naming the tensor).
    """
    directory = pathlib.Path(path)
    cfg = read_config(directory)
    param_dtype = param_dtype or dtype
    files = _weight_files(directory)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(state.flat_state())
    values = nnx.to_pure_dict(state)
    handles: dict[pathlib.Path, _SafetensorsFile] = {}
    consumed = set()
    for entry in _entries(cfg):
        if entry.name not in files:
            raise ValueError(f"{directory}: tensor {entry.name!r} is missing from the checkpoint")
        file = files[entry.name]
        if file not in handles:
            handles[file] = _SafetensorsFile(file)
        expected = variables[entry.path].get_value().shape
        expected_hf = entry.to_hf(np.empty(expected, np.int8)).shape
        found = handles[file].shape(entry.name)
        if found != tuple(expected_hf):
            raise ValueError(
                f"{file}: tensor {entry.name!r} has shape {found}, but config.json implies {tuple(expected_hf)}"
            )
        array = entry.to_fd(handles[file].read(entry.name))
        array = np.ascontiguousarray(array, dtype=jnp.dtype(param_dtype))
        if mesh is not None:
            value = jax.device_put(array, sharding_lib.variable_sharding(variables[entry.path], mesh))
        else:
            value = jax.device_put(array)
        _set_path(values, entry.path, value)
        consumed.add(entry.name)
        del array
    unexpected = [
        n for n in files
        if n not in consumed
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(
            f"{directory}: tensors not used by a {cfg.family} model with this config.json: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state), cfg


SPECIAL_TOKENS = ("bos", "eos", "pad")


def _set_special_tokens(hf_config, tokenizer) -> None:
    """The tokenizer's bos / eos / pad ids into the exported config (and so generation_config.json), so
    that `generate` stops at the tokenizer's end token. A model config's own ids are kept; an eos id the
    tokenizer adds is appended to them (chat models stop at either)."""
    for name in SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        current = getattr(hf_config, f"{name}_token_id", None)
        if token_id is None:
            continue
        if current is None:
            setattr(hf_config, f"{name}_token_id", token_id)
        elif name == "eos":
            ids = list(current) if isinstance(current, (list, tuple)) else [current]
            if token_id not in ids:
                setattr(hf_config, "eos_token_id", [*ids, token_id])


def save_hf(
    model: Transformer,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 2 * 1024**3,
) -> pathlib.Path:
    """Writes `model` as a Hugging Face directory that transformers' `from_pretrained` and vLLM load.

    dtype: storage dtype of the written tensors (default: the parameters' own). Sharded into files of at
    most `max_shard_bytes` (with model.safetensors.index.json) when larger. Tokenizer files are written
    when `tokenizer` is given. Only process 0 writes in a multi-host run.
    """
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    entries = list(_entries(config))
    out_dtype = jnp.dtype(dtype) if dtype is not None else None

    def tensor(entry):  # gathers a (possibly sharded) parameter to host, in HF layout
        array = np.asarray(jax.device_get(_get_path(values, entry.path)))
        return np.ascontiguousarray(entry.to_hf(array.astype(out_dtype) if out_dtype else array))

    sizes = [int(np.prod(_get_path(values, e.path).shape)) * (out_dtype or _get_path(values, e.path).dtype).itemsize
             for e in entries]
    shards, current, current_bytes = [], [], 0
    for entry, size in zip(entries, sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    shards.append(current)

    is_writer = jax.process_index() == 0
    weight_map = {}
    for k, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {e.name: tensor(e) for e in shard}  # one shard in host memory at a time
        if is_writer:
            save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update({e.name: name for e in shard})
    if not is_writer:
        return directory
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)

    hf_config = config.to_hf()
    stored = out_dtype or jnp.dtype(_get_path(values, entries[0].path).dtype)
    hf_config.dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[stored.name]
    if tokenizer is not None:
        _set_special_tokens(hf_config, tokenizer)
    hf_config.save_pretrained(directory)
    import transformers

    transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(directory)
    # safetensors writes its files 0600 (a private temporary renamed into place): give them the mode of
    # the directory's other files (0666 less the umask; reading the umask would race other threads).
    mode = (directory / "config.json").stat().st_mode & 0o777
    for name in set(weight_map.values()):
        (directory / name).chmod(mode)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
