//! Which initializers of a model are its weights: the float tensors in the places networks keep
//! trainable parameters, as opposed to shape constants and BatchNorm statistics.

use std::collections::{HashMap, HashSet};

use crate::onnx::{pb, proto};

/// Ops through which an exporter hands a weight to its consumer unchanged in value (a Linear's
/// weight goes through Transpose before MatMul in TorchScript exports).
const PASS_THROUGH: &[&str] = &[
    "Transpose",
    "Identity",
    "Reshape",
    "Cast",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
];

/// Student float initializers in the places networks keep weights: conv and linear weights and
/// biases, BN scale and shift, bias-like Add/Mul operands, directly or through a pass-through op.
/// Shape constants and BN statistics are not.
pub fn trainable_weights(graph: &pb::GraphProto, statistics: &HashSet<String>) -> Vec<String> {
    let initializers = proto::initializers(graph);
    let producers: HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();

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
            let Some(name) = node
                .input
                .get(slot)
                .and_then(|i| weight_source(i, &initializers, &producers))
            else {
                continue;
            };
            let tensor = initializers[name];
            let name = &name.to_string();
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

/// The initializer a weight slot reads, following pass-through ops back to their data input.
fn weight_source<'a>(
    mut name: &'a str,
    initializers: &HashMap<&'a str, &'a pb::TensorProto>,
    producers: &HashMap<&'a str, &'a pb::NodeProto>,
) -> Option<&'a str> {
    for _ in 0..8 {
        if initializers.contains_key(name) {
            return Some(name);
        }
        let producer = producers.get(name)?;
        if !PASS_THROUGH.contains(&producer.op_type.as_str()) {
            return None;
        }
        name = producer.input.first()?.as_str();
    }
    None
}
