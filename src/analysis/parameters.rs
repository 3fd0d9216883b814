//! Which initializers of a model are its weights: the float tensors in the places networks keep
//! trainable parameters, as opposed to shape constants and BatchNorm statistics.

use std::collections::HashSet;

use crate::onnx::{pb, proto};

/// Student float initializers in the places networks keep weights: conv and linear weights and
/// biases, BN scale and shift, bias-like Add/Mul operands. Shape constants and BN statistics are not.
pub fn trainable_weights(graph: &pb::GraphProto, statistics: &HashSet<String>) -> Vec<String> {
    let initializers = proto::initializers(graph);
    let weight_slots: &[(&str, &[usize])] = &[
        ("Conv", &[1, 2]),
        ("ConvTranspose", &[1, 2]),
        ("Gemm", &[1, 2]),
        ("MatMul", &[0, 1]),
        ("BatchNormalization", &[1, 2]),
        ("Add", &[0, 1]),
        ("Mul", &[0, 1]),
        ("Sub", &[0, 1]),
        ("PRelu", &[1]),
        ("LayerNormalization", &[1, 2]),
    ];
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for node in &graph.node {
        let Some((_, slots)) = weight_slots.iter().find(|(op, _)| *op == node.op_type) else {
            continue;
        };
        for &slot in slots.iter() {
            let Some(name) = node.input.get(slot) else {
                continue;
            };
            let Some(tensor) = initializers.get(name.as_str()) else {
                continue;
            };
            let elements: i64 = tensor.dims.iter().product();
            if tensor.data_type == pb::tensor_proto::DataType::Float as i32
                && !tensor.dims.is_empty()
                && elements > 1
                && !statistics.contains(name)
                && seen.insert(name.clone())
            {
                names.push(name.clone());
            }
        }
    }
    names
}
