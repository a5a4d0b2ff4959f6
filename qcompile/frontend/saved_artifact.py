"""The saved artifact's file format: what `qcompile.quantize(...).save(dir)` writes and the
backend reads back (`options={"artifact": dir}`) instead of calibrating.

An artifact directory holds what the pipeline needs that only calibration or an expensive step
can give:

- the calibration statistics of every linear's input, by the linear's weight name (per-channel
  ranges and the token samples the passes measure errors on; not GPTQ's Gram matrices),
- the results of the expensive steps (`qcompile.core.memo`): GPTQ's rounded weights and steps, the
  searched clipping ratios and migration scales,
- the pipeline string and recipe, the qcompile and torch versions, a hash of every parameter
  the quantized graphs read (and of the whole model).

`q4.safetensors`: its metadata holds the manifest (JSON under the key "qcompile"); its tensors
are stored once per distinct content (q, k and v read the same activation: its samples are
stored once), named by the sha256 of that content, which reading checks. Beside it,
`compiled.bin`, the compiled-kernels cache: torch.compiler's cache artifacts of the quantizing
process (`torch.compiler.save_cache_artifacts`: Inductor's generated and compiled kernels).
Another format version, or a truncated or corrupted file each raise `ArtifactError` saying
which, before any weight is used.

What loading trusts: `q4.safetensors` is read with safetensors (tensors and a JSON manifest: no
code, no pickle), so a default load runs nothing that came with the artifact; Inductor compiles
the quantized graphs here. `compiled.bin` is pickled cache entries and generated code that run
when loaded, and its hash in the manifest proves only that the file is whole: whoever wrote the
directory wrote the hash. It is handed to `torch.compiler.load_cache_artifacts` only when the
user says the artifact is trusted like code (`trust_compiled=True`), to skip compiling; on
another torch or machine its entries just do not match and Inductor compiles anyway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

import qcompile
from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.core import ir
from qcompile.core.memo import Memo, tensor_hash
from qcompile.frontend.calibrate import observed_linears

__all__ = ["ArtifactError", "Replay", "SavedArtifact", "save", "read", "read_cached", "FORMAT_VERSION",
           "FILE_NAME"]

FORMAT_VERSION = 1
FILE_NAME = "q4.safetensors"
# the compiled-kernels cache: torch.compiler's cache artifacts (Inductor's kernels) of the quantizing process
KERNEL_CACHE_FILE_NAME = "compiled.bin"
_STATS_FIELDS = ("absmax", "robust", "samples")
_OPTIONAL_STATS_FIELDS = ("sinks", "rest_absmax")  # absent from artifacts saved before they existed


class ArtifactError(ValueError):
    """A saved artifact cannot be used: another model, another format version, or a truncated
    or corrupted file (the message says which)."""


def tensors_hash(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()


def parameter_hash(model: torch.nn.Module) -> str:
    """The hash of a model's parameters and buffers (its state dict)."""
    return tensors_hash(model.state_dict().items())


# --- what one compiled graph contributes -------------------------------------------------------


@dataclasses.dataclass
class Replay:
    """What compiling one graph needed from calibration and from expensive steps: calibration
    statistics by weight name, the memo of expensive results, and the parameters it froze."""

    stats: dict[str, ChannelStats]
    memo: Memo
    parameters: dict[str, torch.Tensor]

    @classmethod
    def collect(cls, frozen: fx.GraphModule, memo: Memo) -> Replay:
        """From a frozen, calibrated graph, before the passes run."""
        stats, parameters = {}, {}
        for n in frozen.graph.nodes:
            if n.op == "get_attr" and ir.FQN in n.meta:
                parameters[n.meta[ir.FQN]] = ir.get_constant(frozen, n)
            if n.op == "call_function" and ir.CALIB in n.meta and ir.FQN in getattr(n.args[1], "meta", {}):
                stats[n.args[1].meta[ir.FQN]] = n.meta[ir.CALIB]
        return cls(stats, memo, parameters)


# --- the file ----------------------------------------------------------------------------------


