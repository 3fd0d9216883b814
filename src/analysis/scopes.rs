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
    /// The module paths of TorchScript node names as written (`layer1.0.relu_1`), with every
    /// enclosing module.
    named: HashSet<String>,
    /// Modules that hold parameters, with every enclosing module (`layer1.0.conv1`, `layer1.0`, ...).
    with_parameters: HashSet<String>,
}

impl<'f, 'a> Scopes<'f, 'a> {
    pub fn new(flow: &'f Dataflow<'a>, recorded: &'f HashMap<String, String>) -> Self {
        let paths: Vec<String> = flow
            .graph
            .node
            .iter()
            .filter_map(|n| name_path(&n.name))
            .collect();
        let named = paths
            .iter()
            .flat_map(|p| enclosing(p))
            .map(str::to_string)
            .collect();
        let with_parameters = flow
            .graph
            .initializer
            .iter()
            .filter_map(|t| t.name.rsplit_once('.').map(|(path, _)| path))
            .flat_map(enclosing)
            .map(str::to_string)
            .collect();
        Scopes {
            flow,
            recorded,
            named,
            with_parameters,
        }
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
        if let Some(path) = name_path(&node.name) {
            return Some(self.first_call(&path));
        }
        // `layer1.0.conv1.weight` read by the node.
        node.input
            .iter()
            .filter(|i| !self.flow.is_data(i) && i.contains('.') && self.flow.is_initializer(i))
            .find_map(|i| i.rsplit_once('.').map(|(path, _)| path.to_string()))
    }
}

impl Scopes<'_, '_> {
    /// TorchScript names the second call of a module `relu_1`, the third `relu_2`: the module's
    /// own path (`layer1.0.relu`, as torch.export records it) where a sibling of that name is
    /// named too and `relu_1` holds no parameters of its own (then it is a module of its own).
    fn first_call(&self, path: &str) -> String {
        let mut out = String::new();
        for part in path.split('.') {
            let own = format!("{out}{part}");
            let base = part
                .rsplit_once('_')
                .filter(|(base, n)| {
                    !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                })
                .map(|(base, _)| base);
            let called = base.filter(|base| {
                !self.with_parameters.contains(&own) && self.named.contains(&format!("{out}{base}"))
            });
            out.push_str(called.unwrap_or(part));
            out.push('.');
        }
        out.pop();
        out
    }
}

/// The module path of a TorchScript node name: `/layer1/layer1.0/conv1/Conv` is `layer1.0.conv1`,
/// the components before the op, where a component that extends the previous one (`layer1` then
/// `layer1.0`) replaces it. None for other names and for nodes at the root (`/Flatten`).
fn name_path(name: &str) -> Option<String> {
    if !name.starts_with('/') {
        return None;
    }
    let components: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    if components.len() < 2 {
        return None;
    }
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
    Some(parts.join("."))
}

/// `layer1.0.conv1` and the modules that enclose it: `layer1.0`, `layer1`.
fn enclosing(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('.')
        .map(|(i, _)| &path[..i])
        .chain(std::iter::once(path))
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
        for prefix in enclosing(path) {
            if seen.insert(prefix) {
                out.push(prefix.to_string());
            }
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
    fn torchscript_names_give_module_paths_with_repeated_calls_folded() {
        let node = |name: &str, input: &str, output: &str| pb::NodeProto {
            name: name.into(),
            input: vec![input.into()],
            output: vec![output.into()],
            ..Default::default()
        };
        let graph = pb::GraphProto {
            node: vec![
                node("/block/relu/Relu", "x", "a"),
                node("/block/relu_1/Relu", "a", "b"),
                node("/block/conv/Conv", "b", "c"),
                node("/block/conv_1/Conv", "c", "d"),
                node("/block/act_1/Relu", "d", "e"),
                node("/Flatten", "e", "f"),
            ],
            input: vec![pb::ValueInfoProto {
                name: "x".into(),
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "block.conv_1.weight".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let flow = Dataflow::new(&graph);
        let recorded = HashMap::from([("c".to_string(), "block.recorded".to_string())]);
        let scopes = Scopes::new(&flow, &recorded);
        let path = |t: &str| scopes.module_path(t);
        // The second call of `relu` is `relu`; `conv_1` holds parameters: a module of its own;
        // `act_1` has no `act` beside it.
        assert_eq!(path("a").as_deref(), Some("block.relu"));
        assert_eq!(path("b").as_deref(), Some("block.relu"));
        assert_eq!(path("c").as_deref(), Some("block.recorded"));
        assert_eq!(path("d").as_deref(), Some("block.conv_1"));
        assert_eq!(path("e").as_deref(), Some("block.act_1"));
        // A node at the root takes the scope of its input.
        assert_eq!(path("f").as_deref(), Some("block.act_1"));
        assert_eq!(scopes.scope("b", 1).as_deref(), Some("block"));
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
