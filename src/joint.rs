//! Assembling the joint training graph from a plan: the student as it is, the teacher renamed
//! under `teacher/` with its BatchNorms folded, the loss subgraphs, and the sidecar that says
//! what to train and what to freeze.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::analysis::{Dim, Shape};
use crate::error::{Error, Result};
use crate::methods::{registry, LossContext, MethodName, TEACHER_PREFIX};
use crate::onnx::builder::{Attr, GraphBuilder};
use crate::analysis::shapes::fixed;
use crate::onnx::{edit, normalize, pb, proto};
use crate::plan::{Hyper, Plan, TapPair};
use crate::PreparedModel;

/// The opsets ONNX Runtime Training 1.19 accepts.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;
/// The newest IR version ONNX Runtime Training 1.19 accepts.
pub const MAX_IR_VERSION: i64 = 10;
pub const LABELS: &str = "labels";
pub const LOSS: &str = "loss";

/// A name and what it is for, in the sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct Role {
    pub name: String,
    pub role: &'static str,
    pub dtype: String,
    pub shape: Shape,
}

/// `<output>.json`: everything `generate_artifacts` needs, without opening the graph.
#[derive(Debug, Clone, Serialize)]
pub struct Sidecar {
    pub kdgraph_version: &'static str,
    pub model: String,
    pub teacher: String,
    pub student: String,
    pub methods: Vec<MethodName>,
    pub hyper: Hyper,
    pub pairs: Vec<TapPair>,
    pub requires_grad: Vec<String>,
    pub frozen_params: Vec<String>,
    pub inputs: Vec<Role>,
    pub outputs: Vec<Role>,
    /// Training stages in order; each names a graph file and its sidecar.
    pub stages: Vec<TrainingStage>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingStage {
    pub name: &'static str,
    pub model: String,
    pub epochs: Option<u32>,
}

pub struct Joint {
    pub model: pb::ModelProto,
    pub sidecar: Sidecar,
}

/// Builds the joint graph of `plan` from the two prepared models.
pub fn assemble(teacher: PreparedModel, student: PreparedModel, plan: &Plan, output_name: &str) -> Result<Joint> {
    let (t_shown, s_shown) = (teacher.loaded.display(), student.loaded.display());
    let t_opset = checked_opset(&teacher.loaded.proto, &t_shown)?;
    let s_opset = checked_opset(&student.loaded.proto, &s_shown)?;
    let opset = t_opset.max(s_opset);
    let ir_version = [&teacher.loaded.proto, &student.loaded.proto]
        .iter()
        .zip([&t_shown, &s_shown])
        .map(|(m, shown)| {
            if m.ir_version > MAX_IR_VERSION {
                Err(Error::input(format!(
                    "`{shown}` has IR version {}, newer than the {MAX_IR_VERSION} ONNX Runtime Training 1.19 reads; \
                     re-export it with an older onnx, or set ir_version to {MAX_IR_VERSION} with onnx.save",
                    m.ir_version
                )))
            } else {
                Ok(m.ir_version)
            }
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(MAX_IR_VERSION)
        .max(8);

    let mut s_graph = student.loaded.proto.graph.clone().expect("loaded models have graphs");
    let mut t_graph = teacher.loaded.proto.graph.clone().expect("loaded models have graphs");
    normalize::global_average_pool(&mut s_graph, |t| match plan.student.shapes.get(t).map(Vec::as_slice) {
        Some([_, _, h, w]) => Some((fixed(h)?, fixed(w)?)),
        _ => None,
    });
    if s_opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut s_graph);
    }
    if t_opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut t_graph);
    }

    // The teacher: only what the taps need, BN folded (eval mode), names under `teacher/`.
    let needed: HashSet<String> = plan.pairs.iter().map(|p| p.teacher.tensor.clone()).collect();
    edit::prune_to(&mut t_graph, &needed);
    edit::fold_batchnorm(&mut t_graph, &needed, &t_shown)?;
    let input_map: HashMap<String, String> = plan
        .teacher
        .inputs
        .iter()
        .zip(&plan.student.inputs)
        .map(|(t, s)| (t.name.clone(), s.name.clone()))
        .collect();
    edit::prefix_names(&mut t_graph, TEACHER_PREFIX, &input_map);

    let taken = names_of(&s_graph).chain(names_of(&t_graph)).collect::<Vec<_>>();
    if taken.iter().any(|n| n == LABELS) {
        return Err(Error::input(format!(
            "student `{s_shown}` already has a tensor named `{LABELS}`; rename it before merging"
        )));
    }
    let mut b = GraphBuilder::new(opset, taken);
    b.unique(LABELS);
    let image = plan.student.inputs[0].name.clone();
    let batch = plan.student.inputs[0].shape.first().cloned().unwrap_or(Dim::Symbol("N".into()));

    // Loss terms: CE, then each method's (KD first when present).
    let ce = cross_entropy(&mut b, &plan.student.logits.tensor);
    let mut terms: Vec<(String, String, f64)> = vec![("loss/ce".into(), ce, plan.hyper.gamma)];
    for &method in &plan.methods {
        let pairs: Vec<&TapPair> = plan.pairs.iter().filter(|p| p.method == method).collect();
        let mut ctx = LossContext { b: &mut b, method, hyper: &plan.hyper, image: image.clone() };
        let term = registry(method).build(&mut ctx, &pairs)?;
        let weight = match method {
            MethodName::Kd => plan.hyper.alpha,
            _ => plan.hyper.beta[&method],
        };
        terms.push((format!("loss/{method}"), term, weight));
    }
    let mut weighted = Vec::new();
    for (output, term, weight) in &terms {
        b.node("Identity", &[term], &[output], vec![], output);
        b.doc_last("an unweighted loss term, comparable with a reference implementation");
        let w = b.scalar(&format!("{output}/weight"), *weight as f32);
        weighted.push(b.mul(term, &w, &format!("{output}/weighted")));
    }
    let total = b.sum_of(&weighted, "loss/total");
    b.node("Identity", &[&total], &[LOSS], vec![], LOSS);
    b.doc_last("the weighted total: gamma * CE + alpha * KD + sum of beta * method terms");

    // Parameters: student weights and connector parameters train; BN running statistics freeze.
    let student_statistics: HashSet<String> = s_graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .chain(student.running_statistics.iter().cloned())
        .collect();
    let mut requires_grad = trainable_student_parameters(&s_graph, &student_statistics);
    requires_grad.extend(b.parameters.iter().filter(|p| !p.frozen).map(|p| p.name.clone()));
    let mut frozen_params: Vec<String> = student_statistics.into_iter().collect();
    frozen_params.sort();
    frozen_params.extend(b.parameters.iter().filter(|p| p.frozen).map(|p| p.name.clone()));

    // The graph: inputs, nodes, initializers, outputs in the documented order.
    let scalar = |name: &str, role: &'static str| Role { name: name.into(), role, dtype: "float32".into(), shape: vec![] };
    let mut outputs: Vec<Role> = vec![scalar(LOSS, "loss")];
    outputs.extend(terms.iter().map(|(name, _, _)| scalar(name, "term")));
    let student_outputs: Vec<Role> = s_graph
        .output
        .iter()
        .map(|o| Role {
            name: o.name.clone(),
            role: "student",
            dtype: proto::value_elem_type(o).map(proto::dtype_name).unwrap_or("float32").into(),
            shape: plan.student.shapes.get(&o.name).cloned().unwrap_or_default(),
        })
        .collect();
    let mut inputs: Vec<Role> = plan
        .student
        .inputs
        .iter()
        .map(|i| Role {
            name: i.name.clone(),
            role: "image",
            dtype: i.dtype.clone(),
            shape: i.shape.clone(),
        })
        .collect();
    inputs.push(Role { name: LABELS.into(), role: "labels", dtype: "int64".into(), shape: vec![batch] });

    let mut graph = pb::GraphProto {
        name: "kdgraph_joint".into(),
        doc_string: format!("knowledge distillation of `{s_shown}` from `{t_shown}` by kdgraph"),
        input: inputs.iter().map(value_info).collect(),
        ..Default::default()
    };
    graph.node.extend(t_graph.node);
    graph.node.extend(s_graph.node);
    graph.node.extend(b.nodes);
    graph.initializer.extend(t_graph.initializer);
    graph.initializer.extend(s_graph.initializer);
    graph.initializer.extend(b.initializers);
    outputs.extend(student_outputs);
    graph.output = outputs.iter().map(value_info).collect();
    edit::topological_sort(&mut graph)?;

    let methods: Vec<String> = plan.methods.iter().map(|m| m.to_string()).collect();
    let model = pb::ModelProto {
        ir_version,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: opset }],
        producer_name: "kdgraph".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![
            pb::StringStringEntryProto { key: "kdgraph.version".into(), value: env!("CARGO_PKG_VERSION").into() },
            pb::StringStringEntryProto { key: "kdgraph.methods".into(), value: methods.join(",") },
        ],
        ..Default::default()
    };
    let sidecar = Sidecar {
        kdgraph_version: env!("CARGO_PKG_VERSION"),
        model: output_name.to_string(),
        teacher: t_shown,
        student: s_shown,
        methods: plan.methods.clone(),
        hyper: plan.hyper.clone(),
        pairs: plan.pairs.clone(),
        requires_grad,
        frozen_params,
        inputs,
        outputs,
        stages: vec![TrainingStage { name: "main", model: output_name.to_string(), epochs: None }],
        notes: plan.notes.clone(),
        warnings: plan.warnings.clone(),
    };
    Ok(Joint { model, sidecar })
}

