"""Quantize once, save, load without calibrating: the q4 artifact.

    qmodel = qcompile.quantize(model, calibration=batches, recipe="w4a4")   # calibrate + passes
    qmodel(**batches[0])                                                     # runs quantized
    qmodel.save("smollm2-w4a4")
    ...                                                                      # a new process:
    qmodel = qcompile.load(model, "smollm2-w4a4")                            # no calibration
    # or: torch.compile(model, backend="q4", options={"artifact": "smollm2-w4a4"})

An artifact holds what the pipeline needs that only calibration or an expensive step can give:

- the calibration statistics of every linear's input, by the linear's weight name (per-channel
  ranges and the token samples the passes measure errors on; not GPTQ's Gram matrices),
- the results of the expensive steps (`qcompile.core.memo`): GPTQ's rounded weights and steps, the
  searched clipping ratios and migration scales,
- the pipeline string and recipe, the qcompile and torch versions, a hash of every parameter
  the quantized graphs read (and of the whole model).

Loading compiles the model as the backend always does (capture, normalize, freeze), attaches
the saved statistics instead of calibrating, and runs the same pipeline with the saved results
given back, so the expensive steps are looked up, not computed: the quantized graph is the one
that was saved, constant for constant, and the model computes the same logits to the bit.
Because nothing is tied to one captured graph, a loaded model serves any call Dynamo captures
(another sequence length, a decode step, a graph break) as the original did.

The directory holds `q4.safetensors`: its metadata holds the manifest (JSON under the key
"qcompile"); its tensors are stored once per distinct content (q, k and v read the same
activation: its samples are stored once), named by the sha256 of that content, which loading
checks. Beside it, `compiled.bin`: torch.compiler's cache artifacts of the quantizing process
(`torch.compiler.save_cache_artifacts`: Inductor's generated and compiled kernels), handed to
`torch.compiler.load_cache_artifacts` on load so the same graphs need not be compiled again; on
another torch or machine its entries just do not match and Inductor compiles (it is optional:
without the file, loading compiles). A different model, another format version, or a truncated
or corrupted file each raise `ArtifactError` saying which, before any weight is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import fx

import qcompile
from qcompile.core import ir
from qcompile.frontend.calibrate import ChannelStats
from qcompile.core.memo import Memo, tensor_hash

__all__ = ["ArtifactError", "QuantizedModel", "quantize", "load", "FORMAT_VERSION", "FILE_NAME"]

FORMAT_VERSION = 1
FILE_NAME = "q4.safetensors"
# torch.compiler's cache artifacts (Inductor's compiled kernels) of the quantizing process
COMPILED_FILE_NAME = "compiled.bin"
_STATS_FIELDS = ("absmax", "robust", "samples")


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


def save_artifact(directory: str | Path, replays: list[Replay], info: Mapping[str, Any],
                  compiled: bytes | None = None) -> Path:
    """Write the replays of every graph, merged, with `info` (recipe, pipeline, model hash), and
    `compiled`: torch's compile caches (`torch.compiler.save_cache_artifacts`) if given."""
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
            stats[fqn] = {"num_tokens": s.num_tokens, **{f: blob(getattr(s, f)) for f in _STATS_FIELDS}}
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
    if compiled:
        (directory / COMPILED_FILE_NAME).write_bytes(compiled)
        manifest["compiled"] = {"file": COMPILED_FILE_NAME, "sha256": hashlib.sha256(compiled).hexdigest()}
    else:
        (directory / COMPILED_FILE_NAME).unlink(missing_ok=True)
    path = directory / FILE_NAME
    partial = directory / (FILE_NAME + ".partial")  # never half a file under the real name
    save_file(blobs, str(partial), metadata={"qcompile": json.dumps(manifest)})
    partial.replace(path)
    return path


