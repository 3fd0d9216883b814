//! The module a tensor belongs to, from the scopes PyTorch exporters leave in a model, and the
//! tensor a module path names.
//!
//! torch.export records each node's module path in its metadata (`pkg.torch.onnx.name_scopes`,
//! read by `onnx::metadata`); TorchScript exports name nodes by module path
//! (`/layer1/layer1.0/conv1/Conv`); exports without either keep module paths in initializer
//! names (`layer1.0.conv1.weight`). Parameter-free nodes without a scope of their own take the
//! scope of the data that flows into them.

use std::collections::{HashMap, HashSet};

use super::dataflow::Dataflow;
use crate::onnx::pb;

/// How far upstream a parameter-free node looks for a scope before giving up.
const MAX_HOPS: usize = 16;

/// A model's dataflow with the module paths its export recorded per node output.
pub struct Scopes<'f, 'a> {
    pub flow: &'f Dataflow<'a>,
    recorded: &'f HashMap<String, String>,
}

impl<'f, 'a> Scopes<'f, 'a> {
    pub fn new(flow: &'f Dataflow<'a>, recorded: &'f HashMap<String, String>) -> Self {
        Scopes { flow, recorded }
    }

    /// The dotted module path of the node producing `tensor` (`layer1.0.conv1`), if one can be found.
    pub fn module_path(&self, tensor: &str) -> Option<String> {
        let mut current = self.flow.producer(tensor)?;
        for _ in 0..MAX_HOPS {
            if let Some(path) = self.own_path(current) {
                return Some(path);
            }
            let input = self.flow.data_inputs(current).next()?;
            current = self.flow.producer(input)?;
        }
        None
    }

    /// The first `depth` components of a tensor's module path (`layer1` at depth 1, `layer1.0` at 2).
    pub fn scope(&self, tensor: &str, depth: usize) -> Option<String> {
        let path = self.module_path(tensor)?;
        Some(path.split('.').take(depth).collect::<Vec<_>>().join("."))
    }

    fn own_path(&self, node: &pb::NodeProto) -> Option<String> {
        if let Some(path) = node.output.iter().find_map(|o| self.recorded.get(o)) {
            return Some(path.clone());
        }
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
            .filter(|i| !self.flow.is_data(i) && i.contains('.') && self.flow.is_initializer(i))
            .find_map(|i| i.rsplit_once('.').map(|(path, _)| path.to_string()))
    }
}

/// Whether `path` is `module` or lies inside it (`layer1.0.relu` inside `layer1` and `layer1.0`).
pub fn within(path: &str, module: &str) -> bool {
    path.strip_prefix(module)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The output of a module: of the tensors whose module path lies within `module` (given in
/// graph order), the last on the main path (`main`, the tensors every path to the logits passes
/// through), else the last of all. None where no tensor lies within it.
pub fn module_output<'t>(
    modules: &'t [(String, String)],
    main: &HashSet<String>,
    module: &str,
) -> Option<&'t str> {
    let inside = || modules.iter().filter(|(_, path)| within(path, module));
    inside()
        .filter(|(tensor, _)| main.contains(tensor))
        .last()
        .or_else(|| inside().last())
        .map(|(tensor, _)| tensor.as_str())
}

/// Every module path (and each enclosing one) that a tensor lies within, once each.
pub fn all_paths(modules: &[(String, String)]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (_, path) in modules {
        let mut end = 0;
        for part in path.split('.') {
            end += part.len();
            let prefix = &path[..end];
            if seen.insert(prefix) {
                out.push(prefix.to_string());
            }
            end += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> Vec<(String, String)> {
        [
            ("conv", "layer3.0.conv1"),
            ("relu_a", "layer3.0.relu"),
            ("add", "layer3.0"),
            ("relu_b", "layer3.0.relu"),
            ("conv2", "layer3.1.conv1"),
            ("relu_c", "layer3.1.relu"),
            ("pool", "avgpool"),
        ]
        .iter()
        .map(|(t, m)| (t.to_string(), m.to_string()))
        .collect()
    }

    #[test]
    fn a_module_names_its_last_tensor_on_the_main_path() {
        let main: HashSet<String> = ["relu_b", "relu_c", "pool"].map(String::from).into();
        assert_eq!(module_output(&modules(), &main, "layer3"), Some("relu_c"));
        assert_eq!(module_output(&modules(), &main, "layer3.0"), Some("relu_b"));
        // Off the main path: the module's last tensor.
        assert_eq!(
            module_output(&modules(), &main, "layer3.0.conv1"),
            Some("conv")
        );
        assert_eq!(module_output(&modules(), &main, "layer"), None);
        assert_eq!(module_output(&modules(), &main, "layer4"), None);
    }

    #[test]
    fn paths_include_their_enclosing_modules() {
        let paths = all_paths(&modules());
        assert_eq!(
            paths,
            [
                "layer3",
                "layer3.0",
                "layer3.0.conv1",
                "layer3.0.relu",
                "layer3.1",
                "layer3.1.conv1",
                "layer3.1.relu",
                "avgpool"
            ]
        );
    }
}
