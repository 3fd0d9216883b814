//! Finding the taps of one model along its chain of cut tensors: the stem and stage ends (with
//! their pre-ReLU points), the embedding that feeds the classifier, and the logits.

use std::collections::HashMap;

use super::dataflow::Dataflow;
use super::scopes::Scopes;
use super::shapes::{fixed, Shape};
use crate::error::{Error, Result};
use crate::onnx::{pb, proto};

/// Activations that may close a conv unit or a head.
const ACTIVATIONS: [&str; 9] = [
    GATED,
    "Relu",
    "Clip",
    "LeakyRelu",
    "HardSwish",
    "Sigmoid",
    "Elu",
    "Selu",
    "Gelu",
];

/// Where a model can be tapped, as tensor names.
#[derive(Debug, Clone)]
pub struct Taps {
    /// Stem first (RepDistiller's `f0`), then the end of each stage.
    pub spatial: Vec<String>,
    pub embedding: String,
    pub logits: String,
    /// Observations worth showing the user (a head that was skipped, a merged stem, ...).
    pub notes: Vec<String>,
    /// The main path: the tensors every data path from the input to the logits passes through.
    pub main_path: Vec<String>,
}

/// Ops that may stand between a convolutional classifier and the logits.
const AFTER_CONV_CLASSIFIER: [&str; 10] = [
    "Relu",
    "GlobalAveragePool",
    "AveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Dropout",
    "Identity",
    "Softmax",
];

/// The cut written by a 1x1 convolution with one output channel per class, after which only
/// activation, pooling and reshaping lead to the logits (SqueezeNet, DLA): a classifier.
fn conv_classifier(
    flow: &Dataflow,
    cuts: &[&str],
    shapes: &HashMap<String, Shape>,
) -> Option<usize> {
    let classes = shapes.get(*cuts.last()?)?.get(1).and_then(fixed)?;
    let i = cuts
        .iter()
        .rposition(|t| flow.producer(t).is_some_and(|n| n.op_type == "Conv"))?;
    let conv = flow.producer(cuts[i])?;
    let pointwise =
        proto::attr_ints(conv, "kernel_shape").is_some_and(|k| k.iter().all(|&d| d == 1));
    let per_class = shapes.get(cuts[i]).and_then(|s| s.get(1)).and_then(fixed) == Some(classes);
    let only_pooling = cuts[i + 1..].iter().all(|t| {
        flow.producer(t)
            .is_some_and(|n| AFTER_CONV_CLASSIFIER.contains(&n.op_type.as_str()))
    });
    (pointwise && per_class && only_pooling).then_some(i)
}

