"""kdgraph from Python: inspect and merge ONNX models with the bundled binary, export PyTorch models.

    import kdgraph
    kdgraph.export_teacher(teacher, x, "teacher.onnx")      # eval mode, BatchNorms kept
    kdgraph.export_student(student, x, "student.onnx")      # training mode, BatchNorms kept
    kdgraph.inspect("student.onnx")["stages"]
    result = kdgraph.merge("teacher.onnx", "student.onnx", ["kd", "at"], out="joint.onnx")
    result["plan"]["pairs"], result["written"]

inspect and merge run the ``kdgraph`` binary installed with this package (``$KDGRAPH_BIN``
overrides it) and raise KdgraphError with its one-line message and exit code. The export helpers
need torch and onnx (``pip install 'kdgraph[export]'``) and raise ExportError.
"""

from ._api import inspect, merge
from ._binary import KdgraphError, find_binary
from .export import ExportError, export_student, export_teacher

__all__ = ["inspect", "merge", "KdgraphError", "find_binary", "ExportError", "export_teacher", "export_student"]
