//! Rewrites that put an exported model into the form both runtimes accept: inference-form BatchNorm.

use std::collections::{HashMap, HashSet};

use super::builder::GraphBuilder;
use super::{pb, proto};
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
    for node in graph
        .node
        .iter_mut()
        .filter(|n| n.op_type == "BatchNormalization")
    {
        let training = node
            .attribute
            .iter()
            .any(|a| a.name == "training_mode" && a.i == 1);
        if !training && node.output.len() <= 1 {
            continue;
        }
        if let Some(used) = node
            .output
            .iter()
            .skip(1)
            .find(|o| !o.is_empty() && read.contains(*o))
        {
            return Err(Error::invalid_model(format!(
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

/// Rewrites every AveragePool whose window covers its whole (fixed-size) input map, without
/// padding, as GlobalAveragePool: the same values, and ORT Training's AveragePool gradient is
/// broken on CPU when the batch is symbolic. Returns how many nodes were rewritten.
pub fn global_average_pool(
    graph: &mut pb::GraphProto,
    spatial_size: impl Fn(&str) -> Option<(i64, i64)>,
) -> usize {
    let mut rewritten = 0;
    for node in graph.node.iter_mut().filter(|n| n.op_type == "AveragePool") {
        let kernel = super::proto::attr_ints(node, "kernel_shape").map(<[i64]>::to_vec);
        let unpadded =
            super::proto::attr_ints(node, "pads").is_none_or(|p| p.iter().all(|&v| v == 0));
        let auto_pad = node
            .attribute
            .iter()
            .find(|a| a.name == "auto_pad")
            .map(|a| a.s.clone())
            .unwrap_or_default();
        let covers = match (kernel.as_deref(), spatial_size(&node.input[0])) {
            (Some([kh, kw]), Some((h, w))) => *kh == h && *kw == w,
            _ => false,
        };
        if covers && unpadded && (auto_pad.is_empty() || auto_pad == b"NOTSET") {
            node.op_type = "GlobalAveragePool".into();
            node.attribute.clear();
            rewritten += 1;
        }
    }
    rewritten
}

/// Gives the first graph input the sizes `dims` for every axis but the batch (axis 0), for models
/// exported with symbolic spatial sizes.
pub fn fix_input_shape(graph: &mut pb::GraphProto, dims: &[i64], model: &str) -> Result<()> {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let Some(input) = graph
        .input
        .iter_mut()
        .find(|i| !initializers.contains(i.name.as_str()))
    else {
        return Err(Error::invalid_model(format!(
            "`{model}` has no graph input to give --input-shape to"
        )));
    };
    let name = input.name.clone();
    let shape = match input.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        Some(pb::type_proto::Value::TensorType(t)) => t.shape.get_or_insert_with(Default::default),
        None => {
            return Err(Error::invalid_model(format!(
                "`{model}`: input `{name}` has no tensor type"
            )))
        }
    };
    if !shape.dim.is_empty() && shape.dim.len() != dims.len() + 1 {
        return Err(Error::usage(format!(
            "--input-shape gives {} sizes but input `{name}` of `{model}` has {} axes besides the batch",
            dims.len(),
            shape.dim.len().saturating_sub(1)
        )));
    }
    let batch = shape.dim.first().cloned().unwrap_or(Dimension {
        value: Some(Value::DimParam("N".into())),
        ..Default::default()
    });
    shape.dim = std::iter::once(batch)
        .chain(dims.iter().map(|&d| Dimension {
            value: Some(Value::DimValue(d)),
            ..Default::default()
        }))
        .collect();
    Ok(())
}

/// Turns every Dropout into an Identity (a teacher runs in eval mode). A Dropout whose mask
/// output is read cannot be rewritten and is an error.
pub fn inference_dropout(graph: &mut pb::GraphProto, model: &str) -> Result<()> {
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    for node in graph.node.iter_mut().filter(|n| n.op_type == "Dropout") {
        if let Some(mask) = node
            .output
            .get(1)
            .filter(|m| !m.is_empty() && read.contains(*m))
        {
            return Err(Error::invalid_model(format!(
                "`{model}`: Dropout `{}` feeds its mask `{mask}` to other nodes; export the teacher in eval mode",
                node.name
            )));
        }
        node.op_type = "Identity".into();
        node.input.truncate(1);
        node.output.truncate(1);
        node.attribute.clear();
    }
    Ok(())
}

/// Whether a graph has Dropout or random draws, which tract runs only through [`for_tract`].
pub fn draws_random(graph: &pb::GraphProto) -> bool {
    graph.node.iter().any(|n| {
        matches!(
            n.op_type.as_str(),
            "Dropout" | "RandomUniformLike" | "RandomNormalLike"
        )
    })
}

/// A copy of `model` that tract can run, where the model draws random numbers in training mode
/// (tract runs neither training-mode Dropout nor RandomUniformLike): every Dropout whose mask
/// nobody reads becomes an Identity, and every RandomUniformLike / RandomNormalLike yields its
/// lowest value / mean (for torch's stochastic depth: every unit kept). None when the model
/// needs no such change. Shapes are unchanged; values are those of a deterministic draw.
pub fn for_tract(model: &pb::ModelProto) -> Option<pb::ModelProto> {
    let graph = model.graph.as_ref()?;
    if !draws_random(graph) {
        return None;
    }
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    let mut copy = model.clone();
    let graph = copy.graph.as_mut().expect("checked above");
    let mut constants = Vec::new();
    for node in graph.node.iter_mut() {
        let value = |name: &str, default: f32| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.f)
                .unwrap_or(default)
        };
        match node.op_type.as_str() {
            "Dropout" if node.output.iter().skip(1).all(|m| !read.contains(m)) => {
                node.op_type = "Identity".into();
                node.input.truncate(1);
                node.output.truncate(1);
                node.attribute.clear();
            }
            "RandomUniformLike" | "RandomNormalLike" => {
                let level = if node.op_type == "RandomUniformLike" {
                    value("low", 0.0)
                } else {
                    value("mean", 0.0)
                };
                // x - x + level: the input's shape and type, every element `level`.
                let zeros = format!("{}/for_tract/zeros", node.output[0]);
                let level_name = format!("{}/for_tract/level", node.output[0]);
                constants.push(pb::NodeProto {
                    op_type: "Sub".into(),
                    input: vec![node.input[0].clone(), node.input[0].clone()],
                    output: vec![zeros.clone()],
                    name: zeros.clone(),
                    ..Default::default()
                });
                graph.initializer.push(pb::TensorProto {
                    name: level_name.clone(),
                    data_type: pb::tensor_proto::DataType::Float as i32,
                    float_data: vec![level],
                    ..Default::default()
                });
                node.op_type = "Add".into();
                node.input = vec![zeros, level_name];
                node.attribute.clear();
            }
            _ => {}
        }
    }
    // The Sub nodes read only the Random*Like input, which precedes the node they feed.
    for sub in constants {
        let feeds = graph
            .node
            .iter()
            .position(|n| n.input.first() == sub.output.first())
            .expect("each Sub feeds the Add it was made for");
        graph.node.insert(feeds, sub);
    }
    Some(copy)
}

/// Makes constants visible as initializers: a Constant node becomes an initializer of its output's
/// name, and a node that only renames a constant (Identity, or a Cast to the type it already has,
/// as the TorchScript exporter writes for de-duplicated weights) is removed, its readers reading
/// the constant itself. Graph outputs keep their producers.
pub fn inline_constant_aliases(graph: &mut pb::GraphProto) {
    use pb::attribute_proto::AttributeType as A;
    use pb::tensor_proto::DataType as T;
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut types: std::collections::HashMap<String, i32> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.data_type))
        .collect();
    let mut alias: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut kept = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        for input in node.input.iter_mut() {
            if let Some(original) = alias.get(input.as_str()) {
                *input = original.clone();
            }
        }
        let output = node.output.first().cloned().unwrap_or_default();
        if node.output.len() != 1 || outputs.contains(&output) {
            kept.push(node);
            continue;
        }
        match node.op_type.as_str() {
            "Constant" => {
                let attribute = node.attribute.first();
                // A scalar has no dims; a list has one.
                let floats = |values: Vec<f32>, dims: Vec<i64>| pb::TensorProto {
                    data_type: T::Float as i32,
                    dims,
                    float_data: values,
                    ..Default::default()
                };
                let ints = |values: Vec<i64>, dims: Vec<i64>| pb::TensorProto {
                    data_type: T::Int64 as i32,
                    dims,
                    int64_data: values,
                    ..Default::default()
                };
                let tensor = attribute.and_then(|a| match (a.name.as_str(), a.r#type) {
                    ("value", _) => a.t.clone(),
                    ("value_float", t) if t == A::Float as i32 => Some(floats(vec![a.f], vec![])),
                    ("value_floats", _) => {
                        Some(floats(a.floats.clone(), vec![a.floats.len() as i64]))
                    }
                    ("value_int", t) if t == A::Int as i32 => Some(ints(vec![a.i], vec![])),
                    ("value_ints", _) => Some(ints(a.ints.clone(), vec![a.ints.len() as i64])),
                    _ => None,
                });
                match tensor.filter(|t| {
                    t.data_location != Some(pb::tensor_proto::DataLocation::External as i32)
                }) {
                    Some(mut tensor) if node.attribute.len() == 1 => {
                        tensor.name = output.clone();
                        types.insert(output, tensor.data_type);
                        graph.initializer.push(tensor);
                    }
                    _ => kept.push(node),
                }
            }
            "Identity" | "Cast" => {
                let source = node.input.first().cloned().unwrap_or_default();
                let same_type = node.op_type == "Identity"
                    || node
                        .attribute
                        .iter()
                        .find(|a| a.name == "to")
                        .is_some_and(|a| types.get(&source) == Some(&(a.i as i32)));
                if types.contains_key(&source) && same_type {
                    alias.insert(output, source);
                } else {
                    kept.push(node);
                }
            }
            _ => kept.push(node),
        }
    }
    graph.node = kept;
}

