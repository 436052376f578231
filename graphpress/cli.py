"""The ``graphpress`` command line.

::

    graphpress demo [--model NAME] [--verify | --no-verify] [-o DIR] [--epochs N] [--quiet]
    graphpress compile (MODULE:FACTORY | --hf PATH | --hf-config JSON --hf-class CLASS)
                       [--inputs SPEC] [--passes PIPELINE] [--backend eager]
                       [--frontend export] [--verify] [--seed N] [-o DIR] [--report HTML]
                       [--quiet]
    graphpress report DIR [-o HTML]
    graphpress passes

``demo`` runs the whole job on the zoo's trained ``digits_cnn`` (or ``--model NAME``, one of
:data:`graphpress.demo.DEMO_MODELS`; see :mod:`graphpress.demo`):
:data:`DEMO_PIPELINE` with a fine-tune after pruning, a before/after table and an HTML report.
``compile`` (default pipeline :data:`COMPILE_PIPELINE`) imports ``MODULE`` (the current
directory is on the import path), calls ``FACTORY()`` for the model, or for
``(model, example_inputs)``, and compiles it; or builds a Hugging Face ``transformers`` model
from a local folder (``--hf``: config and weights, nothing downloaded) or from a config JSON
with random weights (``--hf-config``, ``--hf-class``), with inputs made from its config unless
``--inputs`` is given. It writes the HTML report (``DIR/report.html`` with ``-o``, else
``--report``, default ``graphpress-report.html``). ``report`` rebuilds the HTML report of a
saved folder. ``passes`` lists every registered pass, plugins included.

Long steps show progress bars on stderr when it is a terminal (never on stdout, whose lines
stay parseable); ``--quiet`` or ``GRAPHPRESS_PROGRESS=0`` turns them off
(:mod:`graphpress.ir.progress`).

Errors graphpress raises on purpose (:class:`~graphpress.errors.GraphpressError`) and bad
command-line input print one line ``graphpress: error: ...`` to stderr and exit with status 2;
with ``GRAPHPRESS_DEBUG`` set (and not ``0``), the traceback is printed too.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils import _pytree as pytree

import graphpress as gp
from graphpress.api import rebuild_report
from graphpress.demo import (
    DEMO_MODEL,
    DEMO_MODELS,
    PRUNE_PIPELINE,
    QUANT_PIPELINE,
    demo_recipe,
    run_demo,
)
from graphpress.errors import GraphpressError
from graphpress.frontends import FRONTENDS
from graphpress.ir.progress import progress_mode
from graphpress.numerics import compare_outputs
from graphpress.pipeline.registry import available_passes

__all__ = ["COMPILE_PIPELINE", "DEMO_MODEL", "DEMO_PIPELINE", "DEFAULT_REPORT", "UsageError",
           "main", "parse_inputs"]

# Every built-in pass that applies to any model; a new generic pass is added here.
COMPILE_PIPELINE = "fold_bn, fixpoint(dce, cse, fold_constants)"
# the demo's two compiles (a fine-tune runs between them), then the ONNX backend
DEMO_PIPELINE = f"{PRUNE_PIPELINE}, {QUANT_PIPELINE}"
DEFAULT_REPORT = "graphpress-report.html"
_HF_SEQUENCE = 16  # tokens of the generated input_ids of a Hugging Face text model
_INT_HIGH = 100  # integer example inputs are drawn from [0, _INT_HIGH)
_INPUTS_HELP = ('comma-separated shapes, each with an optional dtype: "2x3x32x32" or '
                '"2x3x32x32:float32,2x8:int64" (seeded random tensors; integer dtypes get '
                f"values in [0, {_INT_HIGH}))")


class UsageError(GraphpressError):
    """Bad command-line input: arguments, MODULE:FACTORY, an --inputs spec."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become a UsageError (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------ inputs
def _dtype(name: str, item: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"unknown dtype {name!r} in --inputs entry {item!r}; use a torch dtype "
                         "name such as float32, float16, bfloat16, int64, int32, bool")
    return dtype


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                   generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randint(0, _INT_HIGH, shape, generator=generator, dtype=dtype)


def parse_inputs(spec: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random example inputs from a spec such as ``"2x3x32x32:float32,2x8:int64"``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for item in spec.split(","):
        item = item.strip()
        shape_text, _, dtype_name = item.partition(":")
        dims = shape_text.split("x")
        if not all(d.isdecimal() and int(d) > 0 for d in dims):
            raise UsageError(f"bad --inputs entry {item!r}: write positive sizes joined by 'x' "
                             "with an optional ':dtype', e.g. 2x3x32x32 or 2x8:int64")
        dtype = _dtype(dtype_name, item) if dtype_name else torch.float32
        tensors.append(_random_tensor(tuple(int(d) for d in dims), dtype, generator))
    return tuple(tensors)


def _describe_inputs(inputs: Any) -> str:
    def one(leaf: Any) -> str:
        if not isinstance(leaf, torch.Tensor):
            return repr(leaf)
        shape = "x".join(map(str, leaf.shape)) or "scalar"
        return f"{shape}:{str(leaf.dtype).removeprefix('torch.')}"
    return ", ".join(one(leaf) for leaf in pytree.tree_leaves(inputs))


# ----------------------------------------------------------------------------------- factory
def _load_factory(target: str) -> Callable[[], Any]:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"expected MODULE:FACTORY (e.g. mymodels:make_model), got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import module {module_name!r} ({exc}); run graphpress from "
                         "the folder that contains it, or install it") from exc
    except Exception as exc:
        raise UsageError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target} is a {type(obj).__name__}, not a callable factory")
    return obj


