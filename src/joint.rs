//! Assembling the joint training graph from a plan: the student as it is, the teacher renamed
//! under `teacher/` with its BatchNorms folded, the loss subgraphs, and the sidecar that says
//! what to train and what to freeze.

use std::collections::{HashMap, HashSet};

use crate::analysis::shapes::{dim_values, fixed};
use crate::analysis::{parameters, Dim};
use crate::error::{Error, Result};
use crate::methods::{self, LossContext, TEACHER_PREFIX};
use crate::onnx::builder::GraphBuilder;
use crate::onnx::prepare::PreparedModel;
use crate::onnx::{edit, normalize, ort_training, pb, proto};
use crate::plan::{Plan, Role, TapPair, TrainingStage};
use crate::sidecar::{Sidecar, StageFiles, LABELS, LOSS};

pub struct Joint {
    pub model: pb::ModelProto,
    pub sidecar: Sidecar,
}

/// A loss term: its output name (`loss/<method>`), the tensor that holds it, and its weight.
struct Term {
    output: String,
    tensor: String,
    weight: f64,
}

/// What the loss terms add besides themselves: state read and written back (CRD's memories).
#[derive(Default)]
struct State {
    inputs: Vec<Role>,
    outputs: Vec<Role>,
}

/// Parameters by how they train: `requires_grad` (student weights, connectors) and frozen
/// (BatchNorm running statistics, connectors fixed in this stage).
struct Parameters {
    trainable: Vec<String>,
    frozen: Vec<String>,
}

/// A prepared model as one stage takes it: lent (the stage copies its graph) or given (the
/// stage takes its graph: the last stage, so that the weights are not copied).
pub enum Source<'a> {
    Borrowed(&'a PreparedModel),
    Owned(PreparedModel),
}

impl Source<'_> {
    /// The model's graph, its file name for messages, and its rewritten running statistics.
    fn into_parts(self) -> (pb::GraphProto, String, Vec<String>) {
        match self {
            Source::Borrowed(model) => (
                model.loaded.graph().clone(),
                model.loaded.display(),
                model.running_statistics.clone(),
            ),
            Source::Owned(mut model) => {
                let shown = model.loaded.display();
                let graph = model
                    .loaded
                    .proto
                    .graph
                    .take()
                    .expect("load_model guarantees a graph");
                (graph, shown, model.running_statistics)
            }
        }
    }
}

/// Builds the graph of one training stage of `plan` from the two prepared models. `files` names
/// the stage graphs as written, for the sidecar.
pub fn assemble(
    teacher: Source,
    student: Source,
    plan: &Plan,
    stage: TrainingStage,
    files: &StageFiles,
) -> Result<Joint> {
    let (t_graph, t_shown, _) = teacher.into_parts();
    let (s_graph, s_shown, running_statistics) = student.into_parts();
    let opset = plan.teacher.opset.max(plan.student.opset);
    let ir_version = plan.teacher.ir_version.max(plan.student.ir_version).max(8);
    let s_graph = prepare_student(s_graph, plan, opset);
    let t_graph = prepare_teacher(t_graph, &t_shown, plan, opset)?;
    let mut b = builder_for(&s_graph, &t_graph, opset, &s_shown)?;
    let batch = plan.student.inputs[0]
        .shape
        .first()
        .cloned()
        .unwrap_or(Dim::Symbol("N".into()));
    let (terms, state) = loss_terms(&mut b, plan, stage, &batch)?;
    add_total(&mut b, &terms, stage);
    let (inputs, outputs) = roles(plan, stage, &s_graph, &terms, state, batch);
    let parameters = parameters(&s_graph, &running_statistics, &b);

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
    let (requires_grad, frozen_params) = parameters.in_graph(&graph, &reaching_loss);
    let mut warnings = plan.warnings.clone();
    warnings.extend(ort_training::check_trainable_path(
        &graph,
        &requires_grad,
        &reaching_loss,
        &s_shown,
    )?);

    let model = model_proto(graph, plan, stage, opset, ir_version);
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
        notes: plan.notes.clone(),
        warnings,
        gradients: None,
        step: None,
    };
    Ok(Joint { model, sidecar })
}

/// The student as exported, with the rewrites ORT Training needs and the joint graph's opset.
fn prepare_student(mut graph: pb::GraphProto, plan: &Plan, opset: i64) -> pb::GraphProto {
    normalize::global_average_pool(&mut graph, |t| {
        match plan.student.shapes.get(t).map(Vec::as_slice) {
            Some([_, _, h, w]) => Some((fixed(h)?, fixed(w)?)),
            _ => None,
        }
    });
    if plan.student.opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut graph);
    }
    graph
}

