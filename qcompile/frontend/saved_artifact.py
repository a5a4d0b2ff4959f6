"""The saved artifact's file format: what `qcompile.quantize(...).save(dir)` writes and the
backend reads back (`options={"artifact": dir}`) instead of calibrating.

An artifact directory holds what the pipeline needs that only calibration or an expensive step
can give, and what makes a load bit-exact on any machine:

- the calibration statistics of every linear's input, by the linear's weight name (per-channel
  ranges and the token samples the passes measure errors on; not GPTQ's Gram matrices),
- the results of the expensive steps (`qcompile.core.memo`): GPTQ's rounded weights and steps, the
  searched clipping ratios and migration scales, each keyed by step, linear and non-tensor
  arguments, with a fingerprint of the tensors it was computed from (checked within a tolerance),
- the constants of the final graphs that the pipeline computed (packed weights, steps, group
  multipliers, activation steps, folded norm weights, rotations, ...), by constant name; the
  names come from the linear's weight or module, so a graph compiled later (a decode step,
  another length) finds its own,
- the pipeline string and recipe, the qcompile and torch versions, a hash of every parameter
  the quantized graphs read (and of the whole model).

Loading replays the pipeline (`qcompile.backends.q4`), and the cheap float steps it runs again
may give other last bits on another machine (another thread count, torch version or CPU kind).
So a memo lookup compares fingerprints within a tolerance rather than exact bytes, and after the
passes every constant the pipeline computed is compared with the saved one (same name; failing
that, any saved constant of its dtype and shape) within `qcompile.core.memo.tolerance` of its
dtype (for integer constants, such as codes, the share of elements that may differ), then
replaced by the saved bytes: the loaded graph is the saved one, constant for constant. A
difference beyond the tolerance is an `ArtifactError` naming the step or the constant: another
model or pipeline, never a wrong model and never a silent recomputation.

`q4.safetensors`: its metadata holds the manifest (JSON under the key "qcompile"); its tensors
are stored once per distinct content (q, k and v read the same activation: its samples are
stored once; a packed weight constant is GPTQ's result), named by the sha256 of that content,
which reading checks. Beside it, `compiled.bin`, the compiled-kernels cache: torch.compiler's
cache artifacts of the quantizing process (`torch.compiler.save_cache_artifacts`: Inductor's
generated and compiled kernels).
Another format version (version 1 keyed results by the exact bytes of their inputs, and is
refused), or a truncated or corrupted file each raise `ArtifactError` saying which, before any
weight is used.

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
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

import qcompile
from qcompile.algorithms.channel_stats import ChannelStats
from qcompile.core import ir
from qcompile.core.memo import Entry, Fingerprint, Memo, tensor_hash, tolerance
from qcompile.core.memory import ConstantPool
from qcompile.frontend.calibrate import observed_linears, weight_node

__all__ = ["ArtifactError", "Replay", "SavedArtifact", "save", "read", "read_cached", "FORMAT_VERSION",
           "FILE_NAME", "graph_constants", "computed_constants"]

# 2: results keyed by step, linear and arguments with fingerprints of their inputs; the final
# graphs' computed constants (1: results keyed by the exact bytes of their inputs)
FORMAT_VERSION = 2
FILE_NAME = "q4.safetensors"
# the compiled-kernels cache: torch.compiler's cache artifacts (Inductor's kernels) of the quantizing process
KERNEL_CACHE_FILE_NAME = "compiled.bin"
_STATS_FIELDS = ("absmax", "robust", "samples")
_OPTIONAL_STATS_FIELDS = ("sinks", "rest_absmax")  # absent from artifacts saved before they existed


class ArtifactError(ValueError):
    """A saved artifact cannot be used: another model or pipeline, another format version, or a
    truncated or corrupted file (the message says which)."""


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
    """What compiling one graph needed from calibration and from expensive steps, and what it
    made: calibration statistics by weight name, the memo of expensive results, the parameters
    it froze, and the constants the pipeline computed (set after the passes)."""

    stats: dict[str, ChannelStats]
    memo: Memo
    parameters: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def collect(cls, frozen: fx.GraphModule, memo: Memo) -> Replay:
        """From a frozen, calibrated graph, before the passes run."""
        stats, parameters = {}, {}
        for n in frozen.graph.nodes:
            if n.op == "get_attr" and ir.FQN in n.meta:
                parameters[n.meta[ir.FQN]] = ir.get_constant(frozen, n)
            w = weight_node(frozen, n) if n.op == "call_function" and ir.CALIB in n.meta else None
            if w is not None and ir.FQN in getattr(w, "meta", {}):  # a linear's or a grouped expert GEMM's
                stats[w.meta[ir.FQN]] = n.meta[ir.CALIB]
        return cls(stats, memo, parameters)


def graph_constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the graph's `get_attr` nodes read, by name."""
    constants = {}
    for n in gm.graph.nodes:
        t = ir.get_constant(gm, n)
        if t is not None:
            constants[n.target] = t
    return constants


