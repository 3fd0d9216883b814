//! kdgraph: turn a teacher and a student ONNX model into one knowledge-distillation training graph.
//!
//! The public API follows the flow of data: [`load`] a model, [`inspect`] it (find its taps),
//! [`plan`](plan::plan) the pairs for the chosen methods, and render the plan with [`report`].

pub mod analysis;
pub mod check;
pub mod error;
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
pub fn load(path: &Path) -> Result<PreparedModel> {
    let mut loaded = load_model(path)?;
    let shown = loaded.display();
    let mut graph = loaded.proto.graph.take().expect("load_model guarantees a graph");
    onnx::validate::validate(&mut graph, &loaded.proto, &shown)?;
    let running_statistics = onnx::normalize::inference_batchnorm(&mut graph, &shown)?;
    loaded.proto.graph = Some(graph);
    Ok(PreparedModel { loaded, running_statistics })
}

/// Loads and analyses one model: its stages, taps and shapes.
pub fn inspect(path: &Path) -> Result<ModelAnalysis> {
    let prepared = load(path)?;
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
    let teacher = load(teacher)?;
    let student = load(student)?;
    let t = analysis::analyse(&teacher.loaded.proto, &teacher.loaded.display())?;
    let s = analysis::analyse(&student.loaded.proto, &student.loaded.display())?;
    let plan = plan::plan(t, s, options)?;
    Ok(Merge { teacher, student, plan })
}

/// Writes the joint graph and its sidecar `<output>.json` together (atomically), after tract has
/// run the graph (unless `check_batch` is None). Returns the loss terms of that run.
pub fn write_joint(merge: Merge, output: &Path, check_batch: Option<usize>) -> Result<Vec<check::Term>> {
    onnx::io::ensure_not_an_input(output, &[&merge.teacher.loaded.path, &merge.student.loaded.path])?;
    let file_name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let joint = joint::assemble(merge.teacher, merge.student, &merge.plan, &file_name)?;
    let terms = match check_batch {
        Some(batch) => check::run_losses(&joint.model, batch, &output.display().to_string())?,
        None => Vec::new(),
    };
    let sidecar_path = sidecar_path(output);
    let mut write = onnx::io::AtomicWrite::new();
    for (path, bytes) in onnx::io::encode_model(joint.model, output)? {
        write.stage(&path, &bytes)?;
    }
    let sidecar = serde_json::to_string_pretty(&joint.sidecar).expect("a sidecar always serialises");
    write.stage(&sidecar_path, sidecar.as_bytes())?;
    write.commit()?;
    Ok(terms)
}

/// `joint.onnx` -> `joint.json`.
pub fn sidecar_path(output: &Path) -> std::path::PathBuf {
    output.with_extension("json")
}

/// Loads a joint graph and runs it with tract at batch size `batch`.
pub fn check_joint(path: &Path, batch: usize) -> Result<Vec<check::Term>> {
    let model = load_model(path)?;
    check::run_losses(&model.proto, batch, &model.display())
}
