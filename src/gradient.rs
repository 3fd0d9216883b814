//! Gradient graphs kdgraph writes: a joint graph differentiated (`merge --emit gradients`), and
//! any classifier with a mean cross-entropy, or any model's own scalar output (`kdgraph grad`).

use std::collections::HashSet;

use serde::Serialize;

use crate::analysis::parameters;
use crate::analysis::shapes::{dim_values, Dim};
use crate::autodiff;
use crate::error::{Error, Result};
use crate::onnx::builder::GraphBuilder;
use crate::onnx::prepare::PreparedModel;
use crate::onnx::{edit, ort_forms, pb, proto};
use crate::plan::Role;
use crate::sidecar::{GradientFile, GradientOutput, StateOutput, LABELS, LOSS};

/// What `kdgraph grad` differentiates.
#[derive(Debug, Clone)]
pub enum Objective {
    /// The mean cross-entropy of the model's first output (logits [N, C]) at int64 `labels`.
    CrossEntropy,
    /// A scalar output the model already has.
    Output(String),
}

/// The sidecar of a gradient graph written by `kdgraph grad`.
#[derive(Debug, Clone, Serialize)]
pub struct GradSidecar {
    pub kdgraph_version: &'static str,
    pub model_hash: String,
    pub source: String,
    pub loss: String,
    pub inputs: Vec<Role>,
    pub gradients: Vec<GradientOutput>,
    pub state: Vec<StateOutput>,
    pub notes: Vec<String>,
}

/// A gradient graph and its sidecar.
pub struct GradGraph {
    pub model: pb::ModelProto,
    pub sidecar: GradSidecar,
}

/// `model` differentiated for `objective` with respect to `wrt` (default: its weights).
pub fn classifier_gradients(
    model: &PreparedModel,
    objective: &Objective,
    wrt: &[String],
) -> Result<GradGraph> {
    let shown = model.loaded.display();
    let mut proto = model.loaded.proto.clone();
    let opset = proto::onnx_opset(&proto);
    let graph = proto.graph.as_mut().expect("prepared models have graphs");
    // Exporters' value_info are hints that name the batch `batch`; tract refuses to unify such
    // a symbol with a concrete batch when it runs the graph, and inference finds the shapes anyway.
    graph.value_info.clear();
    let notes: Vec<String> = ort_forms::rewrite_for_ort_training(graph, opset)
        .into_iter()
        .map(|r| format!("`{shown}`: {r}"))
        .collect();
    let loss = match objective {
        Objective::CrossEntropy => add_cross_entropy(graph, opset, &shown)?,
        Objective::Output(name) => {
            if !graph.output.iter().any(|o| &o.name == name) {
                let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
                return Err(Error::usage(format!(
                    "`{shown}` has no output `{name}`; its outputs are {}",
                    outputs.join(", ")
                )));
            }
            name.clone()
        }
    };
    let parameters = choose_parameters(graph, model, &loss, wrt, &shown)?;
    let differentiated = autodiff::differentiate(&proto, &loss, &parameters, &shown)?;
    let inputs = input_roles(differentiated.model.graph.as_ref().expect("a graph"));
    Ok(GradGraph {
        model: differentiated.model,
        sidecar: GradSidecar {
            kdgraph_version: env!("CARGO_PKG_VERSION"),
            model_hash: String::new(),
            source: shown,
            loss,
            inputs,
            gradients: gradient_outputs(&differentiated.gradients),
            state: state_outputs(&differentiated.state),
            notes,
        },
    })
}

/// The joint graph of one stage differentiated with respect to its `requires_grad`.
pub fn joint_gradients(
    joint: &pb::ModelProto,
    requires_grad: &[String],
    shown: &str,
) -> Result<(pb::ModelProto, GradientFile)> {
    let differentiated = autodiff::differentiate(joint, LOSS, requires_grad, shown)?;
    let file = GradientFile {
        model: String::new(),
        model_hash: String::new(),
        gradients: gradient_outputs(&differentiated.gradients),
        state: state_outputs(&differentiated.state),
    };
    Ok((differentiated.model, file))
}

fn gradient_outputs(pairs: &[(String, String)]) -> Vec<GradientOutput> {
    pairs
        .iter()
        .map(|(parameter, output)| GradientOutput {
            parameter: parameter.clone(),
            output: output.clone(),
        })
        .collect()
}

