"""A stage graph's own work cut out of it: kdgraph's connectors and loss on fixed features, for ort_step's floor.

A method's connectors are part of the method (VID's regressors at full resolution cost about
what resnet18's forward pass costs), so a fair floor for a stage graph is the student's step, the
teacher's forward pass as far as the stage reads it (teacher_part) where the stage holds the
teacher, and this graph's step: the nodes kdgraph inserted (named `kd/...` and `loss...`) alone,
every student and teacher tensor they read replaced by fixed random values of its shape at the
benchmark's batch. A student tensor is that value times a trainable scalar, so the backward pass
computes the gradient that flows into the student (the connectors' input gradients) at the cost
of one extra reduction, and AdamW updates one number for it; a teacher tensor is a frozen value.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

OWN_PREFIXES = ("kd/", "loss")
TEACHER_PREFIX = "teacher/"


def is_own(node):
    return node.name.startswith(OWN_PREFIXES)


def holds_teacher(model):
    """Whether the stage graph runs the teacher's forward pass."""
    return any(n.name.startswith(TEACHER_PREFIX) for n in model.graph.node)


def holds_student(model):
    """Whether the stage graph runs the student (a node that is neither the teacher's nor kdgraph's)."""
    return any(not is_own(n) and not n.name.startswith(TEACHER_PREFIX) for n in model.graph.node)


def boundary_shapes(model, batch, names):
    """{name: shape} of the tensors `names` with the symbolic batch set to `batch` (ONNX shape inference)."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.name in names:
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    missing = set(names) - set(shapes)
    if missing:
        raise RuntimeError(f"shape inference gave no shape for {sorted(missing)}")
    return shapes


def boundary(model):
    """The student and teacher tensors that kdgraph's nodes read, sorted."""
    graph = model.graph
    own = [n for n in graph.node if is_own(n)]
    made_by_own = {o for n in own for o in n.output}
    outside = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    return sorted({i for n in own for i in n.input if i and i not in made_by_own and i not in outside})


def teacher_boundary(model):
    """The teacher tensors that kdgraph's nodes read: what the stage needs of the teacher."""
    produced_by = {o: n for n in model.graph.node for o in n.output}
    return [name for name in boundary(model) if produced_by[name].name.startswith(TEACHER_PREFIX)]


def teacher_part(model):
    """The stage graph's teacher cut to what kdgraph's nodes read of it (a teacher tapped in the
    middle, as FitNet's hint, runs only that far), as a model for an InferenceSession."""
    graph = model.graph
    produced_by = {o: n for n in graph.node for o in n.output}
    outputs = teacher_boundary(model)
    needed, stack = set(), list(outputs)
    while stack:
        node = produced_by.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack += [i for i in node.input if i]
    nodes = [n for n in graph.node if id(n) in needed]
    read = {i for n in nodes for i in n.input}
    cut = helper.make_graph(
        nodes, f"{graph.name}-teacher", [i for i in graph.input if i.name in read],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        [t for t in graph.initializer if t.name in read])
    return helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version)


def own_graph(model, sidecar, batch):
    """(model, sidecar dict) of the stage's own work; `sidecar` is the stage's, read by train_ort."""
    graph = model.graph
    own = [n for n in graph.node if is_own(n)]
    made_by_own = {o for n in own for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    produced_by = {o: n for n in graph.node for o in n.output}
    read = [i for n in own for i in n.input if i]
    boundary_names = boundary(model)
    shapes = boundary_shapes(model, batch, set(boundary_names))
    rng = np.random.default_rng(0)
    new_initializers = [initializers[name] for name in sorted({i for i in read if i in initializers})]
    feed_nodes, trainable_scales, frozen_values = [], [], []
    for name in boundary_names:
        value = rng.random(shapes[name], dtype=np.float32)  # nonnegative, as most taps are (post-ReLU)
        if produced_by[name].name.startswith(TEACHER_PREFIX):
            new_initializers.append(numpy_helper.from_array(value, name))
            frozen_values.append(name)
        else:
            data, scale = f"own/{name}/value", f"own/{name}/scale"
            new_initializers += [numpy_helper.from_array(value, data), numpy_helper.from_array(np.ones(1, np.float32), scale)]
            feed_nodes.append(helper.make_node("Mul", [data, scale], [name], name=f"own/{name}/mul"))
            frozen_values.append(data)
            trainable_scales.append(scale)
    inputs = [i for i in graph.input if i.name in set(read)]
    outputs = [o for o in graph.output if o.name in made_by_own or o.name in boundary_names]
    cut = helper.make_graph(feed_nodes + own, f"{graph.name}-own-work", inputs, outputs, new_initializers)
    cut_model = helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version)
    kept = {t.name for t in new_initializers}
    output_names = {o.name for o in outputs}
    cut_sidecar = {**sidecar,
                   "requires_grad": [n for n in sidecar["requires_grad"] if n in kept] + trainable_scales,
                   "frozen_params": [n for n in sidecar["frozen_params"] if n in kept] + frozen_values,
                   "outputs": [o for o in sidecar["outputs"] if o["name"] in output_names]}
    return cut_model, cut_sidecar
