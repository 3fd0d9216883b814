//! Assembling the joint training graph from a plan: the student as it is, the teacher renamed
//! under `teacher/` with its BatchNorms folded, the loss subgraphs, and the sidecar that says
//! what to train and what to freeze.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::analysis::shapes::fixed;
use crate::analysis::{Dim, Shape};
use crate::error::{Error, Result};
use crate::methods::{registry, LossContext, MethodName, Stage, TEACHER_PREFIX};
use crate::onnx::builder::{Attr, GraphBuilder};
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
    /// Also in the graph's metadata: a graph and a sidecar of two different merges do not match.
    pub model_hash: String,
    /// Which stage this graph trains: "init" or "main".
    pub stage: &'static str,
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
    pub sidecar: String,
    /// The reference's number of epochs for this stage, where it prescribes one.
    pub epochs: Option<u32>,
    /// Start from the parameters trained in this stage (matched by name).
    pub carry_from: Option<&'static str>,
}

pub struct Joint {
    pub model: pb::ModelProto,
    pub sidecar: Sidecar,
}

/// Builds the graph of one training stage of `plan` from the two prepared models. `files` names
/// the stage graphs as written, for the sidecar.
pub fn assemble(
    teacher: &PreparedModel,
    student: &PreparedModel,
    plan: &Plan,
    stage: Stage,
    files: &StageFiles,
) -> Result<Joint> {
    let (t_shown, s_shown) = (teacher.loaded.display(), student.loaded.display());
    let t_opset = checked_opset(&teacher.loaded.proto, &t_shown)?;
    let s_opset = checked_opset(&student.loaded.proto, &s_shown)?;
    let opset = t_opset.max(s_opset);
    let ir_version = checked_ir_version(&teacher.loaded.proto, &t_shown)?
        .max(checked_ir_version(&student.loaded.proto, &s_shown)?)
        .max(8);

    let mut s_graph = student
        .loaded
        .proto
        .graph
        .clone()
        .expect("loaded models have graphs");
    let original_teacher = teacher
        .loaded
        .proto
        .graph
        .as_ref()
        .expect("loaded models have graphs");
    let mut t_graph = original_teacher.clone();
    normalize::global_average_pool(&mut s_graph, |t| {
        match plan.student.shapes.get(t).map(Vec::as_slice) {
            Some([_, _, h, w]) => Some((fixed(h)?, fixed(w)?)),
            _ => None,
        }
    });
    if s_opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut s_graph);
    }
    if t_opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut t_graph);
    }

    // The teacher: only what the taps need, BN folded (eval mode) unless asked otherwise, names under `teacher/`.
    let needed: HashSet<String> = plan
        .pairs
        .iter()
        .map(|p| p.teacher.tensor.clone())
        .collect();
    edit::prune_to(&mut t_graph, &needed);
    normalize::inference_dropout(&mut t_graph, &t_shown)?;
    if !plan.hyper.teacher_batch_statistics {
        edit::fold_batchnorm(&mut t_graph, &needed, &t_shown)?;
    }
    let input_map: HashMap<String, String> = plan
        .teacher
        .inputs
        .iter()
        .zip(&plan.student.inputs)
        .map(|(t, s)| (t.name.clone(), s.name.clone()))
        .collect();
    edit::prefix_names(&mut t_graph, TEACHER_PREFIX, &input_map);

    let taken = names_of(&s_graph)
        .chain(names_of(&t_graph))
        .collect::<Vec<_>>();
    if let Some(clash) = taken
        .iter()
        .find(|n| *n == LABELS || *n == LOSS || n.starts_with("loss/"))
    {
        return Err(Error::input(format!(
            "student `{s_shown}` already has a tensor named `{clash}`, a name the joint graph gives its labels \
             or losses; rename it before merging"
        )));
    }
    let mut b = GraphBuilder::new(opset, taken);
    b.unique(LABELS);
    let image = plan.student.inputs[0].name.clone();
    let batch = plan.student.inputs[0]
        .shape
        .first()
        .cloned()
        .unwrap_or(Dim::Symbol("N".into()));

    // Loss terms. Main stage: CE, then each method's (KD first when present). Init stage: the
    // init terms of the methods that have one.
    let mut terms: Vec<(String, String, f64)> = Vec::new();
    if stage == Stage::Main {
        let ce = cross_entropy(&mut b, &plan.student.logits.tensor);
        terms.push(("loss/ce".into(), ce, plan.hyper.gamma));
    }
    let mut state_inputs = Vec::new();
    let mut state_outputs = Vec::new();
    let mut notes = plan.notes.clone();
    for &method in &plan.methods {
        let spec = registry(method);
        if stage == Stage::Init && !spec.has_init_stage() {
            continue;
        }
        let pairs: Vec<&TapPair> = plan.pairs.iter().filter(|p| p.method == method).collect();
        let frozen = if stage == Stage::Main {
            spec.frozen_in_main()
        } else {
            &[]
        };
        let mut ctx = LossContext {
            b: &mut b,
            method,
            hyper: &plan.hyper,
            stage,
            image: image.clone(),
            batch_dim: batch.clone(),
            teacher_graph: original_teacher,
            frozen,
            state_inputs: Vec::new(),
            state_outputs: Vec::new(),
            notes: Vec::new(),
        };
        let term = spec.build(&mut ctx, &pairs)?;
        state_inputs.append(&mut ctx.state_inputs);
        state_outputs.append(&mut ctx.state_outputs);
        notes.append(&mut ctx.notes);
        let weight = match (stage, method) {
            (Stage::Init, _) => 1.0,
            (Stage::Main, MethodName::Kd) => plan.hyper.alpha,
            (Stage::Main, _) => plan.hyper.beta[&method],
        };
        if let Some(term) = term {
            terms.push((format!("loss/{method}"), term, weight));
        }
    }
    if terms.is_empty() {
        return Err(Error::usage(
            "no chosen method has an init stage (AB, FSP, FT)",
        ));
    }
    let mut weighted = Vec::new();
    for (output, term, weight) in &terms {
        b.node("Identity", &[term], &[output], vec![], output);
        b.doc_last("an unweighted loss term, comparable with a reference implementation");
        let w = b.scalar(&format!("kd/{output}/weight"), *weight as f32);
        weighted.push(b.mul(term, &w, &format!("kd/{output}/weighted")));
    }
    let total = b.sum_of(&weighted, "kd/loss/total");
    b.node("Identity", &[&total], &[LOSS], vec![], LOSS);
    b.doc_last(match stage {
        Stage::Main => "the weighted total: gamma * CE + alpha * KD + sum of beta * method terms",
        Stage::Init => "the init stage's loss: the sum of the init terms",
    });

    // Inputs and outputs in the documented order.
    let scalar = |name: &str, role: &'static str| Role {
        name: name.into(),
        role,
        dtype: "float32".into(),
        shape: vec![],
    };
    let mut outputs: Vec<Role> = vec![scalar(LOSS, "loss")];
    outputs.extend(terms.iter().map(|(name, _, _)| scalar(name, "term")));
    if stage == Stage::Main {
        outputs.extend(s_graph.output.iter().map(|o| {
            Role {
                name: o.name.clone(),
                role: "student",
                dtype: proto::value_elem_type(o)
                    .map(proto::dtype_name)
                    .unwrap_or("float32")
                    .into(),
                shape: plan
                    .student
                    .shapes
                    .get(&o.name)
                    .cloned()
                    .unwrap_or_default(),
            }
        }));
    }
    outputs.extend(state_outputs);
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
    if stage == Stage::Main {
        inputs.push(Role {
            name: LABELS.into(),
            role: "labels",
            dtype: "int64".into(),
            shape: vec![batch],
        });
    }
    inputs.extend(state_inputs);

    // Parameters: student weights and connector parameters train; BN running statistics freeze.
    let student_statistics: HashSet<String> = s_graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .chain(student.running_statistics.iter().cloned())
        .collect();
    let mut candidates = trainable_student_parameters(&s_graph, &student_statistics);
    candidates.extend(
        b.parameters
            .iter()
            .filter(|p| !p.frozen)
            .map(|p| p.name.clone()),
    );
    let mut statistics: Vec<String> = student_statistics.into_iter().collect();
    statistics.sort();
    statistics.extend(
        b.parameters
            .iter()
            .filter(|p| p.frozen)
            .map(|p| p.name.clone()),
    );

    let mut graph = pb::GraphProto {
        name: format!("kdgraph_{}", stage.name()),
        doc_string: format!(
            "knowledge distillation of `{s_shown}` from `{t_shown}` by kdgraph ({} stage)",
            stage.name()
        ),
        input: inputs.iter().map(value_info).collect(),
        ..Default::default()
    };
    graph.node.extend(t_graph.node);
    graph.node.extend(s_graph.node);
    graph.node.extend(b.nodes);
    graph.initializer.extend(t_graph.initializer);
    graph.initializer.extend(s_graph.initializer);
    graph.initializer.extend(b.initializers);
    graph.output = outputs.iter().map(value_info).collect();
    // Keep only what the outputs need (the init stage drops the classifier, for one).
    let wanted: HashSet<String> = outputs.iter().map(|o| o.name.clone()).collect();
    edit::prune_to(&mut graph, &wanted);
    edit::topological_sort(&mut graph)?;
    let reaching_loss = edit::ancestors(&graph, LOSS);
    let initializer_names: HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let requires_grad: Vec<String> = candidates
        .into_iter()
        .filter(|p| reaching_loss.contains(p.as_str()))
        .collect();
    let frozen_params: Vec<String> = statistics
        .into_iter()
        .filter(|p| initializer_names.contains(p.as_str()))
        .collect();

    let methods: Vec<String> = plan.methods.iter().map(|m| m.to_string()).collect();
    let model = pb::ModelProto {
        ir_version,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "kdgraph".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![
            pb::StringStringEntryProto {
                key: "kdgraph.version".into(),
                value: env!("CARGO_PKG_VERSION").into(),
            },
            pb::StringStringEntryProto {
                key: "kdgraph.methods".into(),
                value: methods.join(","),
            },
            pb::StringStringEntryProto {
                key: "kdgraph.stage".into(),
                value: stage.name().into(),
            },
        ],
        ..Default::default()
    };
    let sidecar = Sidecar {
        kdgraph_version: env!("CARGO_PKG_VERSION"),
        model_hash: String::new(),
        stage: stage.name(),
        model: files.model(stage),
        teacher: t_shown,
        student: s_shown,
        methods: plan.methods.clone(),
        hyper: plan.hyper.clone(),
        pairs: plan.pairs.clone(),
        requires_grad,
        frozen_params,
        inputs,
        outputs,
        stages: files.stages(),
        notes,
        warnings: plan.warnings.clone(),
    };
    Ok(Joint { model, sidecar })
}

