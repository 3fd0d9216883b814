//! Rewrites of a student's nodes into equivalent forms that ONNX Runtime Training 1.19 can
//! differentiate (data/ort_training_1.19.2_gradients.tsv says which forms it cannot), each one
//! the same function of its inputs.

use std::collections::HashMap;

use super::builder::GraphBuilder;
use super::{pb, proto};

/// Rewrites every node of `graph` that has an equivalent ORT Training can differentiate, in
/// place and in order. Returns one line per kind of rewrite made, for the report.
pub fn rewrite_for_ort_training(graph: &mut pb::GraphProto, opset: i64) -> Vec<String> {
    let mut b = GraphBuilder::new(opset, proto::names_in(graph));
    let types = ElemTypes::of(graph);
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        let why = match node.op_type.as_str() {
            "HardSigmoid" => {
                let alpha = float_attr(&node, "alpha").unwrap_or(0.2);
                let beta = float_attr(&node, "beta").unwrap_or(0.5);
                let base = proto::node_label(&node);
                let hard = hard_sigmoid(&mut b, &node.input[0], alpha, beta, &base);
                b.node("Identity", &[&hard], &[&node.output[0]], vec![], &base);
                Some("HardSigmoid as Mul, Add and Clip")
            }
            "HardSwish" => {
                let base = proto::node_label(&node);
                let x = node.input[0].clone();
                let hard = hard_sigmoid(&mut b, &x, 1.0 / 6.0, 0.5, &base);
                b.node("Mul", &[&x, &hard], &[&node.output[0]], vec![], &base);
                Some("HardSwish as x * Clip(x / 6 + 0.5, 0, 1)")
            }
            "CastLike" => match node.input.get(1).and_then(|like| types.get(like)) {
                Some(to) => {
                    node.op_type = "Cast".into();
                    node.input.truncate(1);
                    node.attribute.retain(|a| a.name == "saturate");
                    node.attribute.push(int_attr("to", to));
                    nodes.push(node);
                    counts_add(&mut counts, "CastLike as Cast");
                    continue;
                }
                None => None,
            },
            "Split" if opset >= 13 && !node.attribute.iter().any(|a| a.name == "axis") => {
                node.attribute.push(int_attr("axis", 0));
                nodes.push(node);
                counts_add(&mut counts, "Split with its default axis 0 made explicit");
                continue;
            }
            "LayerNormalization" if node.output.len() < 3 && layer_norm_axis(&node) < 0 => {
                layer_norm(&mut b, &node);
                Some("LayerNormalization as ReduceMean, Sub, Mul, Sqrt, Div and Add")
            }
            "ReduceMean" | "ReduceSum" if drops_explicit_axes(&node) => {
                reduction_keeping_axes(&mut b, &node);
                Some(if node.op_type == "ReduceMean" {
                    "ReduceMean dropping its axes as ReduceMean keeping them, then Squeeze"
                } else {
                    "ReduceSum dropping its axes as ReduceSum keeping them, then Squeeze"
                })
            }
            "Dropout" if node.output.len() < 2 => {
                node.output
                    .push(b.unique(&format!("{}/mask", node.output[0])));
                nodes.push(node);
                counts_add(
                    &mut counts,
                    "Dropout with the mask output its gradient reads",
                );
                continue;
            }
            _ => None,
        };
        match why {
            Some(why) => {
                counts_add(&mut counts, why);
                nodes.append(&mut b.nodes);
            }
            None => nodes.push(node),
        }
    }
    graph.node = nodes;
    let chains = random_masks_as_dropout(graph, &mut b);
    if chains > 0 {
        counts.push((
            "random keep-masks (RandomUniformLike, Less, Cast, Div: stochastic depth) as Dropout, which stops in eval mode",
            chains,
        ));
    }
    graph.initializer.append(&mut b.initializers);
    counts
        .into_iter()
        .map(|(why, n)| format!("rewrote {n} x {why} (ONNX Runtime Training 1.19 cannot differentiate the exported form)"))
        .collect()
}

