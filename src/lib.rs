//! kdgraph: turn a teacher and a student ONNX model into one knowledge-distillation training graph.
//!
//! The public API follows the flow of data: [`load`] a model, [`inspect`] it (find its taps),
//! [`plan`](plan::plan) the pairs for the chosen methods, and render the plan with [`report`].

mod analysis;
mod arrays;
mod autodiff;
mod check;
pub mod error;
#[cfg(any(test, feature = "fuzz-harness"))]
pub mod exercise;
mod gradient;
mod guard;
mod joint;
mod methods;
mod onnx;
mod plan;
pub mod report;
mod sidecar;
mod step;
mod suggest;
mod train;

use std::path::{Path, PathBuf};

pub use analysis::ModelAnalysis;
pub use check::Term;
pub use error::{Error, ErrorKind, Result};
pub use gradient::Objective;
pub use onnx::io::{load_model, LoadedModel};
pub use onnx::pb;
pub use onnx::prepare::{prepare, PreparedModel};
pub use plan::{
    MethodName, OptionKind, OptionSpec, OptionValue, Pairing, Plan, PlanOptions, TrainingStage,
};
pub use sidecar::sidecar_path;
pub use step::Optimizer;
pub use train::{train, Length, Outcome, ScheduleKind, TrainOptions};

/// Loads a model and normalises it.
pub fn load(path: &Path, input_shape: Option<&[i64]>) -> Result<PreparedModel> {
    prepare(load_model(path)?, input_shape)
}

/// Loads and analyses one model: its stages, taps and shapes.
pub fn inspect(path: &Path, input_shape: Option<&[i64]>) -> Result<ModelAnalysis> {
    let prepared = load(path, input_shape)?;
    analysis::analyse(
        &prepared.loaded.proto,
        &prepared.loaded.modules,
        &prepared.loaded.display(),
    )
}

/// Both models, loaded, and the plan that pairs their taps.
pub struct Merge {
    pub teacher: PreparedModel,
    pub student: PreparedModel,
    pub plan: Plan,
}

/// Every method kdgraph has, in the order help lists them.
pub fn methods() -> Vec<MethodName> {
    methods::all()
}

/// Checks what can be checked before any model is read: outputs that would replace an input or
/// cannot be written, and method options a written graph needs.
pub fn check_request(
    teacher: &Path,
    student: &Path,
    options: &PlanOptions,
    output: Option<&Path>,
    dot: Option<&Path>,
) -> Result<()> {
    let inputs = [teacher, student];
    if let Some(dot) = dot {
        onnx::io::ensure_not_an_input(dot, &inputs)?;
        report::check_graphviz(dot)?;
    }
    let Some(output) = output else {
        return Ok(());
    };
    onnx::io::ensure_not_an_input(output, &inputs)?;
    check_output_folder(output)?;
    for method in methods::all() {
        if !options.methods.iter().any(|m| m == method.as_str()) {
            continue;
        }
        for option in method.spec().options {
            let given = options
                .method_options
                .iter()
                .any(|(flag, _)| flag == option.flag);
            if option.default.is_none() && !given {
                return Err(Error::usage(plan::missing_option(method, option)));
            }
        }
    }
    Ok(())
}