fn state_outputs(pairs: &[(String, String)]) -> Vec<StateOutput> {
    pairs
        .iter()
        .map(|(statistic, output)| StateOutput {
            statistic: statistic.clone(),
            output: output.clone(),
        })
        .collect()
}

/// Appends `labels` (int64 [N]) and `loss`, the mean cross-entropy of the first output, placed
/// first among the outputs. Returns the loss's name.
fn add_cross_entropy(graph: &mut pb::GraphProto, opset: i64, shown: &str) -> Result<String> {
    let logits = graph
        .output
        .first()
        .map(|o| o.name.clone())
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` has no output")))?;
    let taken: Vec<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
        .collect();
    for name in [LABELS, LOSS] {
        if taken.iter().any(|t| t == name) {
            return Err(Error::unsupported(format!(
                "`{shown}` already has a tensor named `{name}`; use --loss to differentiate an output it has"
            )));
        }
    }
    let batch = batch_dim(graph);
    let mut b = GraphBuilder::new(opset, taken);
    let ce = b.cross_entropy(&logits, LABELS, "grad_ce");
    b.node("Identity", &[&ce], &[LOSS], vec![], LOSS);
    graph.node.append(&mut b.nodes);
    graph.initializer.append(&mut b.initializers);
    graph.input.push(proto::tensor_info(
        LABELS,
        pb::tensor_proto::DataType::Int64,
        dim_values(&[batch]),
    ));
    graph.output.insert(
        0,
        proto::tensor_info(LOSS, pb::tensor_proto::DataType::Float, []),
    );
    Ok(LOSS.to_string())
}

/// The first dim of the first input that is not an initializer (the batch).
fn batch_dim(graph: &pb::GraphProto) -> Dim {
    use pb::tensor_shape_proto::dimension::Value;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .find(|i| !initializers.contains(i.name.as_str()))
        .and_then(|i| match i.r#type.as_ref()?.value.as_ref()? {
            pb::type_proto::Value::TensorType(t) => t.shape.as_ref()?.dim.first().cloned(),
        })
        .and_then(|d| match d.value? {
            Value::DimValue(n) => Some(Dim::Fixed(n)),
            Value::DimParam(s) => Some(Dim::Symbol(s)),
        })
        .unwrap_or(Dim::Symbol("N".into()))
}

/// `wrt` as given (each must exist), else the model's weights that the loss reads.
fn choose_parameters(
    graph: &pb::GraphProto,
    model: &PreparedModel,
    loss: &str,
    wrt: &[String],
    shown: &str,
) -> Result<Vec<String>> {
    let initializers = proto::initializers(graph);
    if !wrt.is_empty() {
        for name in wrt {
            if !initializers.contains_key(name.as_str()) {
                return Err(Error::usage(format!(
                    "--wrt `{name}`: `{shown}` has no initializer of that name"
                )));
            }
        }
        return Ok(wrt.to_vec());
    }
    let statistics: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .chain(model.running_statistics.iter().cloned())
        .collect();
    let reaching = edit::ancestors(graph, loss);
    let chosen: Vec<String> = parameters::trainable_weights(graph, &statistics)
        .into_iter()
        .filter(|p| reaching.contains(p.as_str()))
        .collect();
    if chosen.is_empty() {
        return Err(Error::unsupported(format!(
            "`{shown}` has no weights that `{loss}` depends on; name them with --wrt"
        )));
    }
    Ok(chosen)
}

/// The inputs a caller feeds (not initializers), with their types and shapes.
fn input_roles(graph: &pb::GraphProto) -> Vec<Role> {
    use pb::tensor_shape_proto::dimension::Value;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .map(|i| {
            let (dtype, shape) = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(t)) => (
                    proto::dtype_name(t.elem_type),
                    t.shape
                        .as_ref()
                        .map(|s| {
                            s.dim
                                .iter()
                                .map(|d| match &d.value {
                                    Some(Value::DimValue(n)) => Dim::Fixed(*n),
                                    Some(Value::DimParam(p)) => Dim::Symbol(p.clone()),
                                    None => Dim::Symbol("?".into()),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                ),
                None => ("unknown", Vec::new()),
            };
            let role = if i.name == LABELS { "labels" } else { "input" };
            Role::new(&i.name, role, dtype, shape)
        })
        .collect()
}