/// torch.export writes stochastic depth's keep-mask `bernoulli(keep) / keep` as
/// RandomUniformLike(x) -> Less(r, keep) -> Cast -> Div(m, keep), which draws in eval mode too
/// (and so would the trained student). That is Dropout(ones like x, ratio 1 - keep) in training
/// mode, which ORT Training switches off for evaluation and export. Returns the chains rewritten.
fn random_masks_as_dropout(graph: &mut pb::GraphProto, b: &mut GraphBuilder) -> usize {
    use pb::tensor_proto::DataType as T;
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            readers.entry(input.as_str()).or_default().push(i);
        }
    }
    let initializers = proto::initializers(graph);
    let constant = |name: &str| initializers.get(name).and_then(|t| proto::float_values(t));
    let only_reader = |tensor: &str, op: &str| -> Option<usize> {
        match readers.get(tensor).map(Vec::as_slice) {
            Some([i]) if graph.node[*i].op_type == op => Some(*i),
            _ => None,
        }
    };
    let mut chains = Vec::new();
    for (r, node) in graph.node.iter().enumerate() {
        if node.op_type != "RandomUniformLike" {
            continue;
        }
        let Some(less) = only_reader(&node.output[0], "Less") else {
            continue;
        };
        let keep = &graph.node[less].input;
        if keep.first() != node.output.first() || keep.len() != 2 {
            continue;
        }
        let Some(cast) = only_reader(&graph.node[less].output[0], "Cast") else {
            continue;
        };
        let to_float = graph.node[cast]
            .attribute
            .iter()
            .any(|a| a.name == "to" && a.i == T::Float as i64);
        let Some(div) = only_reader(&graph.node[cast].output[0], "Div") else {
            continue;
        };
        let divisor = graph.node[div].input.get(1);
        let same_keep = divisor == keep.get(1)
            || matches!((divisor, keep.get(1)), (Some(a), Some(b))
                if constant(a).is_some() && constant(a) == constant(b));
        if !to_float || !same_keep {
            continue;
        }
        chains.push((r, less, cast, div));
    }
    let mut replaced: HashMap<usize, Vec<pb::NodeProto>> = HashMap::new();
    for &(r, less, cast, div) in &chains {
        let x = graph.node[r].input[0].clone();
        let keep = graph.node[less].input[1].clone();
        let out = graph.node[div].output[0].clone();
        let base = proto::node_label(&graph.node[r]);
        let zero = b.scalar(&format!("{base}/zero"), 0.0);
        let one = b.scalar(&format!("{base}/one"), 1.0);
        let zeros = b.mul(&x, &zero, &format!("{base}/zeros"));
        let ones = b.add(&zeros, &one, &format!("{base}/ones"));
        let ratio = b.sub(&one, &keep, &format!("{base}/drop_ratio"));
        let training = b.unique(&format!("{base}/training_mode"));
        b.initializers.push(pb::TensorProto {
            name: training.clone(),
            data_type: T::Bool as i32,
            int32_data: vec![1],
            ..Default::default()
        });
        let mask = b.unique(&format!("{out}/mask"));
        b.node(
            "Dropout",
            &[&ones, &ratio, &training],
            &[&out, &mask],
            vec![],
            &base,
        );
        replaced.insert(div, std::mem::take(&mut b.nodes));
        for i in [r, less, cast] {
            replaced.insert(i, Vec::new());
        }
    }
    let count = chains.len();
    if count > 0 {
        let old = std::mem::take(&mut graph.node);
        for (i, node) in old.into_iter().enumerate() {
            match replaced.remove(&i) {
                Some(new) => graph.node.extend(new),
                None => graph.node.push(node),
            }
        }
    }
    count
}

