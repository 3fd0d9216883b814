//! The sidecar `<graph>.json` beside every graph `merge` writes: what to train, what to freeze,
//! which inputs and outputs play which role, and the stages to train in order. `merge` writes
//! it; `check` and the trainers read it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::onnx::io::LoadedModel;
use crate::plan::{Hyper, MethodName, Role, TapPair, TrainingStage};
use crate::step::{Carried, Optimizer};

/// The joint graph's labels input.
pub const LABELS: &str = "labels";
/// The joint graph's first output, the weighted total loss.
pub const LOSS: &str = "loss";

/// `<output>.json`: everything `generate_artifacts` needs, without opening the graph.
#[derive(Debug, Clone, Serialize)]
pub struct Sidecar {
    pub kdgraph_version: &'static str,
    /// The hash of the graph's bytes: a graph and a sidecar of two different merges do not match.
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
    pub stages: Vec<StageEntry>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    /// The gradient graph written beside this one (`merge --emit gradients`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradients: Option<GradientFile>,
    /// The step graph written beside this one (`merge --emit step`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<StepFile>,
}

/// A step graph kdgraph wrote: forward, backward and the optimizer's update in one graph.
#[derive(Debug, Clone, Serialize)]
pub struct StepFile {
    /// The step graph's file name, relative to the sidecar's folder.
    pub model: String,
    pub model_hash: String,
    pub optimizer: Optimizer,
    /// Scalar inputs fed every step: `lr` (float32) and, for AdamW, `step` (int64, 1 at the first step).
    pub schedule_inputs: Vec<String>,
    /// Values fed as `input` and returned as `output` (role `state`): parameters (initial values
    /// in this sidecar's graph, same names), optimizer moments (zeros), BatchNorm statistics.
    pub carried: Vec<Carried>,
}

/// A gradient graph kdgraph wrote: its file and what its added outputs hold.
#[derive(Debug, Clone, Serialize)]
pub struct GradientFile {
    /// The gradient graph's file name, relative to the sidecar's folder.
    pub model: String,
    /// The hash of the gradient graph's bytes.
    pub model_hash: String,
    /// One gradient output per trainable parameter, in `requires_grad` order.
    pub gradients: Vec<GradientOutput>,
    /// The updated running statistics of the student's BatchNorms (role `state`).
    pub state: Vec<StateOutput>,
}

/// `output` holds d loss / d `parameter`.
#[derive(Debug, Clone, Serialize)]
pub struct GradientOutput {
    pub parameter: String,
    pub output: String,
}

/// `output` holds the next value of `statistic` (a BatchNorm running mean or variance).
#[derive(Debug, Clone, Serialize)]
pub struct StateOutput {
    pub statistic: String,
    pub output: String,
}

/// One training stage in a sidecar's `stages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageEntry {
    pub name: String,
    pub model: String,
    pub sidecar: String,
    /// The reference's number of epochs for this stage, where it prescribes one.
    pub epochs: Option<u32>,
    /// Start from the parameters trained in this stage (matched by name).
    pub carry_from: Option<String>,
}

/// What a reader of a sidecar needs back: the hash and the inputs' roles.
#[derive(Debug, Clone, Deserialize)]
pub struct SidecarRoles {
    pub model_hash: String,
    pub inputs: Vec<Role>,
}

/// `joint.onnx` -> `joint.json`, `joint.init.onnx` -> `joint.init.json`.
pub fn sidecar_path(graph: &Path) -> PathBuf {
    graph.with_extension("json")
}

/// The file names of the stage graphs and their sidecars, relative to the sidecar's folder.
#[derive(Debug, Clone)]
pub struct StageFiles {
    pub main: String,
    /// The init-stage graph and its epochs, when a method has an init stage.
    pub init: Option<(String, u32)>,
}

impl StageFiles {
    pub fn model(&self, stage: TrainingStage) -> String {
        match stage {
            TrainingStage::Main => self.main.clone(),
            TrainingStage::Init => self.init.clone().map(|(m, _)| m).unwrap_or_default(),
        }
    }

    /// The stages to train, in order.
    pub fn stages(&self) -> Vec<StageEntry> {
        let sidecar =
            |model: &str| format!("{}.json", model.strip_suffix(".onnx").unwrap_or(model));
        let mut stages = Vec::new();
        if let Some((init, epochs)) = &self.init {
            stages.push(StageEntry {
                name: TrainingStage::Init.name().into(),
                model: init.clone(),
                sidecar: sidecar(init),
                epochs: Some(*epochs),
                carry_from: None,
            });
        }
        stages.push(StageEntry {
            name: TrainingStage::Main.name().into(),
            model: self.main.clone(),
            sidecar: sidecar(&self.main),
            epochs: None,
            carry_from: self
                .init
                .as_ref()
                .map(|_| TrainingStage::Init.name().into()),
        });
        stages
    }
}