fn checked_opset(model: &pb::ModelProto, shown: &str) -> Result<i64> {
    let opset = proto::onnx_opset(model);
    if !OPSETS.contains(&opset) {
        return Err(Error::input(format!(
            "`{shown}` uses ONNX opset {opset}; ONNX Runtime Training 1.19 needs {} to {}: \
             re-export it with torch.onnx.export(..., opset_version=17)",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    Ok(opset)
}

fn names_of(graph: &pb::GraphProto) -> impl Iterator<Item = String> + '_ {
    graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned().chain(std::iter::once(n.name.clone())))
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
}

/// Mean cross-entropy: stable log-softmax, GatherElements at the labels, mean, negated.
fn cross_entropy(b: &mut GraphBuilder, logits: &str) -> String {
    let log_p = b.log_softmax(logits, 1.0, "kd/ce/log_p");
    let labels = b.unsqueeze(LABELS, &[1], "kd/ce/labels_column");
    let picked = b.op("GatherElements", &[&log_p, &labels], vec![("axis", Attr::Int(1))], "kd/ce/label_log_p");
    let mean = b.mean_all(&picked, "kd/ce/mean_log_p");
    b.unary("Neg", &mean, "kd/ce/term")
}

/// Student float initializers in the places networks keep weights: conv and linear weights and
/// biases, BN scale and shift, bias-like Add/Mul operands. Shape constants and BN statistics are not.
fn trainable_student_parameters(graph: &pb::GraphProto, statistics: &HashSet<String>) -> Vec<String> {
    let initializers = proto::initializers(graph);
    let weight_slots: &[(&str, &[usize])] = &[
        ("Conv", &[1, 2]),
        ("ConvTranspose", &[1, 2]),
        ("Gemm", &[1, 2]),
        ("MatMul", &[0, 1]),
        ("BatchNormalization", &[1, 2]),
        ("Add", &[0, 1]),
        ("Mul", &[0, 1]),
        ("Sub", &[0, 1]),
        ("PRelu", &[1]),
        ("LayerNormalization", &[1, 2]),
    ];
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for node in &graph.node {
        let Some((_, slots)) = weight_slots.iter().find(|(op, _)| *op == node.op_type) else { continue };
        for &slot in slots.iter() {
            let Some(name) = node.input.get(slot) else { continue };
            let Some(tensor) = initializers.get(name.as_str()) else { continue };
            let elements: i64 = tensor.dims.iter().product();
            if tensor.data_type == pb::tensor_proto::DataType::Float as i32
                && !tensor.dims.is_empty()
                && elements > 1
                && !statistics.contains(name)
                && seen.insert(name.clone())
            {
                names.push(name.clone());
            }
        }
    }
    names
}

fn value_info(role: &Role) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    use pb::tensor_proto::DataType as T;
    let elem_type = match role.dtype.as_str() {
        "int64" => T::Int64 as i32,
        "float64" => T::Double as i32,
        "float16" => T::Float16 as i32,
        _ => T::Float as i32,
    };
    let dim = role
        .shape
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => Value::DimValue(*n),
                Dim::Symbol(s) => Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: role.name.clone(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
