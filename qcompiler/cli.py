"""The ``qcompiler`` command line.

Exit codes are a contract: 0 success, 2 user error (one line on stderr naming the file and
the node/key/input at fault, no traceback unless ``-v``), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
import traceback
from collections.abc import Sequence
from pathlib import Path

from .calibration.options import METHODS, OBSERVE, STATISTICS, CalibrationOptions
from .errors import PassFailure, Terminated, UserError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompiler", description="Compile ONNX models into quantized ONNX models "
                                "for a hardware target described as data.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("compile", help="compile a model")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--target", default="ort-cpu", help="built-in target name or path to a .toml file")
    c.add_argument("--calibration", help=".npz (samples stacked on axis 0), .npy, a directory of .npz or of images "
                   "(see --image-spec), or random:N (smoke tests only)")
    _image_spec(c, "--calibration")
    c.add_argument("--import-ranges", metavar="FILE.json", help="pin activation ranges from a range file")
    c.add_argument("--export-ranges", metavar="FILE.json", help="write the calibrated activation ranges here")
    c.add_argument("--export-tensorrt-table", metavar="FILE", help="write the ranges as a TensorRT calibration table")
    c.add_argument("--calibration-limit", type=int, help="use only the first N calibration samples")
    c.add_argument("--calibration-method", choices=METHODS,
                   help="range selection method (default: the target's)")
    c.add_argument("--calibration-override", action="append", default=[], metavar="KEY=METHOD",
                   help="method for one producer node name or op type (node names win); repeatable")
    c.add_argument("--calibration-memory", metavar="SIZE", help="memory budget for observed tensors, e.g. 512MB (default 1GB)")
    c.add_argument("--calibration-cache", metavar="DIR", help="build cache: reuse whole builds, calibration statistics and GPTQ rounding "
                   "stored in DIR")
    c.add_argument("--workers", type=int, help="shard calibration samples over N local processes")
    c.add_argument("--calibration-observe", choices=OBSERVE,
                   help="observe only the tensors the target quantizes (default) or every float tensor "
                        "(default with --export-ranges / --export-tensorrt-table)")
    c.add_argument("--calibration-statistics", choices=STATISTICS,
                   help="collect ranges plus the bias-correction means and GPTQ moments (default), or "
                        "ranges only (faster; plain rounding, no bias correction)")
    c.add_argument("--scheduler", metavar="ADDRESS", help="run calibration shards on this Dask scheduler")
    c.add_argument("--eval-data", metavar="PATH", help="samples for the report's fidelity section (like "
                   "--calibration); default: the last 10%% (at most 16) of 10 or more calibration samples, held out")
    c.add_argument("--accuracy", metavar="METRIC>=VALUE",
                   help="accuracy budget on the eval data: cosine>=F, sqnr>=DB or top1>=F; the fewest, cheapest "
                        "layers move to the target's fallbacks until it holds (default: the target's "
                        "[accuracy] default; 'off' disables)")
    c.add_argument("--analysis", metavar="OUT.html", help="also write the per-layer accuracy analysis page")
    c.add_argument("--mode", choices=["static", "dynamic", "weight-only"])
    c.add_argument("--weight-bits", type=int, metavar="4|8", help="weight-only mode: bits per weight (default 4)")
    c.add_argument("--block-size", type=int, metavar="16|32|64|128",
                   help="weight-only mode: weights per scale along the reduction axis (default 32)")
    c.add_argument("--weight-symmetric", metavar="true|false", help="weight-only mode: zero point fixed (default: the target's first weight_only.symmetric entry)")
    c.add_argument("--weight-algorithm", metavar="rtn|gptq|awq",
                   help="weight-only mode: rounding (default gptq with --calibration, rtn without)")
    c.add_argument("--format", choices=["qdq", "qoperator"])
    c.add_argument("--pipeline", help="pass pipeline text, e.g. 'canonicalize,fold-constants'")
    c.add_argument("--plugin", action="append", default=[], help="plugin file (.py) or module defining passes")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--print-ir-after", action="append", default=[], metavar="PASS|all")
    c.add_argument("--time-passes", action="store_true")
    v = c.add_mutually_exclusive_group()
    v.add_argument("--verify-each", dest="verify_each", action="store_true", default=True)
    v.add_argument("--no-verify", dest="verify_each", action="store_false")
    c.add_argument("--stop-after", metavar="PASS")
    c.add_argument("--disable-pass", action="append", default=[], metavar="NAME")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="write the output even if it fails the target's legality check (debugging)")
    _verbosity(c)

    t = sub.add_parser("targets", help="list built-in targets")
    t.add_argument("--show", metavar="NAME|PATH", help="print a resolved target as TOML")
    _verbosity(t)

    ps = sub.add_parser("passes", help="list registered passes")
    ps.add_argument("--plugin", action="append", default=[])
    ps.add_argument("--target", help="also print this target's default pipelines")
    _verbosity(ps)

    i = sub.add_parser("inspect", help="op histogram and what the target would lower")
    i.add_argument("model")
    i.add_argument("--target", default="ort-cpu")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    _verbosity(i)

    k = sub.add_parser("check", help="is every Q/DQ and integer op legal for the target? (exit 2 if not)")
    k.add_argument("model")
    k.add_argument("--target", default="ort-cpu", help="built-in target name or path to a .toml file")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    _verbosity(k)

    sm = sub.add_parser("simulate", help="run a quantized model with the target's integer arithmetic")
    sm.add_argument("model")
    sm.add_argument("--target", default="ort-cpu", help="built-in target name or path to a .toml file")
    sm.add_argument("--inputs", required=True, help="input samples: like --calibration (.npz, .npy, directory)")
    sm.add_argument("--reference", help="the float model: report per-tensor and output SQNR against it")
    sm.add_argument("--report", help="write the JSON result here")
    sm.add_argument("--limit", type=int, help="use only the first N input samples")
    _image_spec(sm, "--inputs")
    _verbosity(sm)

    an = sub.add_parser("analyze", help="per-layer accuracy analysis of a quantized model against its float model")
    an.add_argument("float_model")
    an.add_argument("quant_model")
    an.add_argument("--inputs", required=True, help="input samples: like --calibration (.npz, .npy, directory)")
    an.add_argument("--image-spec", metavar="SPEC|FILE.toml", help="preprocessing for a directory of images")
    an.add_argument("--target", help="built-in target name or .toml (default: the one recorded in the model)")
    an.add_argument("--html", metavar="OUT.html", help="write the self-contained HTML page here")
    an.add_argument("--json", metavar="OUT.json", help="write the JSON report here")
    an.add_argument("--limit", type=int, help="use only the first N input samples (default 8)")
    _verbosity(an)
    return p


def _image_spec(p: argparse.ArgumentParser, data_flag: str) -> None:
    p.add_argument("--image-spec", metavar="SPEC|FILE.toml",
                   help=f"image preprocessing for an image-folder {data_flag}, e.g. "
                   "'resize=256,crop=224,scale=1/255,mean=0.5,0.5,0.5,std=0.5,0.5,0.5' (default: the folder's "
                   "preprocess.toml); see docs/calibration.md")


def _verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true")
    g.add_argument("-v", "--verbose", action="store_true")


def _calibration_options(a: argparse.Namespace) -> CalibrationOptions:
    """The calibration flags as one ``CalibrationOptions`` (validated there; unset flags keep
    the defaults, so the pipeline's own calibrate options stay)."""
    if a.calibration_limit is not None and a.calibration_limit < 1:
        raise UserError(f"--calibration-limit {a.calibration_limit}: must be at least 1")
    flags = {"method": a.calibration_method, "overrides": tuple(a.calibration_override) or None,
             "memory": a.calibration_memory, "cache": a.calibration_cache, "workers": a.workers,
             "scheduler": a.scheduler, "observe": a.calibration_observe, "statistics": a.calibration_statistics,
             "limit": a.calibration_limit}
    return CalibrationOptions(**{k: v for k, v in flags.items() if v is not None})


def _bool_flag(flag: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() not in ("true", "false"):
        raise UserError(f"{flag} {text}: must be true or false")
    return text.lower() == "true"


def _model_files(model: str, outputs: list[str]) -> list[tuple[str, str]]:
    """The model and, when an output lies in the model's folder tree (the only place its
    external data may be), the external data files it names."""
    from .files import real_path

    found = [("input model", model)]
    folder = real_path(model).parent
    if Path(model).is_file() and any(real_path(o).is_relative_to(folder) for o in outputs):
        import onnx

        from .ir.io import external_data_files

        try:
            proto = onnx.load(model, load_external_data=False)
        except Exception:  # noqa: BLE001 - unreadable: loading it reports the error, before any output
            return found
        found += [("input model's external data", str(p)) for p in external_data_files(proto, Path(model).parent)]
    return found


def _cmd_compile(a: argparse.Namespace) -> int:
    from . import files
    from .api import compile as qcompile
    from .status import StatusLine, is_terminal

    outputs = [("-o", a.output), ("--report", a.report), ("--export-ranges", a.export_ranges),
               ("--export-tensorrt-table", a.export_tensorrt_table), ("--analysis", a.analysis)]
    if not files.is_special(a.output):  # a model above 2 GB also writes OUTPUT.data
        outputs.append(("-o external data", a.output + ".data"))
    inputs = [*_model_files(a.model, [str(p) for _, p in outputs if p]), ("calibration file", a.calibration),
              ("image spec", a.image_spec), ("target file", a.target), ("range file", a.import_ranges),
              ("eval data", a.eval_data),
              *(("plugin", p) for p in a.plugin)]
    files.check_paths(inputs, outputs)
    _quiet_runtime()
    with files.transaction():  # every output or none
        result = qcompile(a.model, target=a.target, calibration=a.calibration, mode=a.mode, format=a.format,
                          pipeline=a.pipeline, plugins=a.plugin, print_ir_after=a.print_ir_after,
                          time_passes=a.time_passes, verify_each=a.verify_each, stop_after=a.stop_after,
                          disable_passes=a.disable_pass, calibration_options=_calibration_options(a),
                          image_spec=a.image_spec, import_ranges=a.import_ranges, export_ranges=a.export_ranges,
                          export_tensorrt_table=a.export_tensorrt_table, check=a.check,
                          eval_data=a.eval_data,
                          analysis=a.analysis, weight_bits=a.weight_bits, block_size=a.block_size,
                          weight_symmetric=_bool_flag("--weight-symmetric", a.weight_symmetric),
                          weight_algorithm=a.weight_algorithm, accuracy=a.accuracy, quiet=a.quiet,
                          verbose=a.verbose)
        status = StatusLine(sys.stderr, enabled=not a.quiet and is_terminal(sys.stderr))
        with status.phase("saving the outputs", status.println, a.verbose):
            result.save(a.output)
            if a.report:
                files.write_bytes(a.report, (json.dumps(result.report, indent=2, sort_keys=True) + "\n").encode())
    if not a.quiet:
        r = result.report
        n_low = len(r["lowered"])
        print(f"qcompiler: {a.model} -> {a.output} [{r['target']}, {r['mode']}, {r['format']}] "
              f"{r['size_bytes']['input'] / 1e6:.2f} MB -> {r['size_bytes']['output'] / 1e6:.2f} MB, "
              f"{n_low} nodes integer, {len(r['float_nodes'])} float", file=sys.stderr)
        if (r.get("accuracy") or {}).get("summary"):
            print(f"qcompiler: {r['accuracy']['summary']}", file=sys.stderr)
        if (r.get("check") or {}).get("host_warning"):
            print(f"qcompiler: {r['check']['host_warning']}", file=sys.stderr)
    return 0


def _cmd_targets(a: argparse.Namespace) -> int:
    from .target import builtin_targets, load_target

    if a.show:
        sys.stdout.write(load_target(a.show).to_toml())
        return 0
    for name in builtin_targets():
        t = load_target(name)
        print(f"{name:<16} {t.description}")
    return 0


def _cmd_passes(a: argparse.Namespace) -> int:
    from .registry import default_registry
    from .target import load_target

    reg = default_registry()
    for plugin in a.plugin:
        reg.load_plugin(plugin)
    for name in reg.names():
        opts = ", ".join(f"{o}: {t} = {d}" for o, t, d in reg.options(name))
        print(f"{name:<20} {reg.summary(name)}" + (f"  [{opts}]" if opts else ""))
    if a.target:
        t = load_target(a.target)
        print(f"\n{t.name} static pipeline:  {t.pipeline('static')}")
        print(f"{t.name} dynamic pipeline: {t.pipeline('dynamic')}")
    return 0


def _cmd_check(a: argparse.Namespace) -> int:
    """Findings on stdout (they are the command's output): one line per offending node, then a
    summary; exit 0 when legal (warnings allowed), 2 when not."""
    from .check import check_model

    res = check_model(a.model, a.target)
    if a.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
        return 0 if res.legal else 2
    for line in res.problem_lines() + res.warning_lines():
        print(line)
    print(f"qcompiler check: {a.model}: {res.summary()}")
    if res.saturation_warning():
        print(f"qcompiler check: {res.saturation_warning()}")
    if res.legal and not a.quiet:
        for name, why in res.float_nodes.items():
            print(f"  float: {name}: {why}")
    return 0 if res.legal else 2


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_model

    info = inspect_model(a.model, a.target)
    if a.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"model: {a.model}  target: {info['target']}")
    print("ops:")
    for op, n in info["ops"].items():
        print(f"  {op:<28}{n:>6}")
    print(f"integer ({len(info['lowered'])} nodes):")
    for name, op in info["lowered"].items():
        print(f"  {name}  [{op}]")
    print(f"float ({len(info['float_nodes'])} nodes):")
    for name, why in info["float_nodes"].items():
        print(f"  {name}: {why}")
    print(f"integer partitions ({len(info['partitions'])}):")
    for p in info["partitions"]:
        print(f"  {p['id']}: {len(p['nodes'])} nodes; in: {', '.join(p['inputs'])}; out: {', '.join(p['outputs'])}")
    return 0


def _cmd_simulate(a: argparse.Namespace) -> int:
    from . import files
    from .sim import simulate

    files.check_paths([("input model", a.model), ("reference model", a.reference), ("inputs file", a.inputs),
                       ("image spec", a.image_spec), ("target file", a.target)], [("--report", a.report)])
    for path, what in ((a.model, "model"), (a.reference, "reference model")):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{path}: {what} not found")
    _quiet_runtime()
    with files.transaction():
        result = simulate(a.model, a.target, a.inputs, reference=a.reference, limit=a.limit,
                          image_spec=a.image_spec)
        if a.report:
            files.write_bytes(a.report, (json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    if not a.quiet:
        print(result.table())
    return 0


def _cmd_analyze(a: argparse.Namespace) -> int:
    from .analysis import DEFAULT_LIMIT, analyze

    report = analyze(a.float_model, a.quant_model, a.inputs, target=a.target, html=a.html, json_path=a.json,
                     limit=a.limit if a.limit is not None else DEFAULT_LIMIT, image_spec=a.image_spec)
    if not a.quiet:
        print("\n".join(report["summary"]))
        print(f"{'layer (most sensitive first)':<48}{'sens. dB':>10}{'accum. dB':>11}{'clipped':>10}")
        by = {x["name"]: x for x in report["layers"]}
        for name in report["ranking"][:10]:
            x = by[name]
            acc = (x["accumulated"] or {}).get("sqnr_db")
            clip = (x.get("range") or {}).get("clipped_fraction")
            print(f"{name[-47:]:<48}{_num(x['sensitivity']['score_db']):>10}{_num(acc):>11}"
                  f"{'-' if clip is None else f'{clip:.3%}':>10}")
    return 0


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _quiet_runtime() -> None:
    """No stderr lines from onnxruntime's logger (warnings such as its telemetry notice) in the
    CLI: what matters reaches the user as qcompiler's own one-line errors."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors and fatal only


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if a.version:
        from .version import __version__

        print(__version__)
        return 0
    if a.command is None:
        parser.print_help(sys.stderr)
        return 2
    verbose = getattr(a, "verbose", False)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # unwind like SIGINT
    try:
        with warnings.catch_warnings():
            if not verbose:  # library warnings (numpy's RuntimeWarnings, ...) are for -v, not build logs
                warnings.simplefilter("ignore")
            return {"compile": _cmd_compile, "targets": _cmd_targets, "passes": _cmd_passes,
                    "inspect": _cmd_inspect, "check": _cmd_check, "simulate": _cmd_simulate,
                    "analyze": _cmd_analyze}[a.command](a)
    except UserError as exc:
        if verbose:
            traceback.print_exc()
        print(f"qcompiler: error: {exc}", file=sys.stderr)
        return 2
    except PassFailure as exc:
        if isinstance(exc.cause, UserError):
            print(f"qcompiler: error: {exc.cause}", file=sys.stderr)
            return 2
        if verbose:
            traceback.print_exc()
        print(f"qcompiler: internal error: {exc} (run with -v for a traceback)", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        name, code = ("SIGINT", 130) if isinstance(exc, KeyboardInterrupt) else ("SIGTERM", 143)
        done = "outputs were already complete" if getattr(exc, "outputs_written", False) else "no output written"
        print(f"qcompiler: interrupted by {name}; {done}", file=sys.stderr)
        return code
    except BrokenPipeError:
        # stdout closed early (`qcompiler passes | head`): not an error of ours; silence the
        # flush at exit as Python's documentation recommends, and exit like SIGPIPE would
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # an internal error: say so, exit 1
        if verbose:
            traceback.print_exc()
        print(f"qcompiler: internal error: {type(exc).__name__}: {exc} (run with -v for a traceback)",
              file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