fn counts_add(counts: &mut Vec<(&'static str, usize)>, why: &'static str) {
    match counts.iter_mut().find(|(w, _)| *w == why) {
        Some((_, n)) => *n += 1,
        None => counts.push((why, 1)),
    }
}

/// `Clip(alpha * x + beta, 0, 1)`.
fn hard_sigmoid(b: &mut GraphBuilder, x: &str, alpha: f32, beta: f32, base: &str) -> String {
    let a = b.scalar(&format!("{base}/alpha"), alpha);
    let c = b.scalar(&format!("{base}/beta"), beta);
    let scaled = b.mul(x, &a, &format!("{base}/scaled"));
    let shifted = b.add(&scaled, &c, &format!("{base}/shifted"));
    let zero = b.scalar(&format!("{base}/zero"), 0.0);
    let one = b.scalar(&format!("{base}/one"), 1.0);
    b.op(
        "Clip",
        &[&shifted, &zero, &one],
        vec![],
        &format!("{base}/clipped"),
    )
}

fn layer_norm_axis(node: &pb::NodeProto) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name == "axis")
        .map(|a| a.i)
        .unwrap_or(-1)
}

/// `(x - mean) / sqrt(var + eps) * scale + bias` over the axes from `axis` (negative) to the
/// last, with the biased variance, as LayerNormalization computes it.
fn layer_norm(b: &mut GraphBuilder, node: &pb::NodeProto) {
    let base = proto::node_label(node);
    let axes: Vec<i64> = (layer_norm_axis(node)..0).collect();
    let epsilon = float_attr(node, "epsilon").unwrap_or(1e-5);
    let x = &node.input[0];
    let mean = b.reduce_mean(x, &axes, &format!("{base}/mean"));
    let centred = b.sub(x, &mean, &format!("{base}/centred"));
    let squared = b.mul(&centred, &centred, &format!("{base}/squared"));
    let variance = b.reduce_mean(&squared, &axes, &format!("{base}/variance"));
    let eps = b.scalar(&format!("{base}/epsilon"), epsilon);
    let shifted = b.add(&variance, &eps, &format!("{base}/variance_eps"));
    let deviation = b.unary("Sqrt", &shifted, &format!("{base}/deviation"));
    let normalised = b.div(&centred, &deviation, &format!("{base}/normalised"));
    let out = &node.output[0];
    match node.input.get(2).filter(|bias| !bias.is_empty()) {
        Some(bias) => {
            let scaled = b.mul(&normalised, &node.input[1], &format!("{base}/scaled"));
            b.node("Add", &[&scaled, bias], &[out], vec![], &base);
        }
        None => b.node("Mul", &[&normalised, &node.input[1]], &[out], vec![], &base),
    }
}

/// A ReduceMean/ReduceSum with `keepdims=0` and explicit axes (ORT's gradient of it fails to
/// expand back on a symbolic batch).
fn drops_explicit_axes(node: &pb::NodeProto) -> bool {
    let keepdims = node
        .attribute
        .iter()
        .find(|a| a.name == "keepdims")
        .map(|a| a.i)
        .unwrap_or(1);
    let axes_attribute = proto::attr_ints(node, "axes").is_some_and(|a| !a.is_empty());
    let axes_input = node.input.get(1).is_some_and(|a| !a.is_empty());
    keepdims == 0 && (axes_attribute || axes_input)
}

/// The same reduction with `keepdims=1`, then Squeeze of the same axes.
fn reduction_keeping_axes(b: &mut GraphBuilder, node: &pb::NodeProto) {
    let base = proto::node_label(node);
    let mut kept = node.clone();
    for a in kept.attribute.iter_mut().filter(|a| a.name == "keepdims") {
        a.i = 1;
    }
    let reduced = b.unique(&format!("{}/kept", node.output[0]));
    kept.output = vec![reduced.clone()];
    kept.name = b.unique(&format!("{base}/kept"));
    let axes = match node.input.get(1).filter(|a| !a.is_empty()) {
        Some(input) => input.clone(),
        None => {
            // Counted from the front first, then from the back: ascending positions for any rank
            // (tract's Squeeze fails on descending ones such as [-1, 0]).
            let mut values = proto::attr_ints(node, "axes").unwrap_or_default().to_vec();
            values.sort_by_key(|&a| (a < 0, a));
            b.const_i64(&format!("{base}/axes"), &[values.len() as i64], &values)
        }
    };
    b.nodes.push(kept);
    b.node(
        "Squeeze",
        &[&reduced, &axes],
        &[&node.output[0]],
        vec![],
        &base,
    );
}