/// torch.export writes `split` and `chunk` as a SplitToSequence read by SequenceAt at constant
/// indices, ops tract does not know. Where the split sizes and every index are constants, each
/// SequenceAt becomes a Slice of the split input (the same tensor under the same name) and the
/// SplitToSequence goes. Other sequences are left for validation to refuse.
pub fn sequence_splits(graph: &mut pb::GraphProto, opset: i64) {
    let mut constants: HashMap<String, (Vec<i64>, bool)> = graph
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.clone(), (proto::int_values(t)?, t.dims.is_empty()))))
        .collect();
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let value = node
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref());
        if let (Some(t), Some(output)) = (value, node.output.first()) {
            if let Some(values) = proto::int_values(t) {
                constants.insert(output.clone(), (values, t.dims.is_empty()));
            }
        }
    }
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            readers.entry(input.as_str()).or_default().push(i);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // SequenceAt node index -> (input, start, end, axis); SplitToSequence node indices to drop.
    let mut slices: HashMap<usize, (String, i64, i64, i64)> = HashMap::new();
    let mut dropped: HashSet<usize> = HashSet::new();
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != "SplitToSequence"
            || node.output.len() != 1
            || outputs.contains(node.output[0].as_str())
        {
            continue;
        }
        let Some((sizes, scalar)) = node.input.get(1).and_then(|s| constants.get(s)) else {
            continue;
        };
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let bounds = |index: i64| -> Option<(i64, i64)> {
            if *scalar {
                let size = *sizes.first().filter(|&&s| s > 0)?;
                let start = index.checked_mul(size).filter(|_| index >= 0)?;
                Some((start, start.checked_add(size)?))
            } else {
                let count = sizes.len() as i64;
                let index = if index < 0 { index + count } else { index };
                if !(0..count).contains(&index)
                    || sizes.iter().any(|&s| !(0..=1 << 40).contains(&s))
                {
                    return None;
                }
                let start: i64 = sizes[..index as usize].iter().sum();
                Some((start, start + sizes[index as usize]))
            }
        };
        let reads = readers
            .get(node.output[0].as_str())
            .cloned()
            .unwrap_or_default();
        let planned: Option<Vec<(usize, (String, i64, i64, i64))>> = reads
            .iter()
            .map(|&r| {
                let reader = &graph.node[r];
                let index = reader.input.get(1).and_then(|x| constants.get(x))?;
                let (start, end) = (reader.op_type == "SequenceAt" && index.0.len() == 1)
                    .then(|| bounds(index.0[0]))??;
                Some((r, (node.input[0].clone(), start, end, axis)))
            })
            .collect();
        if let Some(planned) = planned.filter(|p| !p.is_empty()) {
            slices.extend(planned);
            dropped.insert(i);
        }
    }
    if dropped.is_empty() {
        return;
    }
    let mut b = GraphBuilder::new(opset, proto::names_in(graph));
    let mut nodes = Vec::with_capacity(graph.node.len());
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let Some((input, start, end, axis)) = slices.remove(&i) else {
            nodes.push(node);
            continue;
        };
        let base = proto::node_label(&node);
        let starts = b.const_i64(&format!("{base}/starts"), &[1], &[start]);
        let ends = b.const_i64(&format!("{base}/ends"), &[1], &[end]);
        let axes = b.const_i64(&format!("{base}/axes"), &[1], &[axis]);
        b.node(
            "Slice",
            &[&input, &starts, &ends, &axes],
            &[&node.output[0]],
            vec![],
            &base,
        );
        nodes.append(&mut b.nodes);
    }
    graph.node = nodes;
    graph.initializer.append(&mut b.initializers);
}