@dataclasses.dataclass
class Saved:
    """An artifact as read and checked: its manifest and tensors by content hash."""

    path: Path
    manifest: dict
    blobs: dict[str, torch.Tensor]
    compiled_loaded: bool = False

    @property
    def pipeline(self) -> str:
        return self.manifest["pipeline"]

    def stats(self) -> dict[str, ChannelStats]:
        return {
            fqn: ChannelStats(**{f: self.blobs[entry[f]] for f in _STATS_FIELDS}, num_tokens=entry["num_tokens"])
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

    def warm_compile_caches(self) -> None:
        """Give torch.compiler the quantizing process's compile caches (once per process), so
        that Inductor finds the kernels it would otherwise generate and compile again. A cache
        entry for another torch, device or graph simply does not match and is compiled anew."""
        entry = self.manifest.get("compiled")
        if entry is None or self.compiled_loaded:
            return
        self.compiled_loaded = True
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
        from qcompile.frontend.calibrate import observed_linears

        stats = self.stats()
        for n in observed_linears(frozen):
            fqn = n.args[1].meta.get(ir.FQN)
            if fqn in stats:
                n.meta[ir.CALIB] = stats[fqn]


def read(directory: str | Path) -> Saved:
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
    return Saved(path, manifest, blobs)


_READ_CACHE: dict[tuple, Saved] = {}


def read_cached(directory: str | Path) -> Saved:
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


# --- the user-facing API -----------------------------------------------------------------------


class QuantizedModel:
    """A model compiled by the q4 backend: call it like the model; `save(dir)` writes the
    artifact. `artifacts` are the backend's compiled graphs (`Q4Artifact`, for reports),
    `seconds` how long quantizing (or loading) took, the first call included."""

    def __init__(self, model: torch.nn.Module, compiled: Callable, graphs: list, info: dict, seconds: float):
        self.model = model
        self.compiled = compiled
        self.artifacts = graphs
        self.info = info
        self.seconds = seconds

    @property
    def pipeline(self) -> str:
        return self.info["pipeline"]

    @property
    def recipe(self) -> str:
        return self.info["recipe"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write the artifact to `directory` (created if needed); returns the file written."""
        replays = [a.replay for a in self.artifacts if a.replay is not None]
        if not replays:
            raise ValueError("nothing to save: this model was not quantized by qcompile.quantize "
                             "(a loaded model's artifact is the directory it came from)")
        saved = torch.compiler.save_cache_artifacts()
        return save_artifact(directory, replays, self.info, saved[0] if saved else None)


def _call(compiled: Callable, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return compiled(**batch)
    if isinstance(batch, (tuple, list)):
        return compiled(*batch)
    return compiled(batch)


def _compile_and_run(model: torch.nn.Module, options: dict, example: Any) -> tuple[Callable, list, float]:
    from qcompile.backends import q4

    before = {id(a) for a in q4.artifacts()}
    start = time.perf_counter()
    compiled = torch.compile(model, backend="q4", options=options)
    with torch.no_grad():
        _call(compiled, example)
    seconds = time.perf_counter() - start
    return compiled, [a for a in q4.artifacts() if id(a) not in before], seconds


def quantize(model: torch.nn.Module, calibration: list, recipe: str | None = None,
             example_inputs: Any = None, **options: Any) -> QuantizedModel:
    """Compile `model` with the q4 backend, calibrating on `calibration` (a list of batches:
    dicts of keyword arguments or tuples of positional ones), and run it once on
    `example_inputs` (default: the first batch) so that it is compiled. `options` are the
    backend's (`pipeline`, `disable`, `progress`, ...). The model is not modified."""
    from qcompile.core.recipes import DEFAULT_RECIPE

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise ValueError("calibration must be a non-empty list of batches (dicts of keyword arguments "
                         "or tuples of positional arguments)")
    if "artifact" in options:
        raise TypeError("quantize() makes the artifact; qcompile.load() runs a saved one")
    recipe = recipe or DEFAULT_RECIPE
    compiled, graphs, seconds = _compile_and_run(
        model, {**options, "recipe": recipe, "calibration": list(calibration)},
        calibration[0] if example_inputs is None else example_inputs)
    if not graphs:
        raise RuntimeError("quantize(): the q4 backend compiled no graph (was the model compiled already?)")
    info = {"recipe": recipe, "pipeline": graphs[0].pipeline, "model_hash": parameter_hash(model)}
    return QuantizedModel(model, compiled, graphs, info, seconds)


def load(model: torch.nn.Module, directory: str | Path, example_inputs: Any = None,
         **options: Any) -> QuantizedModel:
    """`model` quantized as saved in `directory`, ready to run, with no calibration.

    `model` must be the model that was quantized (its parameters are checked by hash). With
    `example_inputs` the first call happens here (and `seconds` counts it); otherwise at the
    model's first call. `options` are the backend's (printing, `lower`, `kernels`, ...)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load() expects a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    saved = read_cached(directory)  # format, truncation and corruption errors come first
    expected, actual = saved.manifest.get("model_hash"), parameter_hash(model)
    if actual != expected:
        raise ArtifactError(
            f"artifact {saved.path} was saved for a different model: the parameter hash differs "
            f"(saved {str(expected)[:12]}..., this model {actual[:12]}...)"
        )
    info = {k: saved.manifest[k] for k in ("recipe", "pipeline", "model_hash")}
    options = {**options, "artifact": str(directory)}
    if example_inputs is None:
        compiled = torch.compile(model, backend="q4", options=options)
        return QuantizedModel(model, compiled, [], info, time.perf_counter() - start)
    compiled, graphs, seconds = _compile_and_run(model, options, example_inputs)
    return QuantizedModel(model, compiled, graphs, info, time.perf_counter() - start)


# --- qcompile quantize -------------------------------------------------------------------------


def load_example(model: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): "smollm2" is the shipped SmolLM2-135M; anything else a local folder
    that transformers' AutoModelForCausalLM loads (nothing is downloaded)."""
    from qcompile.tools import zoo

    return zoo.load_smollm2() if model == "smollm2" else zoo.load_causal_lm(model)


def main(argv: list[str] | None = None) -> None:
    """`qcompile quantize`: calibrate on Emma, run the recipe, save the artifact, print a summary."""
    import argparse

    from tabulate import tabulate

    from qcompile.tools import zoo
    from qcompile.core.recipes import DEFAULT_RECIPE, RECIPES

    parser = argparse.ArgumentParser(
        prog="qcompile quantize",
        description="Quantize a causal LM (the shipped SmolLM2-135M or a local Hugging Face folder) and "
                    "save the artifact that qcompile.load(model, DIR) runs without calibration.")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (shipped) or a local model folder")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES))
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of Emma to calibrate on")
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration batch")
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"), help="lowering of the first call")
    parser.add_argument("--out", required=True, help="directory to write the artifact to")
    args = parser.parse_args(argv)
    if args.calibration_tokens < 1 or args.window < 1:
        parser.error("--calibration-tokens and --window must be positive")

    try:
        model, tokenizer = load_example(args.model)
    except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
        parser.error(str(e))
    calibration = [{"input_ids": ids, "use_cache": False}
                   for ids in zoo.token_windows(tokenizer, "emma", args.calibration_tokens, args.window)]
    qmodel = quantize(model, calibration, recipe=args.recipe, lower=args.lower)
    path = qmodel.save(args.out)
    graphs = qmodel.artifacts
    rows = [
        ["model", args.model],
        ["recipe", qmodel.recipe],
        ["calibration", f"{sum(b['input_ids'].numel() for b in calibration)} tokens of Emma "
                        f"in {len(calibration)} batches"],
        ["graphs compiled", len(graphs)],
        ["quantized weight bytes", f"{sum(g.quantized_weight_bytes() for g in graphs):,}"],
        ["quantize seconds (first call included)", f"{qmodel.seconds:.1f}"],
        ["artifact", f"{path} ({path.stat().st_size:,} bytes)"],
    ]
    print(tabulate(rows, tablefmt="plain"))
    print(f"pipeline: {qmodel.pipeline}")
    print(f"load it: qcompile.load(model, {str(args.out)!r})  (no calibration)")