/// Reads the sidecar of a graph written by `kdgraph merge`: the graph must have a scalar `loss`
/// output first, and its sidecar must lie beside it and record the hash of `bytes`.
pub fn read_for(model: &LoadedModel, bytes: &[u8]) -> Result<SidecarRoles> {
    let shown = model.display();
    if model.graph().output.first().map(|o| o.name.as_str()) != Some(LOSS) {
        return Err(Error::invalid_model(format!(
            "`{shown}` has no `loss` output first; check runs graphs written by `kdgraph merge`"
        )));
    }
    let path = sidecar_path(&model.path);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::io(format!(
            "cannot read `{}`, the sidecar of `{shown}`: {e}; keep the .json that `kdgraph merge` wrote beside the graph",
            path.display()
        ))
    })?;
    let sidecar: SidecarRoles = serde_json::from_str(&text).map_err(|e| {
        Error::invalid_model(format!(
            "`{}` is not a sidecar written by `kdgraph merge` ({e}); run kdgraph merge again",
            path.display()
        ))
    })?;
    if sidecar.model_hash != crate::onnx::io::content_hash(bytes) {
        return Err(Error::invalid_model(format!(
            "`{shown}` and `{}` come from different merges (an interrupted merge?); run kdgraph merge again",
            path.display()
        )));
    }
    Ok(sidecar)
}

/// What a trainer reads back from a sidecar: its graph, the roles of its inputs and outputs, the
/// stages to train, and the step graph written beside it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainingSidecar {
    pub model: String,
    pub model_hash: String,
    pub stage: String,
    pub inputs: Vec<Role>,
    pub outputs: Vec<Role>,
    pub stages: Vec<StageEntry>,
    pub step: Option<StepRead>,
}

/// The sidecar's `step` entry, as a trainer reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct StepRead {
    pub model: String,
    pub model_hash: String,
    pub carried: Vec<Carried>,
}

/// A stage as a trainer needs it: its sidecar, and its joint and step graphs' bytes (each checked
/// against the hash the sidecar records).
pub struct TrainingStageFiles {
    pub sidecar: TrainingSidecar,
    pub step: StepRead,
    pub joint_path: PathBuf,
    pub joint_bytes: Vec<u8>,
    pub step_path: PathBuf,
    pub step_bytes: Vec<u8>,
}

/// Reads the sidecar at `path` (a .json, or the .onnx beside it) and both graphs it names,
/// refusing a sidecar without a step graph or whose graphs do not match its hashes.
pub fn read_training(path: &Path) -> Result<TrainingStageFiles> {
    let json = sidecar_path(path);
    let shown = json.display();
    let text = std::fs::read_to_string(&json)
        .map_err(|e| Error::io(format!("cannot read the sidecar `{shown}`: {e}")))?;
    let sidecar: TrainingSidecar = serde_json::from_str(&text).map_err(|e| {
        Error::invalid_model(format!(
            "`{shown}` is not a sidecar written by `kdgraph merge` ({e}); run kdgraph merge again"
        ))
    })?;
    let step = sidecar.step.clone().ok_or_else(|| {
        Error::usage(format!(
            "`{shown}` lists no step graph; run `kdgraph merge ... --emit step` to write one"
        ))
    })?;
    let folder = json.parent().unwrap_or(Path::new("."));
    let joint_path = folder.join(&sidecar.model);
    let joint_bytes = read_matching(&joint_path, &sidecar.model_hash, &json)?;
    let step_path = folder.join(&step.model);
    let step_bytes = read_matching(&step_path, &step.model_hash, &json)?;
    Ok(TrainingStageFiles {
        sidecar,
        step,
        joint_path,
        joint_bytes,
        step_path,
        step_bytes,
    })
}

/// The bytes of `path`, which the sidecar `json` records with hash `hash`.
fn read_matching(path: &Path, hash: &str, json: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::io(format!(
            "cannot read `{}`, named by `{}`: {e}; keep the files `kdgraph merge` wrote together",
            path.display(),
            json.display()
        ))
    })?;
    if crate::onnx::io::content_hash(&bytes) != hash {
        return Err(Error::invalid_model(format!(
            "`{}` and `{}` come from different merges (an interrupted merge?); run kdgraph merge again",
            path.display(),
            json.display()
        )));
    }
    Ok(bytes)
}