/// Finds the taps of a model from its dataflow and tensor shapes.
pub fn find_taps(
    scopes: &Scopes,
    shapes: &HashMap<String, Shape>,
    logits: &str,
    shown: &str,
) -> Result<Taps> {
    let flow = scopes.flow;
    let cuts = flow.cuts_to(logits);
    let mut notes = Vec::new();
    let classifier = cuts
        .iter()
        .rposition(|t| {
            flow.producer(t)
                .is_some_and(|n| n.op_type == "Gemm" || n.op_type == "MatMul")
        })
        .or_else(|| {
            let i = conv_classifier(flow, &cuts, shapes)?;
            notes.push(format!(
                "the classifier is the 1x1 convolution that writes `{}`, followed by pooling: the embedding is \
                 the map it reads, averaged over space by the methods that read an embedding",
                cuts[i]
            ));
            Some(i)
        });
    let embedding = match classifier {
        Some(i) => {
            // The classifier's own input: after a training-mode Dropout where the export kept one.
            let node = flow.producer(cuts[i]).expect("a cut has a producer");
            flow.data_inputs(node).next().unwrap_or(cuts[i.saturating_sub(1)]).to_string()
        }
        None => cuts
            .iter()
            .rev()
            .skip(1)
            .find(|t| shapes.get(**t).is_some_and(|s| s.len() == 2))
            .map(|t| t.to_string())
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "`{shown}`: no classifier (Gemm or MatMul) and no 2-D embedding found before the logits `{logits}`"
                ))
            })?,
    };
    let before_embedding = cuts
        .iter()
        .position(|t| *t == embedding)
        .unwrap_or(cuts.len());
    let spatial_cuts: Vec<&str> = cuts[..before_embedding]
        .iter()
        .copied()
        .filter(|t| spatial_size(shapes.get(*t)).is_some_and(|(h, w)| h * w > 1))
        .collect();
    if spatial_cuts.is_empty() {
        return Err(Error::unsupported(format!(
            "`{shown}`: no spatial feature map (N x C x H x W with H*W > 1) lies on every path from the input to the logits; \
             kdgraph needs a convolutional network (check that the input has fixed H and W)"
        )));
    }
    let mut groups = group_by_resolution(&spatial_cuts, shapes);
    // A resolution reached by pooling alone, with no learned op after the previous stage (VGG's
    // adaptive pool after its last max-pool), is not a stage of its own.
    let mut k = 1;
    while k < groups.len() {
        let previous = *groups[k - 1].last().expect("groups are not empty");
        let current = *groups[k].last().expect("groups are not empty");
        if flow.learns_between(previous, current) {
            k += 1;
        } else {
            groups.remove(k);
        }
    }

    let last_group = groups.len() - 1;
    let mut spatial: Vec<String> = Vec::with_capacity(groups.len() + 1);
    for (index, group) in groups.iter().enumerate() {
        let end = group.last().expect("groups are not empty");
        match before_trailing_unit(flow, group) {
            Some(stage_end) => {
                notes.push(if index == last_group {
                    format!("the head after `{stage_end}` (1x1 conv or final BN/activation before pooling) is not a stage")
                } else {
                    format!("`{end}` opens the next stage (pre-activation or expansion before the stride); the stage ends at `{stage_end}`")
                });
                spatial.push(stage_end.to_string());
            }
            None => spatial.push(end.to_string()),
        }
    }

    let first_stage = spatial[0].clone();
    if let Some(stem) = first_unit_end(scopes, &groups[0], &first_stage) {
        if stem != first_stage {
            if told_apart(scopes, shapes, stem, &first_stage) {
                spatial.insert(0, stem.to_string());
            } else {
                notes.push(format!(
                    "the stem cannot be told apart from the first stage (same resolution, channels and module); `{first_stage}` is taken as the stem"
                ));
            }
        }
    }
    Ok(Taps {
        spatial,
        embedding,
        logits: logits.to_string(),
        notes,
        main_path: cuts.iter().map(|t| t.to_string()).collect(),
    })
}

/// (H, W) of an NCHW tensor with fixed spatial dims.
fn spatial_size(shape: Option<&Shape>) -> Option<(i64, i64)> {
    match shape?.as_slice() {
        [_, _, h, w] => Some((fixed(h)?, fixed(w)?)),
        _ => None,
    }
}

fn channels(shapes: &HashMap<String, Shape>, tensor: &str) -> Option<i64> {
    shapes.get(tensor).and_then(|s| s.get(1)).and_then(fixed)
}

/// Consecutive runs of cut tensors that share a spatial resolution.
fn group_by_resolution<'a>(cuts: &[&'a str], shapes: &HashMap<String, Shape>) -> Vec<Vec<&'a str>> {
    let mut groups: Vec<Vec<&str>> = Vec::new();
    let mut current = None;
    for &cut in cuts {
        let size = spatial_size(shapes.get(cut));
        match groups.last_mut() {
            Some(group) if size == current => group.push(cut),
            _ => groups.push(vec![cut]),
        }
        current = size;
    }
    groups
}

/// The op that writes a tensor; a gated activation written as `x * g(x)` (SiLU, HardSwish as
/// exported or as kdgraph rewrites it) counts as one activation, [`GATED`].
fn op_of<'a>(flow: &Dataflow<'a>, tensor: &str) -> &'a str {
    match flow.producer(tensor) {
        Some(node) if is_gated_activation(flow, node) => GATED,
        Some(node) => node.op_type.as_str(),
        None => "",
    }
}

/// The name [`op_of`] gives a gated activation `x * g(x)`.
const GATED: &str = "GatedActivation";

/// Elementwise ops a gate `g(x)` may be built of.
const GATE_OPS: [&str; 8] = [
    "Sigmoid",
    "HardSigmoid",
    "Clip",
    "Add",
    "Mul",
    "Div",
    "Tanh",
    "Relu",
];

/// `Mul(x, g)` where `g` comes from `x` alone through a few elementwise ops: SiLU
/// (`x * Sigmoid(x)`), HardSwish as `x * Clip(x / 6 + 0.5, 0, 1)`.
fn is_gated_activation(flow: &Dataflow, node: &pb::NodeProto) -> bool {
    if node.op_type != "Mul" {
        return false;
    }
    let inputs: Vec<&str> = flow.data_inputs(node).collect();
    let [a, b] = inputs.as_slice() else {
        return false;
    };
    let derives_from = |gate: &str, x: &str| {
        let mut t = gate.to_string();
        for _ in 0..4 {
            let Some(p) = flow.producer(&t) else {
                return false;
            };
            let data: Vec<&str> = flow.data_inputs(p).collect();
            if !GATE_OPS.contains(&p.op_type.as_str()) || data.len() != 1 {
                return false;
            }
            if data[0] == x {
                return true;
            }
            t = data[0].to_string();
        }
        false
    };
    derives_from(b, a) || derives_from(a, b)
}

