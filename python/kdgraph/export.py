"""Exports a PyTorch teacher and student to ONNX in the forms kdgraph merges and ORT Training trains."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Set, Tuple, Union

if TYPE_CHECKING:
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The TorchScript exporter's opset for the student: LayerNormalization needs 17, ORT Training 1.19
# reads it.
STUDENT_OPSET = 17
# The torch versions these helpers were checked with (tests/python/test_package.py).
CHECKED_TORCH = "2.15"

PathLike = Union[str, "os.PathLike[str]"]


class ExportError(RuntimeError):
    """The installed torch cannot export the model in the form kdgraph needs (the message names the
    torch version and what to do), or its exporter failed on the model."""


def export_teacher(module: "torch.nn.Module", example: "torch.Tensor", path: PathLike) -> Path:
    """Exports the teacher in eval mode with its BatchNorms kept as BatchNormalization nodes.

    kdgraph folds them itself in the joint graph, and OFD takes its margins from them. Written by
    the torch.export-based exporter with ``optimize=False`` (its default optimisation folds
    BatchNorm into the convolutions); input ``input`` with a dynamic batch axis, output ``logits``.
    The module is put back in the mode it was in.

    Args:
        module: the teacher.
        example: an input batch (N, C, H, W) at the size you will train at; a batch of one is
            repeated to two (torch.export fixes an axis of size 1).
        path: the ONNX file to write.

    Returns:
        ``path`` as a Path.

    Raises:
        ExportError: this torch has no such exporter, its exporter failed, or it folded the BatchNorms.
    """
    torch, _ = _modules()
    _require_parameters(("dynamo", "optimize", "dynamic_shapes", "external_data"), "the teacher's",
                        "the torch.export-based exporter with optimize=False")
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        with _exporting("teacher"):
            torch.onnx.export(module, (_batched(example),), str(path), dynamo=True, optimize=False,
                              external_data=False, verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("N")},))
    finally:
        module.train(was_training)
    _check_batchnorms_kept(module, path, "teacher")
    return path


def export_student(module: "torch.nn.Module", example: "torch.Tensor", path: PathLike) -> Path:
    """Exports the student in training mode with its BatchNorms and LayerNorms kept.

    Written by the TorchScript exporter with ``training=TrainingMode.TRAINING`` and
    ``do_constant_folding=False`` at opset 17 (BatchNormalization in training form, which kdgraph
    merges and ORT Training differentiates; LayerNormalization; Dropout in training mode), from a
    copy of the module: tracing a training-mode forward moves the running statistics once, so the
    file gets the module's own statistics back and the module is left untouched. Input ``input``
    with a dynamic batch axis, output ``logits``.

    Args:
        module: the student.
        example: an input batch (N, C, H, W) at the size you will train at; a batch of one is
            repeated to two (training-mode BatchNorm needs more than one value per channel).
        path: the ONNX file to write.

    Returns:
        ``path`` as a Path.

    Raises:
        ExportError: this torch has no TorchScript exporter, it failed, or it folded the BatchNorms.
    """
    torch, _ = _modules()
    if not hasattr(torch.onnx, "TrainingMode"):
        raise _unsupported("torch.onnx.TrainingMode", "the student's")
    _require_parameters(("dynamo", "training", "do_constant_folding", "dynamic_axes"), "the student's",
                        "the TorchScript exporter with training=TRAINING")
    path = Path(path)
    model = copy.deepcopy(module).train()
    statistics = {name: value.detach().clone() for name, value in model.named_buffers()}
    with _exporting("student"):
        torch.onnx.export(model, (_batched(example),), str(path), dynamo=False, opset_version=STUDENT_OPSET,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
    _restore_statistics(path, statistics)
    _check_batchnorms_kept(module, path, "student")
    return path


def _modules() -> Tuple[Any, Any]:
    """torch and onnx, imported only when an export helper runs (inspect and merge need neither)."""
    try:
        import onnx
        import torch
    except ImportError as exc:
        raise ExportError(f"the export helpers need torch and onnx ({exc}): pip install 'kdgraph[export]'") from exc
    return torch, onnx


def _unsupported(missing: str, role: str) -> ExportError:
    import torch

    return ExportError(
        f"torch {torch.__version__} has no {missing}, which {role} export needs; export with the torch "
        f"these helpers were checked with ({CHECKED_TORCH}), e.g. in a separate environment: "
        f"pip install 'torch=={CHECKED_TORCH}.*' onnx onnxscript"
    )


def _require_parameters(names: Tuple[str, ...], role: str, exporter: str) -> None:
    """Raises ExportError naming the torch version when torch.onnx.export lacks one of `names`."""
    import torch

    accepted = inspect.signature(torch.onnx.export).parameters
    missing = [name for name in names if name not in accepted]
    if missing:
        raise _unsupported(f"{exporter} (torch.onnx.export has no {', '.join(missing)})", role)


@contextlib.contextmanager
def _exporting(role: str) -> Iterator[None]:
    """Turns an exporter failure into ExportError with the torch version; hides its expected notices."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # The training-mode trace's num_batches_tracked increments, which the file must not keep.
        warnings.filterwarnings("ignore", message="ONNX Preprocess - Removing mutation")
        # Training-mode batch_norm's check of the batch size, which the trace records as a constant.
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                module="torch.nn.functional")
        try:
            yield
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ExportError(
                f"torch {torch.__version__} could not export the {role}: {type(exc).__name__}: {first}"
            ) from exc


def _batched(example: "torch.Tensor") -> "torch.Tensor":
    """The example with a batch of at least two."""
    return example.repeat(2, *([1] * (example.dim() - 1))) if example.shape[0] < 2 else example


def _restore_statistics(path: Path, statistics: Dict[str, "torch.Tensor"]) -> None:
    """Writes the module's buffers (BatchNorm running statistics) over the initializers of the same
    name, which the training-mode trace moved; every BatchNormalization's statistics must be among them."""
    torch, onnx = _modules()
    from onnx import numpy_helper

    model = onnx.load(str(path))
    restored: Set[str] = set()
    for init in model.graph.initializer:
        if init.name in statistics:
            init.CopyFrom(numpy_helper.from_array(statistics[init.name].cpu().numpy(), init.name))
            restored.add(init.name)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and not set(node.input[3:5]) <= restored:
            raise ExportError(
                f"BatchNormalization `{node.name}` reads running statistics {list(node.input[3:5])} that are not "
                f"named after the module's buffers; the exporter of torch {torch.__version__} names "
                f"them otherwise: export with torch {CHECKED_TORCH}"
            )
    onnx.save(model, str(path))


def _check_batchnorms_kept(module: "torch.nn.Module", path: Path, role: str) -> None:
    """Raises ExportError when the module has BatchNorms and the file has no BatchNormalization."""
    torch, onnx = _modules()
    wanted = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    model = onnx.load(str(path), load_external_data=False)
    nodes = [*model.graph.node, *(n for function in model.functions for n in function.node)]
    if wanted and not any(n.op_type == "BatchNormalization" for n in nodes):
        raise ExportError(
            f"torch {torch.__version__} folded the {role}'s {wanted} BatchNorms away at export ({path}); "
            f"export with torch {CHECKED_TORCH}, which keeps them"
        )

