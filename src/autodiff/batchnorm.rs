//! BatchNormalization on the trainable path in training mode, written with primitive operators:
//! normalise with the batch's statistics (biased variance), and compute the new running mean and
//! variance as torch does (unbiased variance), as outputs `<statistic>_next`. Its backward pass is
//! one closed-form rule over the whole decomposition, not the chain of its primitives' rules.

use std::collections::HashSet;

use crate::onnx::builder::{Attr, GraphBuilder};
use crate::onnx::pb;

/// One BatchNormalization rewritten into training mode: the tensors its backward pass reads.
pub struct TrainingBatchNorm {
    pub x: String,
    pub scale: String,
    pub bias: String,
    pub y: String,
    /// (x3 - batch mean) / batch std, [N, C, L].
    pub normalised: String,
    /// The batch std, sqrt(biased variance + epsilon), [1, C, 1].
    pub std: String,
    /// N * L as a float scalar: the elements per channel.
    pub count: String,
    /// Every tensor the decomposition computes (the walk visits none of their nodes but `y`'s).
    pub members: Vec<String>,
}

/// What the rewrite produced: the rewritten BatchNorms, and (running statistic, its updated
/// value's tensor) pairs.
#[derive(Default)]
pub struct TrainingMode {
    pub batchnorms: Vec<TrainingBatchNorm>,
    pub state: Vec<(String, String)>,
}

/// Rewrites every BatchNormalization that depends on a parameter (its input or its scale and
/// shift) into training mode.
pub fn training_mode(
    graph: &mut pb::GraphProto,
    parameters: &[String],
    opset: i64,
) -> TrainingMode {
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
    let mut result = TrainingMode::default();
    if targets.is_empty() {
        return result;
    }
    let mut b = super::builder_for(graph, opset);
    let mut rewritten: Vec<Option<Vec<pb::NodeProto>>> = vec![None; graph.node.len()];
    for index in targets {
        let node = &graph.node[index];
        let start = b.nodes.len();
        let (batchnorm, state) = decompose(&mut b, node);
        result.batchnorms.push(batchnorm);
        result.state.extend(state);
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
    result
}

/// The nodes of one BatchNormalization in training mode, over any rank >= 2 (viewed as [N, C, -1]).
fn decompose(
    b: &mut GraphBuilder,
    node: &pb::NodeProto,
) -> (TrainingBatchNorm, Vec<(String, String)>) {
    let start = b.nodes.len();
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
    let members = b.nodes[start..]
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    let batchnorm = TrainingBatchNorm {
        x: x.to_string(),
        scale: scale.to_string(),
        bias: bias.to_string(),
        y: y.to_string(),
        normalised,
        std,
        count: per_channel,
        members,
    };
    (batchnorm, state)
}

/// The adjoints of x, scale and bias from dy, in closed form over each channel's M elements:
/// dbias = sum(g), dscale = sum(g * xhat), dx = scale / std * (g - dbias / M - xhat * dscale / M).
pub fn backward(
    b: &mut GraphBuilder,
    bn: &TrainingBatchNorm,
    dy: &str,
    needs: [bool; 3],
) -> [Option<String>; 3] {
    let name = format!("grad/{}/bn", bn.y);
    let g = b.reshape(dy, &[0, 0, -1], &format!("{name}/g"));
    let dbias3 = b.reduce_sum(&g, &[0, 2], &format!("{name}/dbias3"));
    let gx = b.mul(&g, &bn.normalised, &format!("{name}/g_xhat"));
    let dscale3 = b.reduce_sum(&gx, &[0, 2], &format!("{name}/dscale3"));
    let dx = needs[0].then(|| {
        let mean_g = b.div(&dbias3, &bn.count, &format!("{name}/mean_g"));
        let mean_gx = b.div(&dscale3, &bn.count, &format!("{name}/mean_g_xhat"));
        let scale3 = b.reshape(&bn.scale, &[1, -1, 1], &format!("{name}/scale3"));
        let gain = b.div(&scale3, &bn.std, &format!("{name}/gain"));
        let along = b.mul(&bn.normalised, &mean_gx, &format!("{name}/along_xhat"));
        let centred = b.sub(&g, &mean_g, &format!("{name}/centred_g"));
        let orthogonal = b.sub(&centred, &along, &format!("{name}/orthogonal"));
        let dx3 = b.mul(&orthogonal, &gain, &format!("{name}/dx3"));
        let shape = b.unary("Shape", &bn.x, &format!("{name}/x_shape"));
        b.op("Reshape", &[&dx3, &shape], vec![], &format!("{name}/dx"))
    });
    let dscale = needs[1].then(|| b.reshape(&dscale3, &[-1], &format!("{name}/dscale")));
    let dbias = needs[2].then(|| b.reshape(&dbias3, &[-1], &format!("{name}/dbias")));
    [dx, dscale, dbias]
}
