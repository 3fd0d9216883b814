//! Rewrites that put an exported model into the form both runtimes accept: inference-form BatchNorm.

use std::collections::HashSet;

use super::pb;
use crate::error::{Error, Result};

/// Rewrites every training-mode BatchNormalization (training_mode=1, three outputs) into the
/// inference form (one output). Returns the names of the rewritten nodes' running statistics.
///
/// A training-mode export's running-statistics outputs are never read by the network itself; one
/// that is read (or is a graph output) cannot be dropped and is reported as an error.
pub fn inference_batchnorm(graph: &mut pb::GraphProto, model: &str) -> Result<Vec<String>> {
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    let mut statistics = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type == "BatchNormalization") {
        let training = node.attribute.iter().any(|a| a.name == "training_mode" && a.i == 1);
        if !training && node.output.len() <= 1 {
            continue;
        }
        if let Some(used) = node.output.iter().skip(1).find(|o| !o.is_empty() && read.contains(*o)) {
            return Err(Error::input(format!(
                "`{model}`: BatchNormalization `{}` feeds its running statistic `{used}` to other nodes; \
                 export the model without reading running statistics",
                node.name
            )));
        }
        node.output.truncate(1);
        node.attribute.retain(|a| a.name != "training_mode");
        statistics.extend(node.input.iter().skip(3).take(2).cloned());
    }
    Ok(statistics)
}
