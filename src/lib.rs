//! kdgraph: turn a teacher and a student ONNX model into one knowledge-distillation training graph.
//!
//! The public API follows the flow of data: [`load`] a model, [`inspect`] it (find its taps),
//! [`plan`](plan::plan) the pairs for the chosen methods, and render the plan with [`report`].

pub mod analysis;
pub mod error;
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
    let graph = loaded.proto.graph.as_mut().expect("load_model guarantees a graph");
    let running_statistics = onnx::normalize::inference_batchnorm(graph, &shown)?;
    Ok(PreparedModel { loaded, running_statistics })
}

/// Loads and analyses one model: its stages, taps and shapes.
pub fn inspect(path: &Path) -> Result<ModelAnalysis> {
    let prepared = load(path)?;
    analysis::analyse(&prepared.loaded.proto, &prepared.loaded.display())
}

/// Analyses both models and pairs their taps.
pub fn plan_merge(teacher: &Path, student: &Path, options: &PlanOptions) -> Result<Plan> {
    let teacher = inspect(teacher)?;
    let student = inspect(student)?;
    plan::plan(teacher, student, options)
}