/// The file names of the stage graphs and their sidecars, relative to the sidecar's folder.
#[derive(Debug, Clone)]
pub struct StageFiles {
    pub main: String,
    /// The init-stage graph, when a method has an init stage.
    pub init: Option<String>,
}

impl StageFiles {
    fn model(&self, stage: Stage) -> String {
        match stage {
            Stage::Main => self.main.clone(),
            Stage::Init => self.init.clone().unwrap_or_default(),
        }
    }

    /// The stages to train, in order.
    fn stages(&self) -> Vec<TrainingStage> {
        let sidecar =
            |model: &str| format!("{}.json", model.strip_suffix(".onnx").unwrap_or(model));
        let mut stages = Vec::new();
        if let Some(init) = &self.init {
            stages.push(TrainingStage {
                name: "init",
                model: init.clone(),
                sidecar: sidecar(init),
                epochs: Some(INIT_EPOCHS),
                carry_from: None,
            });
        }
        stages.push(TrainingStage {
            name: "main",
            model: self.main.clone(),
            sidecar: sidecar(&self.main),
            epochs: None,
            carry_from: self.init.as_ref().map(|_| "init"),
        });
        stages
    }
}

/// The reference's number of init-stage epochs (AB, FSP, FT).
pub const INIT_EPOCHS: u32 = 30;

