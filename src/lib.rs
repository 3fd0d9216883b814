//! kdgraph: turn a teacher and a student ONNX model into one knowledge-distillation training graph.
//!
//! The public API follows the flow of data: [`load`] a model, [`inspect`] it (find its taps),
//! [`plan`](plan::plan) the pairs for the chosen methods, and render the plan with [`report`].

pub mod analysis;
pub mod check;
pub mod error;
pub mod exercise;
mod guard;
pub mod joint;
pub mod methods;
pub mod onnx;
pub mod plan;
pub mod report;
mod suggest;

use std::path::Path;

pub use analysis::ModelAnalysis;
pub use error::{Error, Result};
pub use methods::MethodName;
pub use onnx::io::{load_model, LoadedModel};
pub use plan::{Plan, PlanOptions};

/// A model read from disk and put into the form kdgraph works on (inference-form BatchNorm).
pub struct PreparedModel {
    pub loaded: LoadedModel,
    /// Running statistics of BatchNorms that were rewritten from training mode (to be frozen).
    pub running_statistics: Vec<String>,
}

/// Loads a model and normalises it.
pub fn load(path: &Path, input_shape: Option<&[i64]>) -> Result<PreparedModel> {
    prepare(load_model(path)?, input_shape)
}

/// Validates and normalises a decoded model.
pub fn prepare(mut loaded: LoadedModel, input_shape: Option<&[i64]>) -> Result<PreparedModel> {
    let shown = loaded.display();
    let mut graph = loaded
        .proto
        .graph
        .take()
        .expect("load_model guarantees a graph");
    onnx::validate::validate(&mut graph, &loaded.proto, &shown)?;
    if let Some(dims) = input_shape {
        onnx::normalize::fix_input_shape(&mut graph, dims, &shown)?;
    }
    let running_statistics = onnx::normalize::inference_batchnorm(&mut graph, &shown)?;
    loaded.proto.graph = Some(graph);
    Ok(PreparedModel {
        loaded,
        running_statistics,
    })
}

/// Loads and analyses one model: its stages, taps and shapes.
pub fn inspect(path: &Path, input_shape: Option<&[i64]>) -> Result<ModelAnalysis> {
    let prepared = load(path, input_shape)?;
    analysis::analyse(&prepared.loaded.proto, &prepared.loaded.display())
}

/// Both models, loaded, and the plan that pairs their taps.
pub struct Merge {
    pub teacher: PreparedModel,
    pub student: PreparedModel,
    pub plan: Plan,
}

/// Loads and analyses both models and pairs their taps (what a dry run shows).
pub fn plan_merge(teacher: &Path, student: &Path, options: &PlanOptions) -> Result<Merge> {
    let teacher = load(teacher, options.input_shape.as_deref())?;
    let student = load(student, options.input_shape.as_deref())?;
    let t = analysis::analyse(&teacher.loaded.proto, &teacher.loaded.display())?;
    let s = analysis::analyse(&student.loaded.proto, &student.loaded.display())?;
    let plan = plan::plan(t, s, options)?;
    Ok(Merge {
        teacher,
        student,
        plan,
    })
}

/// The loss terms of one stage graph's tract run.
pub struct StageCheck {
    pub stage: &'static str,
    pub path: std::path::PathBuf,
    pub terms: Vec<check::Term>,
}

/// Writes the joint graph and its sidecar `<output>.json`, plus `<output>.init.onnx` and its
/// sidecar when a method has an init stage: all files together (atomically), after tract has run
/// every graph (unless `check_batch` is None).
pub fn write_joint(
    merge: &Merge,
    output: &Path,
    check_batch: Option<usize>,
) -> Result<Vec<StageCheck>> {
    let stages = stage_paths(merge, output)?;
    let file_name = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let files = joint::StageFiles {
        main: file_name(output),
        init: stages
            .iter()
            .find(|(s, _)| *s == methods::Stage::Init)
            .map(|(_, p)| file_name(p)),
    };
    let mut models = Vec::new();
    let mut sidecars = Vec::new();
    let mut checks = Vec::new();
    for (stage, path) in stages {
        let mut joint =
            joint::assemble(&merge.teacher, &merge.student, &merge.plan, stage, &files)?;
        if let Some(batch) = check_batch {
            let terms = check::run_losses(&joint.model, batch, &path.display().to_string())?;
            checks.push(StageCheck {
                stage: stage.name(),
                path: path.clone(),
                terms,
            });
        }
        let encoded = onnx::io::encode_model(joint.model, &path)?;
        // The sidecar records its graph's hash: a graph and a sidecar of two merges do not match.
        joint.sidecar.model_hash = onnx::io::content_hash(&encoded[0].1);
        models.extend(encoded);
        let sidecar =
            serde_json::to_string_pretty(&joint.sidecar).expect("a sidecar always serialises");
        sidecars.push((sidecar_path(&path), sidecar.into_bytes()));
    }
    let inputs = [
        merge.teacher.loaded.path.as_path(),
        merge.student.loaded.path.as_path(),
    ];
    let mut write = onnx::io::AtomicWrite::new();
    // Graphs first, sidecars last: an interruption between renames leaves a sidecar whose
    // model_hash does not match its graph, which `check` and the training example refuse.
    for (path, bytes) in models.iter().chain(&sidecars) {
        onnx::io::ensure_not_an_input(path, &inputs)?;
        write.stage(path, bytes)?;
    }
    write.commit()?;
    Ok(checks)
}

/// The graph file of each stage, init first; checked before any work so that a bad -o fails early.
pub fn stage_paths(
    merge: &Merge,
    output: &Path,
) -> Result<Vec<(methods::Stage, std::path::PathBuf)>> {
    if output.extension().is_some_and(|e| e == "json") {
        return Err(Error::usage(format!(
            "-o `{}`: the sidecar is written beside the graph as .json; name the graph .onnx",
            output.display()
        )));
    }
    let mut stages = vec![(methods::Stage::Main, output.to_path_buf())];
    if merge
        .plan
        .methods
        .iter()
        .any(|&m| methods::registry(m).has_init_stage())
    {
        stages.insert(
            0,
            (methods::Stage::Init, output.with_extension("init.onnx")),
        );
    }
    Ok(stages)
}

/// `joint.onnx` -> `joint.json`, `joint.init.onnx` -> `joint.init.json`.
pub fn sidecar_path(output: &Path) -> std::path::PathBuf {
    output.with_extension("json")
}

/// Loads a joint graph and runs it with tract at batch size `batch`.
pub fn check_joint(path: &Path, batch: usize) -> Result<Vec<check::Term>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::input(format!("cannot read `{}`: {e}", path.display())))?;
    let model = prepare(onnx::io::decode_model(&bytes, path)?, None)?.loaded;
    joint::check_sidecar(&model, &bytes)?;
    check::run_losses(&model.proto, batch, &model.display())
}