fn float_attr(node: &pb::NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

fn int_attr(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        i: value,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

/// Element types of the tensors whose type a graph states: initializers, Constant nodes, inputs
/// and value_info (CastLike's second input is one of these in exported models).
struct ElemTypes(HashMap<String, i64>);

impl ElemTypes {
    fn of(graph: &pb::GraphProto) -> Self {
        let mut types = HashMap::new();
        for t in &graph.initializer {
            types.insert(t.name.clone(), t.data_type as i64);
        }
        for n in graph.node.iter().filter(|n| n.op_type == "Constant") {
            if let (Some(out), Some(t)) = (
                n.output.first(),
                n.attribute.iter().find_map(|a| a.t.as_ref()),
            ) {
                types.insert(out.clone(), t.data_type as i64);
            }
        }
        for v in graph.input.iter().chain(&graph.value_info) {
            if let Some(t) = proto::value_elem_type(v) {
                types.insert(v.name.clone(), t as i64);
            }
        }
        // Carried forward through the graph (in topological order) where no value_info says.
        use pb::tensor_proto::DataType as T;
        for node in &graph.node {
            let known = match node.op_type.as_str() {
                "Cast" => node.attribute.iter().find(|a| a.name == "to").map(|a| a.i),
                "CastLike" => node.input.get(1).and_then(|i| types.get(i).copied()),
                "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" => Some(T::Int64 as i64),
                "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "Not" | "And"
                | "Or" | "Xor" | "IsNaN" | "IsInf" => Some(T::Bool as i64),
                "Where" => node.input.get(1).and_then(|i| types.get(i).copied()),
                _ => node.input.iter().find_map(|i| types.get(i).copied()),
            };
            if let Some(t) = known {
                for output in node.output.iter().take(1) {
                    types.entry(output.clone()).or_insert(t);
                }
            }
        }
        ElemTypes(types)
    }

    fn get(&self, tensor: &str) -> Option<i64> {
        self.0.get(tensor).copied().filter(|&t| t != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A model of one node `op(x, extra inputs)` -> y, with `initializers` for the extras.
    fn one_node(
        opset: i64,
        node: pb::NodeProto,
        initializers: Vec<pb::TensorProto>,
        outputs: &[&str],
    ) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            graph: Some(pb::GraphProto {
                node: vec![node],
                initializer: initializers,
                input: vec![value_info("x", &[2, 3, 4, 5])],
                output: outputs
                    .iter()
                    .map(|o| pb::ValueInfoProto {
                        name: o.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn run(model: &pb::ModelProto) -> Vec<Vec<f32>> {
        let x: Vec<f32> = (0..120)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let input = tract_ndarray::ArrayD::from_shape_vec(vec![2, 3, 4, 5], x).unwrap();
        let outputs = tract_onnx::onnx()
            .model_for_proto_model(model)
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(input.into_tensor().into_tvalue()))
            .unwrap();
        outputs
            .iter()
            .map(|t| {
                t.cast_to::<f32>()
                    .unwrap()
                    .to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect::<Vec<f32>>()
            })
            .collect()
    }

    /// tract runs the exported form and the rewrite: the same values, and the op is gone.
    fn same_values(model: pb::ModelProto, op: &str) -> Vec<String> {
        let before = run(&model);
        let mut rewritten = model.clone();
        let opset = proto::onnx_opset(&model);
        let notes = rewrite_for_ort_training(rewritten.graph.as_mut().unwrap(), opset);
        assert_eq!(notes.len(), 1, "{notes:?}");
        let after = run(&rewritten);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(b.len(), a.len());
            for (x, y) in b.iter().zip(a) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{op}: {x} vs {y}");
            }
        }
        let ops: Vec<String> = rewritten
            .graph
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.clone())
            .collect();
        ops
    }

    fn node(
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
    ) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}_0"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn float_attr_proto(name: &str, f: f32) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            f,
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            ..Default::default()
        }
    }

    fn floats(name: &str, dims: &[i64], values: Vec<f32>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: values,
            ..Default::default()
        }
    }

    #[test]
    fn hard_swish_and_hard_sigmoid() {
        let ops = same_values(
            one_node(
                17,
                node("HardSwish", &["x"], &["y"], vec![]),
                vec![],
                &["y"],
            ),
            "HardSwish",
        );
        assert!(!ops.contains(&"HardSwish".to_string()), "{ops:?}");
        let attrs = vec![
            float_attr_proto("alpha", 0.3),
            float_attr_proto("beta", 0.4),
        ];
        let ops = same_values(
            one_node(
                17,
                node("HardSigmoid", &["x"], &["y"], attrs),
                vec![],
                &["y"],
            ),
            "HardSigmoid",
        );
        assert!(
            ops.contains(&"Clip".to_string()) && !ops.contains(&"HardSigmoid".to_string()),
            "{ops:?}"
        );
    }

    #[test]
    fn layer_normalization_over_the_last_two_axes() {
        for opset in [17, 18] {
            let attrs = vec![int_attr("axis", -2), float_attr_proto("epsilon", 1e-3)];
            let scale = floats(
                "scale",
                &[4, 5],
                (0..20).map(|i| 0.5 + i as f32 / 10.0).collect(),
            );
            let bias = floats(
                "bias",
                &[4, 5],
                (0..20).map(|i| i as f32 / 7.0 - 1.0).collect(),
            );
            let model = one_node(
                opset,
                node("LayerNormalization", &["x", "scale", "bias"], &["y"], attrs),
                vec![scale, bias],
                &["y"],
            );
            let ops = same_values(model, "LayerNormalization");
            assert!(!ops.contains(&"LayerNormalization".to_string()), "{ops:?}");
        }
    }

    #[test]
    fn reductions_that_drop_axes_keep_them_then_squeeze() {
        let attrs = vec![
            pb::AttributeProto {
                name: "axes".into(),
                ints: vec![2, 3],
                r#type: pb::attribute_proto::AttributeType::Ints as i32,
                ..Default::default()
            },
            int_attr("keepdims", 0),
        ];
        let ops = same_values(
            one_node(
                17,
                node("ReduceMean", &["x"], &["y"], attrs),
                vec![],
                &["y"],
            ),
            "ReduceMean",
        );
        assert_eq!(ops, ["ReduceMean", "Squeeze"]);
        let axes = pb::TensorProto {
            name: "axes".into(),
            dims: vec![1],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: vec![1],
            ..Default::default()
        };
        let node = node(
            "ReduceSum",
            &["x", "axes"],
            &["y"],
            vec![int_attr("keepdims", 0)],
        );
        let ops = same_values(one_node(18, node, vec![axes], &["y"]), "ReduceSum");
        assert_eq!(ops, ["ReduceSum", "Squeeze"]);
    }

    #[test]
    fn cast_like_and_split() {
        let like = floats("like", &[1], vec![0.0]);
        let ops = same_values(
            one_node(
                17,
                node("CastLike", &["x", "like"], &["y"], vec![]),
                vec![like],
                &["y"],
            ),
            "CastLike",
        );
        assert_eq!(ops, ["Cast"]);
        let model = one_node(
            17,
            node("Split", &["x"], &["a", "b"], vec![]),
            vec![],
            &["a", "b"],
        );
        let mut rewritten = model.clone();
        rewrite_for_ort_training(rewritten.graph.as_mut().unwrap(), 17);
        let split = &rewritten.graph.as_ref().unwrap().node[0];
        assert!(split.attribute.iter().any(|a| a.name == "axis" && a.i == 0));
        assert_eq!(run(&model), run(&rewritten));
    }
}