fn checked_ir_version(model: &pb::ModelProto, shown: &str) -> Result<i64> {
    if model.ir_version > MAX_IR_VERSION {
        return Err(Error::input(format!(
            "`{shown}` has IR version {}, newer than the {MAX_IR_VERSION} ONNX Runtime Training 1.19 reads; \
             re-export it with an older onnx, or set ir_version to {MAX_IR_VERSION} with onnx.save",
            model.ir_version
        )));
    }
    Ok(model.ir_version)
}

/// A graph written by `kdgraph merge` must have a scalar `loss` output first and, where its
/// sidecar lies beside it, match the hash that sidecar recorded.
pub fn check_sidecar(model: &crate::LoadedModel, bytes: &[u8]) -> Result<()> {
    let shown = model.display();
    if model.graph().output.first().map(|o| o.name.as_str()) != Some(LOSS) {
        return Err(Error::input(format!(
            "`{shown}` has no `loss` output first; check runs graphs written by `kdgraph merge`"
        )));
    }
    let sidecar = crate::sidecar_path(&model.path);
    let Ok(text) = std::fs::read_to_string(&sidecar) else {
        return Ok(());
    };
    let recorded = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("model_hash")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    if recorded.is_some_and(|h| h != crate::onnx::io::content_hash(bytes)) {
        return Err(Error::input(format!(
            "`{shown}` and `{}` come from different merges (an interrupted merge?); run kdgraph merge again",
            sidecar.display()
        )));
    }
    Ok(())
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
        .flat_map(|n| {
            n.output
                .iter()
                .cloned()
                .chain(std::iter::once(n.name.clone()))
        })
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
}

/// Mean cross-entropy: stable log-softmax, GatherElements at the labels, mean, negated.
fn cross_entropy(b: &mut GraphBuilder, logits: &str) -> String {
    let log_p = b.log_softmax(logits, 1.0, "kd/ce/log_p");
    let labels = b.unsqueeze(LABELS, &[1], "kd/ce/labels_column");
    let picked = b.op(
        "GatherElements",
        &[&log_p, &labels],
        vec![("axis", Attr::Int(1))],
        "kd/ce/label_log_p",
    );
    let mean = b.mean_all(&picked, "kd/ce/mean_log_p");
    b.unary("Neg", &mean, "kd/ce/term")
}

/// Student float initializers in the places networks keep weights: conv and linear weights and
/// biases, BN scale and shift, bias-like Add/Mul operands. Shape constants and BN statistics are not.
fn trainable_student_parameters(
    graph: &pb::GraphProto,
    statistics: &HashSet<String>,
) -> Vec<String> {
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
        let Some((_, slots)) = weight_slots.iter().find(|(op, _)| *op == node.op_type) else {
            continue;
        };
        for &slot in slots.iter() {
            let Some(name) = node.input.get(slot) else {
                continue;
            };
            let Some(tensor) = initializers.get(name.as_str()) else {
                continue;
            };
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
    use pb::tensor_proto::DataType as T;
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
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