/// The end of the first conv unit in a group: the first Conv, then the BatchNormalization and
/// activations after it. When that unit does not reach the first stage's end, it stops where
/// nodes of the first stage's block begin (as a WideResNet's pre-activation BN does).
fn first_unit_end<'a>(scopes: &Scopes, group: &[&'a str], first_stage: &str) -> Option<&'a str> {
    let flow = scopes.flow;
    let start = group.iter().position(|t| op_of(flow, t) == "Conv")?;
    let extends = |i: usize| {
        i + 1 < group.len() && {
            let op = op_of(flow, group[i + 1]);
            op == "BatchNormalization" || ACTIVATIONS.contains(&op)
        }
    };
    let mut end = start;
    while extends(end) {
        end += 1;
    }
    if group[end] == first_stage {
        return Some(group[end]);
    }
    let stage_block = scopes.scope(first_stage, 2);
    let mut end = start;
    while extends(end) && (stage_block.is_none() || scopes.scope(group[end + 1], 2) != stage_block)
    {
        end += 1;
    }
    Some(group[end])
}

/// The stem is a stage of its own where channel count or module scope tells it from the first stage.
fn told_apart(
    scopes: &Scopes,
    shapes: &HashMap<String, Shape>,
    stem: &str,
    first_stage: &str,
) -> bool {
    channels(shapes, stem) != channels(shapes, first_stage)
        || scopes.scope(stem, 1) != scopes.scope(first_stage, 1)
}

/// Where a group ends in a unit that is not part of its stage, the tensor before that unit. Such a
/// unit is a trailing 1x1 conv (+ BN, activation): MobileNet's expansion that opens the next
/// block, or the head before pooling; or a BN + activation after a non-conv op: a pre-activation
/// block's opening, or a WideResNet's final BN + ReLU.
fn before_trailing_unit<'a>(flow: &Dataflow, group: &[&'a str]) -> Option<&'a str> {
    let mut i = group.len() - 1;
    while i > 0 && ACTIVATIONS.contains(&op_of(flow, group[i])) {
        i -= 1;
    }
    let mut saw_batchnorm = false;
    if i > 0 && op_of(flow, group[i]) == "BatchNormalization" {
        saw_batchnorm = true;
        i -= 1;
    }
    if i > 0 && is_pointwise_conv(flow, group[i]) {
        return Some(group[i - 1]);
    }
    if saw_batchnorm && op_of(flow, group[i]) != "Conv" {
        return Some(group[i]);
    }
    None
}

fn is_pointwise_conv(flow: &Dataflow, tensor: &str) -> bool {
    let Some(node) = flow.producer(tensor).filter(|n| n.op_type == "Conv") else {
        return false;
    };
    if let Some(kernel) = proto::attr_ints(node, "kernel_shape") {
        return kernel.iter().all(|&k| k == 1);
    }
    let weight = node.input.get(1).map(String::as_str).unwrap_or("");
    flow.graph
        .initializer
        .iter()
        .find(|t| t.name == weight)
        .is_some_and(|t| t.dims.len() == 4 && t.dims[2] == 1 && t.dims[3] == 1)
}

/// The pre-ReLU point of a stage end: the input of the Relu that produces it.
pub fn pre_relu<'a>(flow: &Dataflow<'a>, tensor: &str) -> Option<&'a str> {
    let node: &'a pb::NodeProto = flow.producer(tensor).filter(|n| n.op_type == "Relu")?;
    node.input.first().map(String::as_str)
}

/// The pre-activation point after a stage end that is not a ReLU's output: in a pre-activation
/// network (WideResNet, pre-act ResNet) the next block opens with BatchNorm then ReLU, and the
/// tensor before that ReLU is the BN's output (RepDistiller's WRN `preact` feats, and the BN
/// that clovaai's OFD takes its margins from).
pub fn preactivation<'a>(flow: &Dataflow<'a>, tensor: &str) -> Option<&'a str> {
    flow.consumers(tensor)
        .filter(|n| {
            n.op_type == "BatchNormalization" && n.input.first().is_some_and(|i| i == tensor)
        })
        .filter_map(|bn| bn.output.first().map(String::as_str))
        .find(|out| flow.consumers(out).any(|n| n.op_type == "Relu"))
}