/// The folder of `-o` must exist, and `-o` must not be a folder.
fn check_output_folder(output: &Path) -> Result<()> {
    let folder = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(Error::usage(format!(
            "cannot write `{}`: the folder `{}` does not exist (or is not a folder); create it first",
            output.display(),
            folder.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::usage(format!(
            "-o `{}` is a folder; give the graph a file name",
            output.display()
        )));
    }
    Ok(())
}

/// Loads and analyses both models and pairs their taps (what a dry run shows).
pub fn plan_merge(teacher: &Path, student: &Path, options: &PlanOptions) -> Result<Merge> {
    let teacher = load(teacher, options.input_shape.as_deref())?;
    let mut student = load(student, options.input_shape.as_deref())?;
    let opset = onnx::proto::onnx_opset(&student.loaded.proto);
    let graph = student
        .loaded
        .proto
        .graph
        .as_mut()
        .expect("prepared models have graphs");
    let rewrites = onnx::ort_forms::rewrite_for_ort_training(graph, opset);
    let t = analysis::analyse(
        &teacher.loaded.proto,
        &teacher.loaded.modules,
        &teacher.loaded.display(),
    )?;
    let s = analysis::analyse(
        &student.loaded.proto,
        &student.loaded.modules,
        &student.loaded.display(),
    )?;
    let mut plan = plan::plan(t, s, options, &methods::all())?;
    let shown = student.loaded.display();
    plan.notes.extend(
        rewrites
            .into_iter()
            .map(|r| format!("student `{shown}`: {r}")),
    );
    Ok(Merge {
        teacher,
        student,
        plan,
    })
}

/// Writes the plan's Graphviz picture to `path` (atomically): DOT text, or rendered by Graphviz
/// for a `.svg`, `.png` or `.pdf` file.
pub fn write_dot(plan: &Plan, path: &Path) -> Result<()> {
    let dot = report::plan_dot(plan);
    let bytes = match report::graphviz_format(path) {
        Some(format) => report::render_graphviz(&dot, format, path)?,
        None => dot.into_bytes(),
    };
    let mut write = onnx::io::AtomicWrite::new();
    write.stage(path, &bytes)?;
    write.commit()
}

/// One stage graph as written: its files and, where tract ran it, its loss terms.
pub struct WrittenStage {
    pub stage: TrainingStage,
    pub graph: PathBuf,
    pub sidecar: PathBuf,
    pub terms: Option<Vec<Term>>,
}

/// Writes the joint graph and its sidecar `<output>.json`, plus `<output>.init.onnx` and its
/// sidecar when a method has an init stage: all files together (atomically), after tract has run
/// every graph (unless `check_batch` is None). Stages are returned init first. The models are
/// consumed: the last stage takes their graphs instead of copying them (the weights are most of
/// a merge's memory and much of its time).
pub fn write_joint(
    teacher: PreparedModel,
    student: PreparedModel,
    plan: &Plan,
    output: &Path,
    check_batch: Option<usize>,
    emit: &Emit,
) -> Result<Vec<WrittenStage>> {
    let stages = stage_paths(plan, output)?;
    let file_name = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let files = sidecar::StageFiles {
        main: file_name(output),
        init: stages
            .iter()
            .find(|(s, _)| *s == TrainingStage::Init)
            .map(|(_, p)| (file_name(p), init_epochs(plan))),
    };
    let mut models = Vec::new();
    let mut sidecars = Vec::new();
    let mut written = Vec::new();
    let input_paths = [teacher.loaded.path.clone(), student.loaded.path.clone()];
    let mut models_left = Some((teacher, student));
    let last = stages.len() - 1;
    for (index, (stage, path)) in stages.into_iter().enumerate() {
        let sources = if index == last {
            let (teacher, student) = models_left
                .take()
                .expect("the last stage takes the models once");
            (joint::Source::Owned(teacher), joint::Source::Owned(student))
        } else {
            let (teacher, student) = models_left.as_ref().expect("taken by the last stage only");
            (
                joint::Source::Borrowed(teacher),
                joint::Source::Borrowed(student),
            )
        };
        let mut joint = joint::assemble(sources.0, sources.1, plan, stage, &files)?;
        let terms = match check_batch {
            Some(batch) => Some(check::run_losses(
                &joint.model,
                &joint.sidecar.inputs,
                batch,
                &path.display().to_string(),
            )?),
            None => None,
        };
        let derived = match emit {
            Emit::Joint => None,
            Emit::Gradients => {
                let grad_path = gradient_path(&path);
                let (model, mut file) = gradient::joint_gradients(
                    &joint.model,
                    &joint.sidecar.requires_grad,
                    &grad_path.display().to_string(),
                )?;
                if let Some(batch) = check_batch {
                    check::run_finite(
                        &model,
                        &joint.sidecar.inputs,
                        batch,
                        Default::default(),
                        &grad_path.display().to_string(),
                    )?;
                }
                let encoded = onnx::io::encode_model(model, &grad_path)?;
                file.model = file_name(&grad_path);
                file.model_hash = onnx::io::content_hash(&encoded[0].1);
                joint.sidecar.gradients = Some(file);
                Some(encoded)
            }
            Emit::Step(optimizer) => {
                let step_path = step_path(&path);
                let shown = step_path.display().to_string();
                let (model, file) =
                    gradient::joint_gradients(&joint.model, &joint.sidecar.requires_grad, &shown)?;
                let gradients: Vec<(String, String)> = file
                    .gradients
                    .iter()
                    .map(|g| (g.parameter.clone(), g.output.clone()))
                    .collect();
                let statistics: Vec<(String, String)> = file
                    .state
                    .iter()
                    .map(|s| (s.statistic.clone(), s.output.clone()))
                    .collect();
                let step = step::append_step(&model, &gradients, &statistics, optimizer)?;
                if let Some(batch) = check_batch {
                    let known = step::first_step_values(&joint.model, &step.carried, optimizer);
                    check::run_finite(&step.model, &joint.sidecar.inputs, batch, known, &shown)?;
                }
                let encoded = onnx::io::encode_model(step.model, &step_path)?;
                let mut schedule_inputs = vec![step::LR.to_string()];
                if optimizer.needs_step() {
                    schedule_inputs.push(step::STEP.to_string());
                }
                joint.sidecar.step = Some(sidecar::StepFile {
                    model: file_name(&step_path),
                    model_hash: onnx::io::content_hash(&encoded[0].1),
                    optimizer: optimizer.clone(),
                    schedule_inputs,
                    carried: step.carried,
                });
                Some(encoded)
            }
        };
        let encoded = onnx::io::encode_model(joint.model, &path)?;
        // The sidecar records its graph's hash: a graph and a sidecar of two merges do not match.
        joint.sidecar.model_hash = onnx::io::content_hash(&encoded[0].1);
        models.extend(encoded);
        models.extend(derived.into_iter().flatten());
        let sidecar =
            serde_json::to_string_pretty(&joint.sidecar).expect("a sidecar always serialises");
        sidecars.push((sidecar_path(&path), sidecar.into_bytes()));
        written.push(WrittenStage {
            stage,
            sidecar: sidecar_path(&path),
            graph: path,
            terms,
        });
    }
    let inputs = [input_paths[0].as_path(), input_paths[1].as_path()];
    let mut write = onnx::io::AtomicWrite::new();
    // Graphs first, sidecars last: an interruption between renames leaves a sidecar whose
    // model_hash does not match its graph, which `check` and the training example refuse.
    for (path, bytes) in models.iter().chain(&sidecars) {
        onnx::io::ensure_not_an_input(path, &inputs)?;
        write.stage(path, bytes)?;
    }
    write.commit()?;
    Ok(written)
}

/// What `merge` writes besides the joint graph and its sidecar.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Emit {
    /// The joint graph only (for ONNX Runtime Training).
    #[default]
    Joint,
    /// Also `<output>.grad.onnx`: the joint graph differentiated by kdgraph.
    Gradients,
    /// Also `<output>.step.onnx`: forward, backward and this optimizer's update in one graph.
    Step(Optimizer),
}

