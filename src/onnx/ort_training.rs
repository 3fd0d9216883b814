//! What ONNX Runtime Training 1.19.2 can differentiate, from its gradient-builder registry (the
//! data files in data/), and the check that every node between a trainable parameter and the
//! loss is one of those: a graph kdgraph writes must not die inside ORT Training later.

use std::collections::{HashMap, HashSet};

use super::{pb, proto};
use crate::error::{Error, Result};

/// ORT Training 1.19.2's registered gradient builders (gradient_builder_registry.cc).
const GRADIENTS: &str = include_str!("../../data/ort_training_1.19.2_gradients.tsv");
/// Its stop-gradient edges (gradient_graph_builder.cc): inputs that never receive a gradient.
const STOP_GRADIENT: &str = include_str!("../../data/ort_training_1.19.2_stop_gradient.tsv");

/// Ops ORT Training rewrites before differentiating (BatchNormalization -> BatchNormInternal,
/// LSTM -> LSTMTraining, GRU -> GRUTraining), so they train although no builder has their name.
const REPLACED_BEFORE_GRADIENTS: &[&str] = &["BatchNormalization", "LSTM", "GRU"];

/// The rows of a tab-separated data file, without comments and the header.
fn rows(text: &'static str) -> impl Iterator<Item = Vec<&'static str>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .skip(1)
        .map(|l| l.split('\t').collect())
}

/// How ORT Training handles an op on a trainable path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Support {
    /// A gradient builder with a CPU kernel.
    Trains,
    /// A gradient builder whose gradient has no CPU kernel (trains on CUDA only).
    GpuOnly,
    /// A gradient whose CPU kernel crashes with a symbolic batch.
    CrashesOnCpu,
}

struct Registry {
    ops: HashMap<&'static str, Support>,
    /// Op -> inputs that stop the gradient (None: all of them).
    stops: HashMap<&'static str, Option<Vec<usize>>>,
}

impl Registry {
    fn load() -> Self {
        let mut ops = HashMap::new();
        for row in rows(GRADIENTS) {
            let (op, domain) = (row[0], row.get(1).copied().unwrap_or(""));
            if !domain.is_empty() {
                continue;
            }
            let support = match row.get(4).copied().unwrap_or("") {
                "missing" => Support::GpuOnly,
                "measured-crash" => Support::CrashesOnCpu,
                _ => Support::Trains,
            };
            ops.insert(op, support);
        }
        for op in REPLACED_BEFORE_GRADIENTS {
            ops.insert(op, Support::Trains);
        }
        let stops = rows(STOP_GRADIENT)
            .map(|row| {
                let inputs = row
                    .get(1)
                    .map(|s| s.split(',').map(|i| i.trim().parse::<usize>()).collect());
                (
                    row[0],
                    inputs.and_then(|r: std::result::Result<Vec<_>, _>| r.ok()),
                )
            })
            .collect();
        Registry { ops, stops }
    }

    /// Whether input `slot` of `node` can carry a gradient.
    fn passes(&self, node: &pb::NodeProto, slot: usize) -> bool {
        if node.op_type == "Cast" {
            return cast_to_float(node);
        }
        match self.stops.get(node.op_type.as_str()) {
            Some(Some(inputs)) => !inputs.contains(&slot),
            Some(None) => false,
            None => true,
        }
    }
}

fn cast_to_float(node: &pb::NodeProto) -> bool {
    use pb::tensor_proto::DataType as T;
    let to = node.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
    to.is_some_and(|t| {
        [T::Float, T::Float16, T::Double, T::Bfloat16]
            .iter()
            .any(|d| *d as i64 == t)
    })
}

/// Checks every node through which a gradient flows from `parameters` to the loss (whose
/// ancestors are `reaching_loss`): its op must have an ORT Training gradient in the form it is
/// written. Returns warnings for ops that train on CUDA only. `shown` names the graph in messages.
pub fn check_trainable_path(
    graph: &pb::GraphProto,
    parameters: &[String],
    reaching_loss: &HashSet<&str>,
    shown: &str,
) -> Result<Vec<String>> {
    let registry = Registry::load();
    let mut trainable: HashSet<&str> = parameters.iter().map(String::as_str).collect();
    let mut warnings = Vec::new();
    // Nodes are in topological order: one pass carries "receives a gradient" forward.
    for node in &graph.node {
        let carries = node
            .input
            .iter()
            .enumerate()
            .any(|(slot, i)| trainable.contains(i.as_str()) && registry.passes(node, slot));
        if !carries
            || !node
                .output
                .iter()
                .any(|o| reaching_loss.contains(o.as_str()))
        {
            continue;
        }
        let label = proto::node_label(node);
        let refuse = |why: &str| {
            Err(Error::unsupported(format!(
                "`{shown}`: node `{label}` ({}) lies between a trainable parameter and the loss, and \
                 ONNX Runtime Training 1.19.2 {why}; re-export the student without it (or freeze the layers before it)",
                node.op_type
            )))
        };
        match registry.ops.get(node.op_type.as_str()) {
            None => return refuse("has no gradient for it"),
            Some(Support::CrashesOnCpu) => {
                return refuse("crashes computing its gradient on CPU when the batch size is symbolic")
            }
            Some(Support::GpuOnly) => warnings.push(format!(
                "node `{label}` ({}) has an ORT Training gradient on CUDA only: train this graph on a GPU",
                node.op_type
            )),
            Some(Support::Trains) => {}
        }
        if let Some(why) = unsupported_form(node) {
            return refuse(why);
        }
        trainable.extend(node.output.iter().map(String::as_str));
    }
    Ok(warnings)
}

/// Forms of differentiable ops that ORT Training's builders cannot handle (the registry's
/// `condition` column) and kdgraph does not rewrite.
fn unsupported_form(node: &pb::NodeProto) -> Option<&'static str> {
    let attribute = |name: &str| node.attribute.iter().find(|a| a.name == name);
    match node.op_type.as_str() {
        "LayerNormalization" if node.output.len() < 3 => {
            Some("differentiates LayerNormalization only with all three outputs")
        }
        "Split" if attribute("axis").is_none() => {
            Some("differentiates Split only with an explicit axis")
        }
        "Dropout" if node.output.len() < 2 => {
            Some("differentiates Dropout only with its mask output")
        }
        "Pad" if attribute("mode").is_some_and(|a| a.s != b"constant") => {
            Some("differentiates Pad only in constant mode")
        }
        "Transpose" if attribute("perm").is_none() => {
            Some("needs Transpose's perm attribute written out")
        }
        _ => None,
    }
}
