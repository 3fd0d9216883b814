//! Whole-graph edits used to assemble the joint graph: folding BatchNorm into constants, keeping
//! only what leads to some tensors, renaming under a prefix, opset upgrades, topological order.

use std::collections::{HashMap, HashSet, VecDeque};

use super::builder::float_tensor;
use super::{pb, proto};
use crate::error::{Error, Result};

/// Folds every BatchNormalization with constant parameters: into the Conv before it when that
/// Conv feeds only the BN and its output is not in `keep`, else into a constant Mul and Add. The
/// BN's output name is kept, so taps on it still resolve.
pub fn fold_batchnorm(
    graph: &mut pb::GraphProto,
    keep: &HashSet<String>,
    model: &str,
) -> Result<()> {
    let mut readers: HashMap<String, usize> = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            *readers.entry(input.clone()).or_default() += 1;
        }
    }
    for output in &graph.output {
        *readers.entry(output.name.clone()).or_default() += 1;
    }
    let mut initializers: HashMap<String, pb::TensorProto> = graph
        .initializer
        .drain(..)
        .map(|t| (t.name.clone(), t))
        .collect();
    let producer: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut removed = vec![false; graph.node.len()];
    let mut extra_nodes: Vec<(usize, Vec<pb::NodeProto>)> = Vec::new();
    for index in 0..graph.node.len() {
        let bn = graph.node[index].clone();
        if bn.op_type != "BatchNormalization" || bn.input.len() < 5 {
            continue;
        }
        let params: Option<Vec<Vec<f32>>> = bn.input[1..5]
            .iter()
            .map(|n| initializers.get(n).and_then(proto::float_values))
            .collect();
        let Some(params) = params else {
            return Err(Error::invalid_model(format!(
                "`{model}`: BatchNormalization `{}` has parameters that are not float constants; the teacher's BN cannot be folded",
                bn.name
            )));
        };
        let epsilon = bn
            .attribute
            .iter()
            .find(|a| a.name == "epsilon")
            .map(|a| a.f)
            .unwrap_or(1e-5);
        let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let scale: Vec<f32> = gamma
            .iter()
            .zip(var)
            .map(|(g, v)| g / (v + epsilon).sqrt())
            .collect();
        let shift: Vec<f32> = beta
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        let (x, y) = (bn.input[0].clone(), bn.output[0].clone());
        let conv = producer.get(&x).copied().filter(|&c| {
            let n = &graph.node[c];
            n.op_type == "Conv"
                && readers.get(&x) == Some(&1)
                && !keep.contains(&x)
                && n.input
                    .iter()
                    .skip(1)
                    .all(|w| initializers.contains_key(w) && readers.get(w) == Some(&1))
        });
        if let Some(c) = conv {
            let conv_node = &mut graph.node[c];
            // Folded values get names of their own: a tensor keeps its name only with its values.
            let weight = initializers
                .get(&conv_node.input[1])
                .expect("checked above");
            let mut values = proto::float_values(weight).unwrap_or_default();
            let per_channel = values.len() / scale.len().max(1);
            for (o, chunk) in values.chunks_mut(per_channel.max(1)).enumerate() {
                chunk.iter_mut().for_each(|v| *v *= scale[o]);
            }
            let weight_name = format!("{y}.folded_weight");
            let folded_weight = float_tensor(&weight_name, &weight.dims, &values);
            initializers.insert(weight_name.clone(), folded_weight);
            conv_node.input[1] = weight_name;
            let bias_values: Vec<f32> =
                match conv_node.input.get(2).and_then(|b| initializers.get(b)) {
                    Some(b) => proto::float_values(b).unwrap_or_default(),
                    None => vec![0.0; scale.len()],
                };
            let folded: Vec<f32> = bias_values
                .iter()
                .zip(&scale)
                .zip(&shift)
                .map(|((b, s), t)| b * s + t)
                .collect();
            let bias_name = format!("{y}.folded_bias");
            initializers.insert(
                bias_name.clone(),
                float_tensor(&bias_name, &[folded.len() as i64], &folded),
            );
            conv_node.input.truncate(2);
            conv_node.input.push(bias_name);
            conv_node.output[0] = y;
        } else {
            let dims = [scale.len() as i64, 1, 1];
            let (scale_name, shift_name, scaled) = (
                format!("{y}.scale"),
                format!("{y}.shift"),
                format!("{y}.scaled"),
            );
            initializers.insert(scale_name.clone(), float_tensor(&scale_name, &dims, &scale));
            initializers.insert(shift_name.clone(), float_tensor(&shift_name, &dims, &shift));
            let mk = |op: &str, a: &str, b: &str, out: &str| pb::NodeProto {
                input: vec![a.into(), b.into()],
                output: vec![out.into()],
                name: format!("{}/{op}", bn.name),
                op_type: op.into(),
                doc_string: "BatchNormalization folded to eval-mode constants by kdgraph".into(),
                ..Default::default()
            };
            extra_nodes.push((
                index,
                vec![
                    mk("Mul", &x, &scale_name, &scaled),
                    mk("Add", &scaled, &shift_name, &y),
                ],
            ));
        }
        removed[index] = true;
    }
    let mut extra: HashMap<usize, Vec<pb::NodeProto>> = extra_nodes.into_iter().collect();
    let nodes = std::mem::take(&mut graph.node);
    for (i, node) in nodes.into_iter().enumerate() {
        if let Some(replacement) = extra.remove(&i) {
            graph.node.extend(replacement);
        } else if !removed[i] {
            graph.node.push(node);
        }
    }
    let used: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    let mut kept: Vec<pb::TensorProto> = initializers
        .into_values()
        .filter(|t| used.contains(&t.name))
        .collect();
    kept.sort_by(|a, b| a.name.cmp(&b.name));
    graph.initializer = kept;
    Ok(())
}

