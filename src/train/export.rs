//! The trained student as an inference model: the student's own nodes taken from the joint graph
//! (pruned to the student's outputs, so neither `teacher/` nor `kd/` nodes remain), its trained
//! parameters and updated running statistics as initializers, BatchNorm in inference form.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::io::{encode_model, AtomicWrite};
use crate::onnx::{edit, normalize, pb};
use crate::plan::Role;
use crate::sidecar::TrainingSidecar;
use crate::step::{Carried, Initial};

/// The student of `joint` (shown as `shown`) alone, with the initial values of the carried
/// parameters and statistics replaced by `values` (one per `carried`, in order).
pub fn student_model(
    joint: &pb::ModelProto,
    sidecar: &TrainingSidecar,
    carried: &[Carried],
    values: &[Tensor],
    shown: &str,
) -> Result<pb::ModelProto> {
    let mut model = joint.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` holds no graph")))?;
    let outputs: HashSet<String> = role_names(&sidecar.outputs, "student");
    if outputs.is_empty() {
        return Err(Error::invalid_model(format!(
            "the sidecar of `{shown}` lists no student output; export from the main stage's graph"
        )));
    }
    let images = role_names(&sidecar.inputs, "image");
    graph.output.retain(|o| outputs.contains(&o.name));
    graph.input.retain(|i| images.contains(&i.name));
    edit::prune_to(graph, &outputs);
    normalize::inference_batchnorm(graph, shown)?;
    let trained: BTreeMap<String, Tensor> = carried
        .iter()
        .zip(values)
        .filter(|(c, _)| c.initial == Initial::Initializer)
        .map(|(c, v)| (c.input.clone(), v.clone()))
        .collect();
    super::replace_initializers(&mut model, &trained)?;
    let graph = model.graph.as_mut().expect("checked above");
    graph.name = "student".into();
    graph.doc_string = format!("the student of `{shown}`, trained by kdgraph train");
    model.metadata_props.retain(|p| p.key == "kdgraph.version");
    model.metadata_props.push(pb::StringStringEntryProto {
        key: "kdgraph.trained_from".into(),
        value: shown.to_string(),
    });
    Ok(model)
}

fn role_names(roles: &[Role], role: &str) -> HashSet<String> {
    roles
        .iter()
        .filter(|r| r.role == role)
        .map(|r| r.name.clone())
        .collect()
}

/// Writes `model` to `path` atomically (with a `.data` file beside it when it is that large).
pub fn write(model: pb::ModelProto, path: &Path) -> Result<()> {
    let mut write = AtomicWrite::new();
    for (file, bytes) in encode_model(model, path)? {
        write.stage(&file, &bytes)?;
    }
    write.commit()
}
