"""inspect and merge: the command line's JSON reports as Python dictionaries."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._binary import run

PathLike = Union[str, "os.PathLike[str]"]
Taps = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


def inspect(model: PathLike, *, input_shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """What ``kdgraph inspect MODEL --json`` prints: the model's inputs, stages (with pre-ReLU
    taps), embedding, logits and notes.

    Args:
        model: the ONNX file.
        input_shape: sizes of the image input besides the batch (C, H, W), for models exported
            with symbolic sizes.

    Raises:
        KdgraphError: kdgraph cannot read or analyse the model.
    """
    args = ["inspect", os.fspath(model), "--json", *flags({"input_shape": input_shape})]
    return json.loads(run(args))


def merge(
    teacher: PathLike,
    student: PathLike,
    methods: Union[str, Sequence[str]],
    out: PathLike = "joint.onnx",
    *,
    dry_run: bool = False,
    alpha: Optional[float] = None,
    beta: Union[float, Mapping[str, float], None] = None,
    gamma: Optional[float] = None,
    temperature: Optional[float] = None,
    taps: Optional[Taps] = None,
    emit: Optional[str] = None,
    optimizer: Optional[str] = None,
    pairing: Optional[str] = None,
    check: bool = True,
    **options: Any,
) -> Dict[str, Any]:
    """Runs ``kdgraph merge`` and returns ``{"plan": ..., "written": [...]}``.

    ``plan`` is the plan as ``merge --dry-run --json`` prints it (methods, weights, every pair of
    taps with its pool and connector, notes, warnings). ``written`` lists the files written: the
    joint graph and its sidecar, the init stage's where a method has one, and the gradient or
    step graphs that ``emit`` asks for; it is empty for a dry run. A merge that writes also
    returns ``output``, ``sidecar`` and ``check`` (the loss terms of tract's run of each graph).

    Args:
        teacher, student: the ONNX files.
        methods: one method id or several (``"kd"``, ``["kd", "at"]``).
        out: the joint graph to write (``-o``); its sidecar goes beside it as ``.json``.
        dry_run: plan only, write nothing.
        alpha, gamma, temperature: ``--alpha``, ``--gamma``, ``-T``.
        beta: one weight (one feature method), or ``{method: weight}``.
        taps: pairs of (teacher tap, student tap) replacing the automatic pairing, each passed
            to ``--tap`` unchanged: a tensor name, a module path (``("layer3", "layer2")``: the
            module's output) or a stage index with its role's prefix (``("teacher:3", "student:2")``).
        emit: ``"joint"``, ``"gradients"`` or ``"step"``.
        optimizer: the step graph's ``"adamw"`` or ``"sgd"``.
        pairing: ``"position"`` or ``"resolution"``.
        check: run each written graph with tract first (``check=False`` is ``--no-check``).
        **options: any other flag of ``merge``, underscores for dashes: method options
            (``crd_n_data=50000`` is ``--crd-n-data 50000``, ``fsp_connectors=True`` is
            ``--fsp-connectors``), step options (``weight_decay``, ``momentum``, ``nesterov``,
            ``betas=(0.9, 0.999)``, ``eps``), ``check_batch``, ``input_shape=(3, 32, 32)``,
            ``teacher_batch_statistics``, ``dot``.

    Raises:
        KdgraphError: kdgraph refused the request or the models (its one-line message and exit code).
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    given = dict(options, alpha=alpha, beta=beta, gamma=gamma, temperature=temperature, tap=taps,
                 emit=emit, optimizer=optimizer, pairing=pairing, no_check=not check)
    args = ["merge", os.fspath(teacher), os.fspath(student), "-o", os.fspath(out), "--json"]
    args += [arg for method in methods for arg in ("--method", method)]
    args += flags(given)
    if dry_run:
        return {"plan": json.loads(run([*args, "--dry-run"])), "written": []}
    return json.loads(run(args))


def flags(options: Mapping[str, Any]) -> List[str]:
    """Command-line flags for keyword options: ``None`` and ``False`` give nothing, ``True`` the
    bare flag, a mapping one ``--flag KEY=VALUE`` per item, ``tap`` one ``--tap T=S`` per pair,
    another sequence its items joined by commas, anything else ``--flag VALUE``."""
    args: List[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, Mapping):
            args += [a for k, v in value.items() for a in (flag, f"{k}={v}")]
        elif key == "tap":
            args += [a for t, s in value for a in (flag, f"{t}={s}")]
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return args