/// `joint.onnx` -> `joint.step.onnx`, `joint.init.onnx` -> `joint.init.step.onnx`.
pub fn step_path(graph: &Path) -> PathBuf {
    graph.with_extension("step.onnx")
}

/// `joint.onnx` -> `joint.grad.onnx`, `joint.init.onnx` -> `joint.init.grad.onnx`.
pub fn gradient_path(graph: &Path) -> PathBuf {
    graph.with_extension("grad.onnx")
}

/// The init stage's epochs: the longest any chosen method's reference prescribes.
fn init_epochs(plan: &Plan) -> u32 {
    plan.methods
        .iter()
        .filter_map(|m| m.spec().init_stage.map(|i| i.epochs))
        .max()
        .unwrap_or(0)
}

/// The graph file of each stage, init first; checked before any work so that a bad -o fails early.
fn stage_paths(plan: &Plan, output: &Path) -> Result<Vec<(TrainingStage, PathBuf)>> {
    if output.extension().is_some_and(|e| e == "json") {
        return Err(Error::usage(format!(
            "-o `{}`: the sidecar is written beside the graph as .json; name the graph .onnx",
            output.display()
        )));
    }
    let mut stages = vec![(TrainingStage::Main, output.to_path_buf())];
    if plan.methods.iter().any(|m| m.spec().init_stage.is_some()) {
        stages.insert(0, (TrainingStage::Init, output.with_extension("init.onnx")));
    }
    Ok(stages)
}

