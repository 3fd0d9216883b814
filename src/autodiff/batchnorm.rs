//! BatchNormalization on the trainable path in training mode, written with primitive operators:
//! normalise with the batch's statistics (biased variance), and compute the new running mean and
//! variance as torch does (unbiased variance), as outputs `<statistic>_next`.

use std::collections::HashSet;

use crate::onnx::builder::{Attr, GraphBuilder};
use crate::onnx::pb;

/// Rewrites every BatchNormalization that depends on a parameter (its input or its scale and
/// shift) into training mode. Returns (running statistic, its updated value's tensor) pairs.
pub fn training_mode(
    graph: &mut pb::GraphProto,
    parameters: &[String],
    opset: i64,
) -> Vec<(String, String)> {
    let mut active: HashSet<String> = parameters.iter().cloned().collect();
    let mut targets = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if !node.input.iter().any(|i| active.contains(i)) {
            continue;
        }
        active.extend(node.output.iter().cloned());
        if node.op_type == "BatchNormalization" && node.input.len() == 5 {
            targets.push(index);
        }
    }
    if targets.is_empty() {
        return Vec::new();
    }
    let mut b = super::builder_for(graph, opset);
    let mut state = Vec::new();
    let mut rewritten: Vec<Option<Vec<pb::NodeProto>>> = vec![None; graph.node.len()];
    for index in targets {
        let node = &graph.node[index];
        let start = b.nodes.len();
        state.extend(decompose(&mut b, node));
        rewritten[index] = Some(b.nodes.drain(start..).collect());
    }
    let nodes = std::mem::take(&mut graph.node);
    for (node, replacement) in nodes.into_iter().zip(rewritten) {
        match replacement {
            Some(replacement) => graph.node.extend(replacement),
            None => graph.node.push(node),
        }
    }
    graph.initializer.append(&mut b.initializers);
    state
}

/// The nodes of one BatchNormalization in training mode, over any rank >= 2 (viewed as [N, C, -1]).
fn decompose(b: &mut GraphBuilder, node: &pb::NodeProto) -> Vec<(String, String)> {
    let attr = |name: &str, default: f32| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.f)
            .unwrap_or(default)
    };
    let (epsilon, momentum) = (attr("epsilon", 1e-5), attr("momentum", 0.9));
    let [x, scale, bias, mean, var] = [0, 1, 2, 3, 4].map(|i| node.input[i].as_str());
    let y = node.output[0].as_str();
    let name = format!("bn_train/{y}");
    let x3 = b.reshape(x, &[0, 0, -1], &format!("{name}/x3"));
    let batch_mean = b.reduce_mean(&x3, &[0, 2], &format!("{name}/batch_mean"));
    let centred = b.sub(&x3, &batch_mean, &format!("{name}/centred"));
    let squared = b.square(&centred, &format!("{name}/squared"));
    let batch_var = b.reduce_mean(&squared, &[0, 2], &format!("{name}/batch_var"));
    let eps = b.scalar(&format!("{name}/epsilon"), epsilon);
    let shifted = b.add(&batch_var, &eps, &format!("{name}/var_eps"));
    let std = b.unary("Sqrt", &shifted, &format!("{name}/std"));
    let normalised = b.div(&centred, &std, &format!("{name}/normalised"));
    let scale3 = b.reshape(scale, &[1, -1, 1], &format!("{name}/scale3"));
    let bias3 = b.reshape(bias, &[1, -1, 1], &format!("{name}/bias3"));
    let scaled = b.mul(&normalised, &scale3, &format!("{name}/scaled"));
    let y3 = b.add(&scaled, &bias3, &format!("{name}/y3"));
    let shape = b.unary("Shape", x, &format!("{name}/shape"));
    b.node(
        "Reshape",
        &[&y3, &shape],
        &[y],
        vec![],
        &format!("{name}/y"),
    );

    // Running statistics: running * momentum + batch * (1 - momentum), the variance unbiased.
    let keep = b.scalar(&format!("{name}/momentum"), momentum);
    let take = b.scalar(&format!("{name}/one_minus_momentum"), 1.0 - momentum);
    let count = b.unary("Size", &x3, &format!("{name}/size"));
    let channels = b.unary("Size", scale, &format!("{name}/channels"));
    let per_channel = b.div(&count, &channels, &format!("{name}/count"));
    let per_channel = b.op(
        "Cast",
        &[&per_channel],
        vec![("to", Attr::Int(pb::tensor_proto::DataType::Float as i64))],
        &format!("{name}/count_f"),
    );
    let one = b.scalar(&format!("{name}/one"), 1.0);
    let less_one = b.sub(&per_channel, &one, &format!("{name}/count_minus_one"));
    let correction = b.div(&per_channel, &less_one, &format!("{name}/bessel"));
    let unbiased = b.mul(&batch_var, &correction, &format!("{name}/unbiased_var"));
    let mut state = Vec::new();
    for (running, batch) in [(mean, batch_mean), (var, unbiased)] {
        let flat = b.reshape(&batch, &[-1], &format!("{name}/{running}/flat"));
        let kept = b.mul(running, &keep, &format!("{name}/{running}/kept"));
        let taken = b.mul(&flat, &take, &format!("{name}/{running}/taken"));
        let next = b.unique(&format!("{running}_next"));
        b.node("Add", &[&kept, &taken], &[&next], vec![], &next);
        state.push((running.to_string(), next));
    }
    state
}