/// The teacher: only what the taps need, BN folded (eval mode) unless asked otherwise, names
/// under `teacher/`, reading the student's inputs.
fn prepare_teacher(
    mut graph: pb::GraphProto,
    shown: &str,
    plan: &Plan,
    opset: i64,
) -> Result<pb::GraphProto> {
    if plan.teacher.opset < 18 && opset >= 18 {
        edit::upgrade_reduce_axes(&mut graph);
    }
    let needed: HashSet<String> = plan
        .pairs
        .iter()
        .map(|p| p.teacher.tensor.clone())
        .collect();
    edit::prune_to(&mut graph, &needed);
    normalize::inference_dropout(&mut graph, shown)?;
    if !plan.hyper.teacher_batch_statistics {
        edit::fold_batchnorm(&mut graph, &needed, shown)?;
    }
    let input_map: HashMap<String, String> = plan
        .teacher
        .inputs
        .iter()
        .zip(&plan.student.inputs)
        .map(|(t, s)| (t.name.clone(), s.name.clone()))
        .collect();
    edit::prefix_names(&mut graph, TEACHER_PREFIX, &input_map);
    Ok(graph)
}

/// A builder that knows every name of both graphs; the names the joint graph gives its labels
/// and losses must be free.
fn builder_for(
    s_graph: &pb::GraphProto,
    t_graph: &pb::GraphProto,
    opset: i64,
    s_shown: &str,
) -> Result<GraphBuilder> {
    let taken = proto::names_in(s_graph)
        .chain(proto::names_in(t_graph))
        .collect::<Vec<_>>();
    if let Some(clash) = taken
        .iter()
        .find(|n| *n == LABELS || *n == LOSS || n.starts_with("loss/"))
    {
        return Err(Error::invalid_model(format!(
            "student `{s_shown}` already has a tensor named `{clash}`, a name the joint graph gives its labels \
             or losses; rename it before merging"
        )));
    }
    let mut b = GraphBuilder::new(opset, taken);
    b.unique(LABELS);
    Ok(b)
}

/// The loss terms of a stage. Main stage: CE, then each method's (KD first when present). Init
/// stage: the init terms of the methods that have one.
fn loss_terms(
    b: &mut GraphBuilder,
    plan: &Plan,
    stage: TrainingStage,
    batch: &Dim,
) -> Result<(Vec<Term>, State)> {
    let mut terms = Vec::new();
    if stage == TrainingStage::Main {
        let ce = b.cross_entropy(&plan.student.logits.tensor, LABELS, "kd/ce");
        terms.push(Term {
            output: "loss/ce".into(),
            tensor: ce,
            weight: plan.hyper.gamma,
        });
    }
    let mut state = State::default();
    for &method in &plan.methods {
        let init_stage = method.spec().init_stage;
        if stage == TrainingStage::Init && init_stage.is_none() {
            continue;
        }
        let pairs: Vec<&TapPair> = plan.pairs.iter().filter(|p| p.method == method).collect();
        let frozen = match (stage, init_stage) {
            (TrainingStage::Main, Some(init)) => init.frozen_in_main,
            _ => &[],
        };
        let mut ctx = LossContext {
            b: &mut *b,
            method,
            hyper: &plan.hyper,
            stage,
            image: plan.student.inputs[0].name.clone(),
            batch_dim: batch.clone(),
            frozen,
            state_inputs: Vec::new(),
            state_outputs: Vec::new(),
        };
        let term = methods::builder(method)(&mut ctx, &pairs)?;
        state.inputs.append(&mut ctx.state_inputs);
        state.outputs.append(&mut ctx.state_outputs);
        let weight = match stage {
            TrainingStage::Init => 1.0,
            TrainingStage::Main if method.is_kd() => plan.hyper.alpha,
            TrainingStage::Main => plan.hyper.beta[&method],
        };
        if let Some(tensor) = term {
            terms.push(Term {
                output: format!("loss/{method}"),
                tensor,
                weight,
            });
        }
    }
    if terms.is_empty() {
        let with_init: Vec<&str> = methods::REGISTRY
            .iter()
            .filter(|r| r.spec.init_stage.is_some())
            .map(|r| r.spec.id)
            .collect();
        return Err(Error::usage(format!(
            "no chosen method has an init stage ({})",
            with_init.join(", ")
        )));
    }
    Ok((terms, state))
}

