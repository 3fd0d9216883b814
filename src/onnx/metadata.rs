//! The module scopes torch.export records in node `metadata_props`, which tract's message types drop.
//!
//! A second, shallow decode of the same bytes with messages that hold only what is needed
//! (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.output = 2 and metadata_props = 9, as
//! StringStringEntryProto key = 1, value = 2, from the ONNX spec); prost skips every other field
//! (initializers included) without decoding it.

use std::collections::HashMap;

use prost::Message;

/// The key under which torch.export writes a node's scopes: `['', 'layer1', 'layer1.0',
/// 'layer1.0.relu', 'relu_2']`, the module paths from the root down, then the FX node's name.
const NAME_SCOPES: &str = "pkg.torch.onnx.name_scopes";

#[derive(Clone, PartialEq, Message)]
struct ModelScopes {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphScopes>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphScopes {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeScopes>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeScopes {
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(message, repeated, tag = "9")]
    metadata_props: Vec<Entry>,
}

#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// The module path (`layer1.0.relu`) recorded for each output of a top-level node, for the nodes
/// whose metadata names a module below the root. Empty for exports that record none (TorchScript)
/// and for metadata that does not decode: module paths are then read from names alone.
pub fn recorded_modules(bytes: &[u8]) -> HashMap<String, String> {
    let Ok(model) = ModelScopes::decode(bytes) else {
        return HashMap::new();
    };
    let mut modules = HashMap::new();
    for node in model.graph.map(|g| g.node).unwrap_or_default() {
        let Some(path) = node
            .metadata_props
            .iter()
            .find(|e| e.key == NAME_SCOPES)
            .and_then(|e| innermost_module(&e.value))
        else {
            continue;
        };
        for output in node.output.into_iter().filter(|o| !o.is_empty()) {
            modules.insert(output, path.clone());
        }
    }
    modules
}

/// The innermost module of a `name_scopes` list: the entry before the last (the FX node's own
/// name); None at the root (`''`) or for a value that is not a list of quoted strings.
fn innermost_module(scopes: &str) -> Option<String> {
    let inner = scopes.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let end = rest[1..].find(quote)? + 1;
        items.push(&rest[1..end]);
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    let module = *items.len().checked_sub(2).and_then(|i| items.get(i))?;
    (!module.is_empty()).then(|| module.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_is_the_entry_before_the_node_name() {
        let scopes = "['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_2']";
        assert_eq!(innermost_module(scopes).as_deref(), Some("layer1.0.relu"));
        assert_eq!(
            innermost_module("['', 'layer1', 'layer1.1', 'add_1']").as_deref(),
            Some("layer1.1")
        );
        assert_eq!(
            innermost_module("[\"\", \"fc\", \"linear\"]").as_deref(),
            Some("fc")
        );
    }

    #[test]
    fn the_root_and_malformed_values_record_no_module() {
        assert_eq!(innermost_module("['', 'view']"), None);
        assert_eq!(innermost_module("['relu_2']"), None);
        assert_eq!(innermost_module("[]"), None);
        assert_eq!(innermost_module("layer1.0"), None);
        assert_eq!(innermost_module("['', 'layer1"), None);
    }

    #[test]
    fn node_metadata_is_read_from_the_model_bytes() {
        // Encoded here with the spec's field numbers, independently of the decoding messages.
        let entry = |key: &str, value: &str| {
            let mut e = Vec::new();
            prost::encoding::string::encode(1, &key.to_string(), &mut e);
            prost::encoding::string::encode(2, &value.to_string(), &mut e);
            e
        };
        let mut node = Vec::new();
        prost::encoding::string::encode(1, &"x".to_string(), &mut node); // input
        prost::encoding::string::encode(2, &"relu_2".to_string(), &mut node); // output
        prost::encoding::string::encode(4, &"Relu".to_string(), &mut node); // op_type
        let scopes = entry(NAME_SCOPES, "['', 'layer1', 'layer1.0.relu', 'relu_2']");
        prost::encoding::bytes::encode(9, &scopes, &mut node);
        prost::encoding::bytes::encode(9, &entry("other", "value"), &mut node);
        let mut graph = Vec::new();
        prost::encoding::bytes::encode(1, &node, &mut graph);
        prost::encoding::string::encode(2, &"g".to_string(), &mut graph); // name
        let mut model = Vec::new();
        prost::encoding::int64::encode(1, &8, &mut model); // ir_version
        prost::encoding::bytes::encode(7, &graph, &mut model);
        let modules = recorded_modules(&model);
        assert_eq!(modules.len(), 1);
        assert_eq!(modules["relu_2"], "layer1.0.relu");
        assert!(recorded_modules(b"\x3a\xff").is_empty());
    }
}
