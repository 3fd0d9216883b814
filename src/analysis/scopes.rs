//! The module a tensor belongs to, from the scopes PyTorch exporters leave in names.
//!
//! TorchScript exports name nodes by module path (`/layer1/layer1.0/conv1/Conv`); torch.export
//! exports name them generically but keep module paths in initializer names
//! (`layer1.0.conv1.weight`). Parameter-free nodes without a scope of their own take the scope
//! of the data that flows into them.

use super::dataflow::Dataflow;
use crate::onnx::pb;

/// How far upstream a parameter-free node looks for a scope before giving up.
const MAX_HOPS: usize = 16;

/// The dotted module path of the node producing `tensor` (`layer1.0.conv1`), if one can be found.
pub fn module_path(flow: &Dataflow, tensor: &str) -> Option<String> {
    let mut current = flow.producer(tensor)?;
    for _ in 0..MAX_HOPS {
        if let Some(path) = own_path(flow, current) {
            return Some(path);
        }
        let input = flow.data_inputs(current).next()?;
        current = flow.producer(input)?;
    }
    None
}

/// The first `depth` components of a tensor's module path (`layer1` at depth 1, `layer1.0` at 2).
pub fn scope(flow: &Dataflow, tensor: &str, depth: usize) -> Option<String> {
    let path = module_path(flow, tensor)?;
    Some(path.split('.').take(depth).collect::<Vec<_>>().join("."))
}

fn own_path(flow: &Dataflow, node: &pb::NodeProto) -> Option<String> {
    // `/layer1/layer1.0/conv1/Conv`: the components before the op. A component that extends
    // the previous one (`layer1` then `layer1.0`) replaces it.
    if node.name.starts_with('/') {
        let components: Vec<&str> = node.name.split('/').filter(|p| !p.is_empty()).collect();
        if components.len() >= 2 {
            let mut parts: Vec<&str> = Vec::new();
            for component in &components[..components.len() - 1] {
                if parts
                    .last()
                    .is_some_and(|last| component.starts_with(&format!("{last}.")))
                {
                    parts.pop();
                }
                parts.push(component);
            }
            return Some(parts.join("."));
        }
    }
    // `layer1.0.conv1.weight` read by the node.
    node.input
        .iter()
        .filter(|i| !flow.is_data(i) && i.contains('.') && flow.is_initializer(i))
        .find_map(|i| i.rsplit_once('.').map(|(path, _)| path.to_string()))
}