def computed_constants(gm: fx.GraphModule, before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The constants of `gm` (after the passes) that the pipeline computed: all but the tensors
    the graph held `before` them (the frozen parameters, which the artifact checks by hash)."""
    frozen = {id(t) for t in before.values()}  # `before` keeps them alive: no id is reused
    return {name: t for name, t in graph_constants(gm).items() if id(t) not in frozen}


def _distance(replayed: torch.Tensor, saved: torch.Tensor) -> tuple[float, str]:
    """How far a replayed constant is from a saved one, in units of the tolerance (at most 1:
    the same value computed on another machine), and in words."""
    if replayed.dtype != saved.dtype or replayed.shape != saved.shape:
        return math.inf, (f"it is {replayed.dtype} {list(replayed.shape)}, saved {saved.dtype} "
                          f"{list(saved.shape)}")
    a, b = replayed.detach().to("cpu"), saved
    if not saved.numel():
        return 0.0, "equal"
    rtol = tolerance(saved.dtype)
    if not saved.dtype.is_floating_point:  # codes, multipliers: a share of them may round the other way
        differing, allowed = int((a != b).sum()), int(saved.numel() * rtol)
        distance = 0.0 if not differing else differing / allowed if allowed else math.inf
        return distance, f"{differing} of its {saved.numel()} elements differ (at most {allowed} may)"
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    # relative to each element, and to the tensor's mean magnitude for elements near zero
    ratio = ((a - b).abs() / (rtol * (b.abs() + b.abs().mean()))).nan_to_num(nan=math.inf).masked_fill(same, 0)
    distance = float(ratio.max())
    worst = int(ratio.argmax())
    return distance, (f"element {worst} is {a.reshape(-1)[worst].item():.9g}, saved {b.reshape(-1)[worst].item():.9g} "
                      f"({distance:.3g} times the tolerance {rtol:.2g} relative)")


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

    stats, memo, parameters, constants = {}, {}, {}, {}
    for replay in replays:
        for fqn, s in replay.stats.items():
            stats[fqn] = {"num_tokens": s.num_tokens, **{f: blob(getattr(s, f)) for f in _STATS_FIELDS},
                          **{f: blob(getattr(s, f)) for f in _OPTIONAL_STATS_FIELDS if getattr(s, f) is not None}}
        for key, entries in replay.memo.entries.items():  # the graphs of a model share one memo
            memo[key] = [{"inputs": [f.to_json() for f in e.inputs], "result": [blob(v) for v in e.result]}
                         for e in entries]
        for fqn, t in replay.parameters.items():
            parameters[fqn] = tensor_hash(t)
        for name, t in replay.constants.items():  # a name has one value in every graph, but keep any other
            digests = constants.setdefault(name, [])
            if (digest := blob(t)) not in digests:
                digests.append(digest)
    manifest = {
        "format_version": FORMAT_VERSION,
        "qcompile_version": qcompile.__version__,
        "torch_version": torch.__version__,
        **info,
        "parameters": parameters,
        "stats": stats,
        "memo": memo,
        "constants": constants,
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
    # shared by the memos of every graph loaded from it: a recompile reads the earlier graphs' constants
    constants: ConstantPool = dataclasses.field(default_factory=ConstantPool)

    @property
    def pipeline(self) -> str:
        return self.manifest["pipeline"]

    def stats(self) -> dict[str, ChannelStats]:
        def loaded(entry: dict) -> ChannelStats:
            fields = {f: self.blobs[entry[f]] for f in (*_STATS_FIELDS, *_OPTIONAL_STATS_FIELDS) if f in entry}
            # the saved `samples` are the rows as the statistics had them: observed, for the pipeline to derive from
            return ChannelStats(observed_samples=fields.pop("samples"), **fields, num_tokens=entry["num_tokens"])

        return {fqn: loaded(entry) for fqn, entry in self.manifest["stats"].items()}

    def memo(self) -> Memo:
        """The saved results, strict: a step without one (or whose inputs differ beyond the
        tolerance) is an error, never recomputed."""
        memo = Memo({key: [Entry(tuple(Fingerprint.from_json(f) for f in e["inputs"]),
                                 tuple(self.blobs[d] for d in e["result"])) for e in entries]
                     for key, entries in self.manifest["memo"].items()}, strict=True)
        memo.constants = self.constants
        return memo

    def restore_constants(self, gm: fx.GraphModule, computed: Mapping[str, torch.Tensor]) -> None:
        """Put the saved bytes in place of every constant the replayed pipeline `computed`, each
        checked first against the saved one of its name (or, for a name no saved graph had, any
        saved constant of its dtype and shape) within the tolerance: the graph is then the saved
        one to the bit, whatever this machine's float arithmetic gave. No match is an ArtifactError."""
        named = self.manifest["constants"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for digests in named.values():
            for d in digests:
                by_shape.setdefault((self.blobs[d].dtype, tuple(self.blobs[d].shape)), []).append(self.blobs[d])
        for name, t in computed.items():
            candidates = [self.blobs[d] for d in named.get(name, ())]
            (distance, why), best = min(((_distance(t, c), c) for c in candidates), key=lambda x: x[0][0],
                                        default=((math.inf, "no saved constant has its name"), None))
            if distance > 1:  # a graph that names it otherwise (node names differ): by content
                others = by_shape.get((t.dtype, tuple(t.shape)), [])
                distance, best = min(((_distance(t, c)[0], c) for c in others), key=lambda x: x[0],
                                     default=(math.inf, None))
            if distance > 1:
                raise ArtifactError(
                    f"artifact {self.path} does not match this model or pipeline: the quantized graph's constant "
                    f"{name!r} is not the saved one ({why}): quantize again here"
                )
            module, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(module), attr, best.to(t.device))

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
            weight = weight_node(frozen, n)
            fqn = weight.meta.get(ir.FQN)
            if fqn in stats:
                n.meta[ir.CALIB] = stats[fqn]
                if (value := ir.get_constant(frozen, weight)) is not None:
                    stats[fqn].move_to(value.device)  # read onto the CPU; the model may be on a GPU


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
            missing = set(_referenced(manifest)) - blobs.keys()
            if missing:
                raise ArtifactError(f"{path} is corrupted: its manifest names {len(missing)} tensors it does not hold")
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors and json report truncation in many ways
        raise ArtifactError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
    return SavedArtifact(path, manifest, blobs)


def _referenced(manifest: dict) -> Iterable[str]:
    """The digests of every tensor the manifest names."""
    for entry in manifest["stats"].values():
        yield from (entry[f] for f in (*_STATS_FIELDS, *_OPTIONAL_STATS_FIELDS) if f in entry)
    for entries in manifest["memo"].values():
        for e in entries:
            yield from e["result"]
    for digests in manifest["constants"].values():
        yield from digests


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
