//! Structural checks of a loaded graph, so that a broken export gets a message naming the node
//! or tensor at fault instead of a failure deep inside shape inference.

use std::collections::HashSet;

use super::{edit, pb, proto};
use crate::error::{Error, Result};

/// Checks opset, domains, ops, references and single producers, and puts the nodes in
/// topological order (a cycle is an error).
pub fn validate(graph: &mut pb::GraphProto, model: &pb::ModelProto, shown: &str) -> Result<()> {
    if proto::onnx_opset(model) == 0 {
        return Err(Error::invalid_model(format!(
            "`{shown}` imports no ai.onnx opset; the file is damaged or not a network: export it again"
        )));
    }
    use pb::tensor_proto::DataType;
    if let Some(half) = graph.initializer.iter().find(|t| {
        t.data_type == DataType::Float16 as i32 || t.data_type == DataType::Bfloat16 as i32
    }) {
        return Err(Error::invalid_model(format!(
            "`{shown}` stores weight `{}` as {}; kdgraph builds float32 training graphs: export the model in float32 (model.float())",
            half.name,
            proto::dtype_name(half.data_type)
        )));
    }
    for tensor in &graph.initializer {
        proto::check_tensor_size(tensor).map_err(|why| {
            Error::invalid_model(format!(
                "`{shown}`: initializer `{}` {why}; the file is damaged: export it again",
                tensor.name
            ))
        })?;
    }
    for node in &graph.node {
        for tensor in node.attribute.iter().filter_map(|a| a.t.as_ref()) {
            proto::check_tensor_size(tensor).map_err(|why| {
                Error::invalid_model(format!(
                    "`{shown}`: the tensor attribute of node `{}` {why}; the file is damaged",
                    proto::node_label(node)
                ))
            })?;
        }
    }
    check_input_ranks(graph, shown)?;
    let known = tract_onnx::onnx().op_register;
    let mut produced: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    produced.extend(graph.input.iter().map(|i| i.name.as_str()));
    for node in &graph.node {
        let node_name = proto::node_label(node);
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Err(Error::invalid_model(format!(
                "`{shown}`: node `{node_name}` uses op `{}` of the custom domain `{}`; kdgraph reads standard ONNX ops only: \
                 export without custom ops",
                node.op_type, node.domain
            )));
        }
        if node
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return Err(Error::invalid_model(format!(
                "`{shown}`: node `{node_name}` ({}) holds a subgraph; control flow (If, Loop, Scan) is not supported: \
                 export the network without data-dependent control flow",
                node.op_type
            )));
        }
        if !known.0.contains_key(&node.op_type) {
            return Err(Error::invalid_model(format!(
                "`{shown}`: node `{node_name}` uses op `{}`, which kdgraph cannot analyse; export with standard ops",
                node.op_type
            )));
        }
        for output in node.output.iter().filter(|o| !o.is_empty()) {
            if !produced.insert(output.as_str()) {
                return Err(Error::invalid_model(format!(
                    "`{shown}`: tensor `{output}` is produced twice (again by node `{node_name}`); tensor names must be unique"
                )));
            }
        }
    }
    for node in &graph.node {
        if let Some(missing) = node
            .input
            .iter()
            .find(|i| !i.is_empty() && !produced.contains(i.as_str()))
        {
            return Err(Error::invalid_model(format!(
                "`{shown}`: node `{}` reads `{missing}`, which no node, initializer or input produces; the graph is broken: export it again",
                proto::node_label(node)
            )));
        }
    }
    if let Some(missing) = graph
        .output
        .iter()
        .find(|o| !produced.contains(o.name.as_str()))
    {
        return Err(Error::invalid_model(format!(
            "`{shown}`: graph output `{}` is produced by no node",
            missing.name
        )));
    }
    edit::topological_sort(graph).map_err(|e| Error::invalid_model(format!("`{shown}`: {e}")))
}

/// The least rank of input 0 of ops whose shape rules in tract index the channel axis unchecked.
const MIN_INPUT_RANK: [(&str, usize); 8] = [
    ("BatchNormalization", 2),
    ("Conv", 3),
    ("ConvTranspose", 3),
    ("MaxPool", 3),
    ("AveragePool", 3),
    ("GlobalAveragePool", 3),
    ("GlobalMaxPool", 3),
    ("InstanceNormalization", 3),
];

/// An op that reads a constant or a graph input of too low a rank (a broken graph that would
/// crash shape inference) is an error naming the node.
fn check_input_ranks(graph: &pb::GraphProto, shown: &str) -> Result<()> {
    let mut ranks: std::collections::HashMap<&str, usize> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.len()))
        .collect();
    for input in &graph.input {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(shape) = &t.shape {
                ranks.insert(input.name.as_str(), shape.dim.len());
            }
        }
    }
    for node in &graph.node {
        let Some(&(_, least)) = MIN_INPUT_RANK.iter().find(|(op, _)| *op == node.op_type) else {
            continue;
        };
        let Some(x) = node.input.first() else {
            continue;
        };
        if let Some(&rank) = ranks.get(x.as_str()).filter(|&&r| r < least) {
            return Err(Error::invalid_model(format!(
                "`{shown}`: node `{}` ({}) reads `{x}` of rank {rank}, but needs rank {least} or more; the graph is broken: export it again",
                proto::node_label(node), node.op_type
            )));
        }
    }
    Ok(())
}