/// What `kdgraph grad` wrote: the gradient graph, its sidecar, and how many gradients it holds.
pub struct WrittenGradients {
    pub graph: PathBuf,
    pub sidecar: PathBuf,
    pub gradients: usize,
    pub state: usize,
    pub notes: Vec<String>,
}

/// Differentiates `model` for `objective` with respect to `wrt` (default: its weights) and
/// writes the gradient graph to `output` and its sidecar beside it (atomically).
pub fn write_gradients(
    model: &Path,
    objective: &Objective,
    wrt: &[String],
    output: &Path,
    input_shape: Option<&[i64]>,
) -> Result<WrittenGradients> {
    onnx::io::ensure_not_an_input(output, &[model])?;
    check_output_folder(output)?;
    let prepared = load(model, input_shape)?;
    let mut grad = gradient::classifier_gradients(&prepared, objective, wrt)?;
    let encoded = onnx::io::encode_model(grad.model, output)?;
    grad.sidecar.model_hash = onnx::io::content_hash(&encoded[0].1);
    let sidecar = sidecar_path(output);
    let text = serde_json::to_string_pretty(&grad.sidecar).expect("a sidecar always serialises");
    let mut write = onnx::io::AtomicWrite::new();
    for (path, bytes) in &encoded {
        onnx::io::ensure_not_an_input(path, &[model])?;
        write.stage(path, bytes)?;
    }
    write.stage(&sidecar, text.as_bytes())?;
    write.commit()?;
    Ok(WrittenGradients {
        graph: output.to_path_buf(),
        sidecar,
        gradients: grad.sidecar.gradients.len(),
        state: grad.sidecar.state.len(),
        notes: grad.sidecar.notes,
    })
}

/// Runs any graph with tract on the arrays of `inputs` (.npz, one per graph input, by name) and
/// writes every graph output to `output` (.npz, by name). Returns the output names.
pub fn run_model(model: &Path, inputs: &Path, output: &Path) -> Result<Vec<String>> {
    onnx::io::ensure_not_an_input(output, &[model, inputs])?;
    check_output_folder(output)?;
    let mut loaded = load_model(model)?;
    let shown = loaded.display();
    // value_info are hints; a symbolic batch in them conflicts with the concrete one fed here.
    if let Some(graph) = loaded.proto.graph.as_mut() {
        graph.value_info.clear();
    }
    let mut given = arrays::read_npz(inputs)?;
    let fed = check::fed_inputs(&loaded.proto, &shown)?;
    let mut values = Vec::with_capacity(fed.len());
    for input in &fed {
        let position = given
            .iter()
            .position(|(name, _)| *name == input.name)
            .ok_or_else(|| {
                Error::usage(format!(
                "`{}` has no array `{}`, an input of `{shown}`; save every input under its name",
                inputs.display(),
                input.name
            ))
            })?;
        let (name, value) = given.swap_remove(position);
        check::check_fed_value(input, &value, &shown)
            .map_err(|why| Error::usage(format!("`{}`: array `{name}` {why}", inputs.display())))?;
        values.push(value);
    }
    if let Some((extra, _)) = given.first() {
        return Err(Error::usage(format!(
            "`{}` has an array `{extra}` that `{shown}` has no input for; remove it or check the names",
            inputs.display()
        )));
    }
    let outputs = check::run_graph(&loaded.proto, values, &shown)?;
    let bytes = arrays::write_npz(output, &outputs)?;
    let mut write = onnx::io::AtomicWrite::new();
    write.stage(output, &bytes)?;
    write.commit()?;
    Ok(outputs.into_iter().map(|(name, _)| name).collect())
}

/// Loads a joint graph written by `kdgraph merge`, with its sidecar, and runs it with tract at
/// batch size `batch`.
pub fn check_joint(path: &Path, batch: usize) -> Result<Vec<Term>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read `{}`: {e}", path.display())))?;
    let model = prepare(onnx::io::decode_model(&bytes, path)?, None)?.loaded;
    let roles = sidecar::read_for(&model, &bytes)?;
    check::run_losses(&model.proto, &roles.inputs, batch, &model.display())
}