def _build(target: str) -> tuple[torch.nn.Module, Any]:
    """Call the factory; return ``(model in eval mode, its example inputs or None)``."""
    factory = _load_factory(target)
    try:
        made = factory()
    except Exception as exc:
        raise UsageError(f"{target}() raised {type(exc).__name__}: {exc}") from exc
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{target}() must return an nn.Module or (model, example_inputs); "
                         f"got {type(made).__name__}")
    return model.eval(), inputs


# ---------------------------------------------------------------------------------- commands
def _summary(compiled: gp.CompiledModel, model: torch.nn.Module, inputs: Any) -> str:
    """One line comparing the compiled model's outputs with the original's."""
    args = inputs if isinstance(inputs, tuple | list) else (inputs,)
    with torch.no_grad():
        found = compare_outputs(compiled(*args), model(*args), rtol=0.0, atol=0.0)
    records = compiled.report().records
    nodes = f"; nodes {records[0].nodes[0]} -> {records[-1].nodes[1]}" if records else ""
    error = found.problem or f"max abs error {found.max_abs_error:.2e}"
    return f"compiled vs original output: {error}{nodes}"


def _run_demo(args: argparse.Namespace) -> int:
    demo_recipe(args.model)  # an unknown model fails before anything runs
    run_demo(args.model, verify=args.verify, output=args.output, epochs=args.epochs,
             progress=False if args.quiet else None)
    return 0


# ------------------------------------------------------------------------------ hugging face
def _hf_inputs(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, ...]:
    """Example inputs from a Hugging Face model's config: token ids or an image batch."""
    config, name = model.config, getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(seed)
    if name == "input_ids" and getattr(config, "vocab_size", None):
        return (torch.randint(0, config.vocab_size, (1, _HF_SEQUENCE), generator=generator),)
    if name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size
        size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        channels = getattr(config, "num_channels", 3)
        return (torch.randn((1, channels, *size), generator=generator),)
    raise UsageError(f"cannot make example inputs for {type(model).__name__} (main input "
                     f"{name!r}); give --inputs SPEC")


def _hf_class(name: str | None, default: str) -> Any:
    import transformers

    cls = getattr(transformers, name or default, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module | transformers.AutoModel)):
        raise UsageError(f"--hf-class {name!r} is not a transformers model class; use one such "
                         "as LlamaForCausalLM, BertModel or ViTForImageClassification")
    return cls


