//! The training step as one graph: a gradient graph whose parameters, optimizer moments and
//! BatchNorm running statistics become inputs, with the optimizer's update appended (AdamW or SGD,
//! exactly as torch.optim computes them) and every updated value an output `<name>_next`.
//! The learning rate (`lr`) and the step count (`step`, int64, AdamW) are scalar inputs, so a
//! schedule needs no new graph.

mod optimizer;

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::onnx::builder::GraphBuilder;
use crate::onnx::{edit, pb, proto};
use tract_onnx::prelude::{tensor0, Tensor};

pub use optimizer::Optimizer;

/// The step graph's learning-rate input (float32 scalar).
pub const LR: &str = "lr";
/// The step graph's step-count input (int64 scalar; 1 at the first step), for AdamW's bias correction.
pub const STEP: &str = "step";

/// A value the step graph reads and writes back: fed as `input`, returned as `output`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Carried {
    pub input: String,
    pub output: String,
    pub initial: Initial,
    pub dims: Vec<i64>,
}

/// What a carried value starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initial {
    /// The joint graph's initializer of the same name (parameters, running statistics).
    Initializer,
    /// Zeros of its dims (optimizer moments).
    Zeros,
}

/// A step graph and what it carries from step to step.
pub struct StepGraph {
    pub model: pb::ModelProto,
    /// Parameters, then their optimizer moments, then BatchNorm running statistics.
    pub carried: Vec<Carried>,
}

/// Turns `model` (a gradient graph: `gradients` are (parameter, gradient output) pairs,
/// `statistics` (running statistic, updated output) pairs) into a step graph for `optimizer`.
pub fn append_step(
    model: &pb::ModelProto,
    gradients: &[(String, String)],
    statistics: &[(String, String)],
    optimizer: &Optimizer,
) -> Result<StepGraph> {
    let mut model = model.clone();
    let opset = proto::onnx_opset(&model);
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::invalid_model("the gradient graph holds no graph"))?;
    for name in [LR, STEP] {
        if graph.input.iter().any(|i| i.name == name)
            || graph
                .node
                .iter()
                .any(|n| n.output.iter().any(|o| o == name))
        {
            return Err(Error::unsupported(format!(
                "the graph already has a tensor named `{name}`, which the step graph needs for its own input"
            )));
        }
    }
    let mut dims: HashMap<String, Vec<i64>> = HashMap::new();
    let carried_names: HashSet<&str> = gradients
        .iter()
        .map(|(p, _)| p.as_str())
        .chain(statistics.iter().map(|(s, _)| s.as_str()))
        .collect();
    graph.initializer.retain(|t| {
        if carried_names.contains(t.name.as_str()) {
            dims.insert(t.name.clone(), t.dims.clone());
            false
        } else {
            true
        }
    });
    let gradient_outputs: HashSet<&str> = gradients.iter().map(|(_, g)| g.as_str()).collect();
    graph
        .output
        .retain(|o| !gradient_outputs.contains(o.name.as_str()));

    let mut b = GraphBuilder::new(opset, proto::names_in(graph));
    let schedule = optimizer.schedule(&mut b);
    let mut carried = Vec::new();
    let mut new_outputs = Vec::new();
    for (parameter, gradient) in gradients {
        let shape = dims[parameter].clone();
        let update = optimizer.update(&mut b, &schedule, parameter, gradient);
        let next = b.unique(&format!("{parameter}_next"));
        b.node("Identity", &[&update.parameter], &[&next], vec![], &next);
        carried.push(Carried {
            input: parameter.clone(),
            output: next.clone(),
            initial: Initial::Initializer,
            dims: shape.clone(),
        });
        new_outputs.push((next, shape.clone()));
        for (moment, moment_next) in update.moments {
            carried.push(Carried {
                input: moment,
                output: moment_next.clone(),
                initial: Initial::Zeros,
                dims: shape.clone(),
            });
            new_outputs.push((moment_next, shape.clone()));
        }
    }
    for (statistic, next) in statistics {
        carried.push(Carried {
            input: statistic.clone(),
            output: next.clone(),
            initial: Initial::Initializer,
            dims: dims[statistic].clone(),
        });
    }
    for c in &carried {
        graph.input.push(float_info(&c.input, &c.dims));
    }
    graph.input.push(float_info(LR, &[]));
    if optimizer.needs_step() {
        graph.input.push(int64_info(STEP));
    }
    graph.node.append(&mut b.nodes);
    graph.initializer.append(&mut b.initializers);
    for (name, shape) in new_outputs {
        graph.output.push(float_info(&name, &shape));
    }
    edit::separate_node_names(graph);
    Ok(StepGraph { model, carried })
}

/// The values of the first step's carried and schedule inputs: parameters and statistics from
/// `joint`'s initializers, zero moments, lr 1e-3 and step 1.
pub fn first_step_values(
    joint: &pb::ModelProto,
    carried: &[Carried],
    optimizer: &Optimizer,
) -> HashMap<String, Tensor> {
    let initializers = joint
        .graph
        .as_ref()
        .map(proto::initializers)
        .unwrap_or_default();
    let mut values = HashMap::new();
    for c in carried {
        let dims: Vec<usize> = c.dims.iter().map(|&d| d as usize).collect();
        let count = dims.iter().product();
        let data = initializers
            .get(c.input.as_str())
            .filter(|_| c.initial == Initial::Initializer)
            .and_then(|t| proto::float_values(t))
            .unwrap_or_else(|| vec![0.0; count]);
        if let Ok(tensor) = Tensor::from_shape(&dims, &data) {
            values.insert(c.input.clone(), tensor);
        }
    }
    values.insert(LR.to_string(), tensor0(1e-3f32));
    if optimizer.needs_step() {
        values.insert(STEP.to_string(), tensor0(1i64));
    }
    values
}

fn float_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    proto::tensor_info(
        name,
        pb::tensor_proto::DataType::Float,
        proto::fixed_dims(dims),
    )
}

fn int64_info(name: &str) -> pb::ValueInfoProto {
    proto::tensor_info(name, pb::tensor_proto::DataType::Int64, [])
}