/// Each term as an unweighted output, and `loss`, their weighted sum.
fn add_total(b: &mut GraphBuilder, terms: &[Term], stage: TrainingStage) {
    let mut weighted = Vec::new();
    for term in terms {
        let output = &term.output;
        b.node("Identity", &[&term.tensor], &[output], vec![], output);
        b.doc_last("an unweighted loss term, comparable with a reference implementation");
        let w = b.scalar(&format!("kd/{output}/weight"), term.weight as f32);
        weighted.push(b.mul(&term.tensor, &w, &format!("kd/{output}/weighted")));
    }
    let total = b.sum_of(&weighted, "kd/loss/total");
    b.node("Identity", &[&total], &[LOSS], vec![], LOSS);
    b.doc_last(match stage {
        TrainingStage::Main => {
            "the weighted total: gamma * CE + alpha * KD + sum of beta * method terms"
        }
        TrainingStage::Init => "the init stage's loss: the sum of the init terms",
    });
}

/// Inputs and outputs in the documented order: inputs are the images, labels (main stage) and
/// state; outputs are `loss`, its terms, the student's outputs (main stage) and state.
fn roles(
    plan: &Plan,
    stage: TrainingStage,
    s_graph: &pb::GraphProto,
    terms: &[Term],
    state: State,
    batch: Dim,
) -> (Vec<Role>, Vec<Role>) {
    let scalar = |name: &str, role: &str| Role::new(name, role, "float32", vec![]);
    let mut outputs: Vec<Role> = vec![scalar(LOSS, "loss")];
    outputs.extend(terms.iter().map(|t| scalar(&t.output, "term")));
    if stage == TrainingStage::Main {
        outputs.extend(s_graph.output.iter().map(|o| {
            Role::new(
                &o.name,
                "student",
                proto::value_elem_type(o)
                    .map(proto::dtype_name)
                    .unwrap_or("float32"),
                plan.student
                    .shapes
                    .get(&o.name)
                    .cloned()
                    .unwrap_or_default(),
            )
        }));
    }
    outputs.extend(state.outputs);
    let mut inputs: Vec<Role> = plan
        .student
        .inputs
        .iter()
        .map(|i| Role::new(&i.name, "image", &i.dtype, i.shape.clone()))
        .collect();
    if stage == TrainingStage::Main {
        let classes = plan.student.class_count().unwrap_or(1);
        inputs.push(Role::new(LABELS, "labels", "int64", vec![batch]).indexing(classes));
    }
    inputs.extend(state.inputs);
    (inputs, outputs)
}

/// Student weights and connector parameters train; BN running statistics and frozen
/// connectors do not.
fn parameters(
    s_graph: &pb::GraphProto,
    running_statistics: &[String],
    b: &GraphBuilder,
) -> Parameters {
    let student_statistics: HashSet<String> = s_graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .chain(running_statistics.iter().cloned())
        .collect();
    let mut trainable = parameters::trainable_weights(s_graph, &student_statistics);
    trainable.extend(
        b.parameters
            .iter()
            .filter(|p| !p.frozen)
            .map(|p| p.name.clone()),
    );
    let mut frozen: Vec<String> = student_statistics.into_iter().collect();
    frozen.sort();
    frozen.extend(
        b.parameters
            .iter()
            .filter(|p| p.frozen)
            .map(|p| p.name.clone()),
    );
    Parameters { trainable, frozen }
}

impl Parameters {
    /// (`requires_grad`, `frozen_params`) of the finished graph: trainable parameters that
    /// reach the loss, frozen ones that are still initializers.
    fn in_graph(
        self,
        graph: &pb::GraphProto,
        reaching_loss: &HashSet<&str>,
    ) -> (Vec<String>, Vec<String>) {
        let initializer_names: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let requires_grad = self
            .trainable
            .into_iter()
            .filter(|p| reaching_loss.contains(p.as_str()))
            .collect();
        let frozen = self
            .frozen
            .into_iter()
            .filter(|p| initializer_names.contains(p.as_str()))
            .collect();
        (requires_grad, frozen)
    }
}

fn model_proto(
    graph: pb::GraphProto,
    plan: &Plan,
    stage: TrainingStage,
    opset: i64,
    ir_version: i64,
) -> pb::ModelProto {
    let methods: Vec<String> = plan.methods.iter().map(|m| m.to_string()).collect();
    let entry = |key: &str, value: String| pb::StringStringEntryProto {
        key: key.into(),
        value,
    };
    pb::ModelProto {
        ir_version,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "kdgraph".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![
            entry("kdgraph.version", env!("CARGO_PKG_VERSION").into()),
            entry("kdgraph.methods", methods.join(",")),
            entry("kdgraph.stage", stage.name().into()),
        ],
        ..Default::default()
    }
}

fn value_info(role: &Role) -> pb::ValueInfoProto {
    use pb::tensor_proto::DataType as T;
    let elem_type = match role.dtype.as_str() {
        "int64" => T::Int64,
        "float64" => T::Double,
        "float16" => T::Float16,
        _ => T::Float,
    };
    proto::tensor_info(&role.name, elem_type, dim_values(&role.shape))
}