/// Keeps only the nodes (and initializers) that some tensor in `needed` depends on.
pub fn prune_to(graph: &mut pb::GraphProto, needed: &HashSet<String>) {
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut keep = vec![false; graph.node.len()];
    let mut stack: Vec<&str> = needed.iter().map(String::as_str).collect();
    while let Some(tensor) = stack.pop() {
        if let Some(&i) = producer.get(tensor) {
            if !keep[i] {
                keep[i] = true;
                stack.extend(
                    graph.node[i]
                        .input
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        keep[index - 1]
    });
    let used: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Renames every node whose name, followed by a dot, begins the name of a graph input or an
/// initializer (`conv0` beside the input `conv0.bias`): tract names the nodes it adds for a node
/// `<name>.bias`, `<name>.weight`, ... and refuses a graph where one already exists.
pub fn separate_node_names(graph: &mut pb::GraphProto) {
    let values: Vec<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .chain(graph.initializer.iter().map(|t| t.name.as_str()))
        .collect();
    let clashes: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| {
            !n.name.is_empty()
                && values.iter().any(|v| {
                    v.strip_prefix(n.name.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
                })
        })
        .map(|n| n.name.clone())
        .collect();
    for node in graph.node.iter_mut().filter(|n| clashes.contains(&n.name)) {
        node.name = format!("{}/{}", node.name, node.op_type);
    }
}

/// Every tensor `target` depends on (itself included), through the graph's nodes.
pub fn ancestors<'a>(graph: &'a pb::GraphProto, target: &'a str) -> HashSet<&'a str> {
    let producer: HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut seen = HashSet::from([target]);
    let mut stack = vec![target];
    while let Some(tensor) = stack.pop() {
        if let Some(node) = producer.get(tensor) {
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                if seen.insert(input.as_str()) {
                    stack.push(input.as_str());
                }
            }
        }
    }
    seen
}

/// Renames every node, tensor and initializer with `prefix`, except graph inputs, which are
/// replaced by `inputs` (old name -> new name).
pub fn prefix_names(graph: &mut pb::GraphProto, prefix: &str, inputs: &HashMap<String, String>) {
    let rename = |name: &str| -> String {
        if name.is_empty() {
            String::new()
        } else if let Some(new) = inputs.get(name) {
            new.clone()
        } else {
            format!("{prefix}{name}")
        }
    };
    for node in &mut graph.node {
        node.name = format!("{prefix}{}", node.name);
        node.input.iter_mut().for_each(|i| *i = rename(i));
        node.output.iter_mut().for_each(|o| *o = rename(o));
    }
    for tensor in &mut graph.initializer {
        tensor.name = rename(&tensor.name);
    }
    for info in graph.value_info.iter_mut().chain(graph.output.iter_mut()) {
        info.name = rename(&info.name);
    }
}

/// Reduce ops whose `axes` moved from an attribute to an input at opset 18.
const AXES_INPUT_SINCE_18: [&str; 8] = [
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceSumSquare",
];

/// Rewrites a graph written for opset < 18 so that it is valid at opset >= 18.
pub fn upgrade_reduce_axes(graph: &mut pb::GraphProto) {
    let mut new_initializers = Vec::new();
    for node in graph
        .node
        .iter_mut()
        .filter(|n| AXES_INPUT_SINCE_18.contains(&n.op_type.as_str()))
    {
        if let Some(pos) = node.attribute.iter().position(|a| a.name == "axes") {
            let axes = node.attribute.remove(pos).ints;
            let name = format!("{}.axes", node.output[0]);
            new_initializers.push(pb::TensorProto {
                name: name.clone(),
                dims: vec![axes.len() as i64],
                data_type: pb::tensor_proto::DataType::Int64 as i32,
                raw_data: axes.iter().flat_map(|a| a.to_le_bytes()).collect(),
                ..Default::default()
            });
            node.input.truncate(1);
            node.input.push(name);
        }
    }
    graph.initializer.extend(new_initializers);
}

/// Orders nodes so that each comes after the producers of its inputs (Kahn's algorithm, stable).
pub fn topological_sort(graph: &mut pb::GraphProto) -> Result<()> {
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.as_str(), i))
        })
        .collect();
    let count = graph.node.len();
    let mut pending = vec![0usize; count];
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, node) in graph.node.iter().enumerate() {
        let sources: HashSet<usize> = node
            .input
            .iter()
            .filter_map(|t| producer.get(t.as_str()).copied())
            .collect();
        pending[i] = sources.len();
        for s in sources {
            dependants[s].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..count).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(count);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependants[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    if order.len() != count {
        let stuck = (0..count)
            .find(|&i| pending[i] > 0)
            .map(|i| super::proto::node_label(&graph.node[i]))
            .unwrap_or_default();
        return Err(Error::invalid_model(format!(
            "the graph has a cycle through node `{stuck}`; it is not a valid ONNX graph"
        )));
    }
    let mut nodes: Vec<Option<pb::NodeProto>> = std::mem::take(&mut graph.node)
        .into_iter()
        .map(Some)
        .collect();
    graph.node = order
        .into_iter()
        .map(|i| nodes[i].take().expect("each index once"))
        .collect();
    Ok(())
}