def _build_hf(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A model from a local folder (--hf) or a config JSON with random weights (--hf-config)."""
    try:
        import transformers
    except ImportError:
        raise UsageError("--hf and --hf-config need the transformers package "
                         "(pip install transformers)") from None
    if args.hf:
        folder = Path(args.hf)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--hf takes a local folder with config.json and weights (nothing "
                             f"is downloaded); {folder} has no config.json")
        try:
            model = _hf_class(args.hf_class, "AutoModel").from_pretrained(
                folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load a model from {folder}: {_one_line(exc)}") from None
    else:
        if not args.hf_class:
            raise UsageError("--hf-config needs --hf-class, e.g. --hf-class LlamaForCausalLM")
        path = Path(args.hf_config)
        try:
            data = json.loads(path.read_text())
            config = transformers.AutoConfig.for_model(**data)
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot read a transformers config from {path}: "
                             f"{_one_line(exc)} (it needs a \"model_type\" entry)") from None
        torch.manual_seed(args.seed)
        model = _hf_class(args.hf_class, "")(config)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache outputs in the traced graph
    return model.eval(), _hf_inputs(model, args.seed)


def _run_compile(args: argparse.Namespace) -> int:
    sources = sum(x is not None for x in (args.target, args.hf, args.hf_config))
    if sources != 1:
        raise UsageError("give exactly one model: MODULE:FACTORY, --hf FOLDER or "
                         "--hf-config JSON --hf-class CLASS")
    if args.target is not None:
        model, inputs = _build(args.target)
        name = args.target
    else:
        model, inputs = _build_hf(args)
        name = f"{type(model).__name__} from {args.hf or args.hf_config}"
    if args.inputs is not None:
        inputs = parse_inputs(args.inputs, args.seed)
    elif inputs is None:
        raise UsageError(f"{args.target}() returned only a model; give --inputs SPEC "
                         "(e.g. --inputs 2x3x32x32) or return (model, example_inputs)")
    print(f"compiling {name} on inputs {_describe_inputs(inputs)}")
    if args.backend == "triton" and not torch.cuda.is_available() and "triton" not in sys.modules:
        # CPU tensors run in Triton's interpreter, which triton reads when first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    compiled = gp.compile(model, inputs, passes=args.passes, backend=args.backend,
                          frontend=args.frontend, verify=args.verify)
    print(compiled.report())
    print(_summary(compiled, model, inputs))
    if args.output:
        print(f"saved to {compiled.save(args.output)}")
        report = Path(args.output) / "report.html"
        if args.report:
            report = compiled.report().save_html(args.report)
    else:
        report = compiled.report().save_html(args.report or DEFAULT_REPORT)
    print(f"report: {report}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    print(f"report: {rebuild_report(args.folder, args.output)}")
    return 0


def _first_line(cls: type) -> str:
    doc = inspect.getdoc(cls)
    return doc.strip().splitlines()[0] if doc else "(no description)"


def _run_passes(args: argparse.Namespace) -> int:
    passes = available_passes()
    width = max(map(len, passes), default=0)
    for name, cls in passes.items():
        origin = "" if cls.__module__.split(".")[0] == "graphpress" else (
            f" [plugin: {cls.__module__}]")
        print(f"{name.ljust(width)}  {_first_line(cls)}{origin}")
        params = [p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                  for p in inspect.signature(cls).parameters.values()]
        if params:
            print(f"{' ' * width}  arguments: {', '.join(params)}")
        print(f"{' ' * width}  contract: {cls.contract}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphpress", description=(
        "Compile PyTorch models through verified graph passes."))
    parser.add_argument("--version", action="version", version=f"graphpress {gp.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="the whole job on a trained model: table and HTML report",
        description=f"Train (seconds) the digits CNN, compile it through {PRUNE_PIPELINE}, "
                    f"fine-tune, then {QUANT_PIPELINE} and ONNX; print accuracy, size and "
                    "latency before and after, and write the HTML report.")
    demo.add_argument("--model", default=DEMO_MODEL, metavar="NAME",
                      help=f"one of {', '.join(DEMO_MODELS)} (default: {DEMO_MODEL}; the "
                           "others are not fine-tuned and are compared by output cosine)")
    demo.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                      help="check every pass's numerical contract (default: on)")
    demo.add_argument("-o", "--output", default="graphpress-demo", metavar="DIR",
                      help="folder for report.html, the saved model and the ONNX file "
                           "(default: graphpress-demo)")
    demo.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default: 3)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_run_demo)

    compile_ = commands.add_parser(
        "compile", help="compile your model: MODULE:FACTORY or a Hugging Face model",
        description="Import MODULE, call FACTORY() for a model (put in eval mode) or "
                    "(model, example_inputs); or build a transformers model from a local "
                    "folder (--hf) or a config JSON (--hf-config, --hf-class; random "
                    "weights). Compile it, print the report and write the HTML report.")
    compile_.add_argument("target", metavar="MODULE:FACTORY", nargs="?")
    compile_.add_argument("--hf", metavar="FOLDER",
                          help="a local Hugging Face model folder (config.json + weights)")
    compile_.add_argument("--hf-config", metavar="JSON",
                          help="a transformers config JSON (with model_type); random weights")
    compile_.add_argument("--hf-class", metavar="CLASS",
                          help="transformers class, e.g. LlamaForCausalLM (default with --hf: "
                               "AutoModel)")
    compile_.add_argument("--inputs", metavar="SPEC",
                          help=_INPUTS_HELP + "; overrides inputs the factory returns")
    compile_.add_argument("--seed", type=int, default=0, help="seed of the --inputs tensors")
    compile_.add_argument("--passes", default=COMPILE_PIPELINE, metavar="PIPELINE",
                          help=f"pass pipeline (default: {COMPILE_PIPELINE!r})")
    compile_.add_argument("--backend", default="eager")
    compile_.add_argument("--frontend", default="export", choices=FRONTENDS)
    compile_.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                          help="check every pass's numerical contract (default: off)")
    compile_.add_argument("-o", "--output", metavar="DIR", help="save the compiled model here")
    compile_.add_argument("--report", metavar="HTML",
                          help=f"HTML report path (default: DIR/report.html with -o, else "
                               f"{DEFAULT_REPORT})")
    compile_.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    compile_.set_defaults(handler=_run_compile)

    report = commands.add_parser("report", help="rebuild the HTML report of a saved folder",
                                 description="Rebuild the HTML report of a folder written by "
                                             "CompiledModel.save (graphpress compile -o).")
    report.add_argument("folder", metavar="DIR")
    report.add_argument("-o", "--output", metavar="HTML",
                        help="where to write it (default: DIR/report.html)")
    report.set_defaults(handler=_run_report)

    passes = commands.add_parser("passes", help="list registered passes, plugins included")
    passes.set_defaults(handler=_run_passes)
    return parser


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 error)."""
    try:
        args = _parser().parse_args(argv)
        with progress_mode(False if getattr(args, "quiet", False) else None):
            return args.handler(args)
    except GraphpressError as exc:
        if os.environ.get("GRAPHPRESS_DEBUG", "0") != "0":
            traceback.print_exc()
        print(f"graphpress: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
