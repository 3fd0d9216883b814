//! The top-level module a tensor belongs to, from the scopes PyTorch exporters leave in names.
//!
//! TorchScript exports name nodes by module path (`/layer1/layer1.0/conv1/Conv`); torch.export
//! exports name them generically but keep module paths in initializer names
//! (`layer1.0.conv1.weight`). Parameter-free nodes at the top level take the scope of the data
//! that flows into them.

use super::dataflow::Dataflow;
use crate::onnx::pb;

/// How far upstream a parameter-free node looks for a scope before giving up.
const MAX_HOPS: usize = 16;

pub fn top_level_scope(flow: &Dataflow, tensor: &str) -> Option<String> {
    let mut current = flow.producer(tensor)?;
    for _ in 0..MAX_HOPS {
        if let Some(scope) = own_scope(flow, current) {
            return Some(scope);
        }
        let input = flow.data_inputs(current).next()?;
        current = flow.producer(input)?;
    }
    None
}

fn own_scope(flow: &Dataflow, node: &pb::NodeProto) -> Option<String> {
    // `/layer1/layer1.0/conv1/Conv`: the first component, when there is a module below the op.
    let parts: Vec<&str> = node.name.split('/').filter(|p| !p.is_empty()).collect();
    if node.name.starts_with('/') && parts.len() >= 2 {
        return Some(parts[0].to_string());
    }
    // `layer1.0.conv1.weight` read by the node.
    node.input
        .iter()
        .filter(|i| !flow.is_data(i) && i.contains('.'))
        .filter(|i| flow.graph.initializer.iter().any(|t| &t.name == *i))
        .map(|i| i.split('.').next().unwrap_or_default().to_string())
        .next()
}