def save(directory: str | Path, replays: list[Replay], info: Mapping[str, Any],
         kernel_cache: bytes | None = None) -> Path:
    """Write the replays of every graph, merged, with `info` (recipe, pipeline, model hash), and
    `kernel_cache`: torch's compiled-kernels cache (`torch.compiler.save_cache_artifacts`) if given."""
    from safetensors.torch import save_file

    blobs: dict[str, torch.Tensor] = {}

    def blob(t: torch.Tensor) -> str:
        t = t.detach().to("cpu").contiguous()
        digest = tensor_hash(t)
        blobs.setdefault(digest, t)
        return digest

    stats, memo, parameters = {}, {}, {}
    for replay in replays:
        for fqn, s in replay.stats.items():
            stats[fqn] = {"num_tokens": s.num_tokens, **{f: blob(getattr(s, f)) for f in _STATS_FIELDS},
                          **{f: blob(getattr(s, f)) for f in _OPTIONAL_STATS_FIELDS if getattr(s, f) is not None}}
        for key, values in replay.memo.entries.items():
            memo[key] = [blob(v) for v in values]
        for fqn, t in replay.parameters.items():
            parameters[fqn] = tensor_hash(t)
    manifest = {
        "format_version": FORMAT_VERSION,
        "qcompile_version": qcompile.__version__,
        "torch_version": torch.__version__,
        **info,
        "parameters": parameters,
        "stats": stats,
        "memo": memo,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kernel_cache:
        (directory / KERNEL_CACHE_FILE_NAME).write_bytes(kernel_cache)
        manifest["compiled"] = {"file": KERNEL_CACHE_FILE_NAME, "sha256": hashlib.sha256(kernel_cache).hexdigest()}
    else:
        (directory / KERNEL_CACHE_FILE_NAME).unlink(missing_ok=True)
    path = directory / FILE_NAME
    partial = directory / (FILE_NAME + ".partial")  # never half a file under the real name
    save_file(blobs, str(partial), metadata={"qcompile": json.dumps(manifest)})
    partial.replace(path)
    return path


@dataclasses.dataclass
class SavedArtifact:
    """An artifact directory as read and checked: its manifest and tensors by content hash."""

    path: Path
    manifest: dict
    blobs: dict[str, torch.Tensor]
    kernel_cache_loaded: bool = False

    @property
    def pipeline(self) -> str:
        return self.manifest["pipeline"]

    def stats(self) -> dict[str, ChannelStats]:
        return {
            fqn: ChannelStats(**{f: self.blobs[entry[f]] for f in (*_STATS_FIELDS, *_OPTIONAL_STATS_FIELDS) if f in entry},
                              num_tokens=entry["num_tokens"])
            for fqn, entry in self.manifest["stats"].items()
        }

    def memo(self) -> Memo:
        """The saved results, strict: a step without one is an error, never recomputed."""
        return Memo({key: tuple(self.blobs[d] for d in digests) for key, digests in self.manifest["memo"].items()},
                    strict=True)

    def check_parameters(self, frozen: fx.GraphModule) -> None:
        """Every parameter the graph froze that the artifact knows must hash the same."""
        saved = self.manifest["parameters"]
        for n in frozen.graph.nodes:
            fqn = n.meta.get(ir.FQN) if n.op == "get_attr" else None
            if fqn in saved and tensor_hash(ir.get_constant(frozen, n)) != saved[fqn]:
                raise ArtifactError(
                    f"artifact {self.path} was saved for a different model: parameter {fqn!r} differs "
                    "from the one it was quantized from (parameter hash mismatch)"
                )

    def load_kernel_cache(self) -> None:
        """Give torch.compiler the quantizing process's compiled-kernels cache (once per process),
        so that Inductor finds the kernels it would otherwise generate and compile again. A cache
        entry for another torch, device or graph simply does not match and is compiled anew.
        This unpickles and runs what the file holds: the backend calls it only with
        `trust_compiled=True`."""
        entry = self.manifest.get("compiled")
        if entry is None or self.kernel_cache_loaded:
            return
        self.kernel_cache_loaded = True
        path = self.path.parent / entry["file"]
        if not path.is_file():  # optional: without it Inductor compiles, as on a first run
            warnings.warn(f"{path} is missing: the quantized graphs are compiled again", stacklevel=2)
            return
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{path} is truncated or corrupted (it does not match its hash)")
        torch.compiler.load_cache_artifacts(data)

    def attach_stats(self, frozen: fx.GraphModule) -> None:
        """Put the saved statistics where calibration would have (`q4_calib` on each linear)."""
        stats = self.stats()
        for n in observed_linears(frozen):
            fqn = n.args[1].meta.get(ir.FQN)
            if fqn in stats:
                n.meta[ir.CALIB] = stats[fqn]


def read(directory: str | Path) -> SavedArtifact:
    """Read and check an artifact directory: format version and every tensor's hash."""
    from safetensors import safe_open

    path = Path(directory) / FILE_NAME
    if not path.is_file():
        raise ArtifactError(f"no q4 artifact in {directory}: {FILE_NAME} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "qcompile" not in metadata:
                raise ArtifactError(f"{path} is a safetensors file but not a q4 artifact (no qcompile manifest)")
            manifest = json.loads(metadata["qcompile"])
            version = manifest.get("format_version")
            if version != FORMAT_VERSION:
                raise ArtifactError(
                    f"{path} has artifact format version {version}; this qcompile ({qcompile.__version__}) "
                    f"reads version {FORMAT_VERSION}: quantize the model again"
                )
            blobs = {}
            for digest in f.keys():
                t = f.get_tensor(digest)
                if tensor_hash(t) != digest:
                    raise ArtifactError(f"{path} is corrupted: tensor {digest[:12]}... does not match its hash")
                blobs[digest] = t
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors and json report truncation in many ways
        raise ArtifactError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
    return SavedArtifact(path, manifest, blobs)


_READ_CACHE: dict[tuple, SavedArtifact] = {}


def read_cached(directory: str | Path) -> SavedArtifact:
    """`read`, once per version of the file (size, modification time): the backend reads the
    artifact for every graph it compiles."""
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return read(directory)  # the error
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _READ_CACHE:
        loaded = read(directory)
        _READ_CACHE.clear()  # keep one: it holds a model's quantized weights
        _READ_CACHE[key] = loaded
    return _READ_CACHE[key]
