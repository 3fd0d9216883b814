//! Analysis of one model: its inputs, where it can be tapped (stages with their pre-ReLU points,
//! embedding, logits) and the shapes there. Works on a normalised model (inference-form BN).

pub mod dataflow;
pub mod scopes;
pub mod shapes;
pub mod taps;

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::onnx::{pb, proto};
use dataflow::Dataflow;
pub use shapes::{show_shape, Dim, Shape};

/// A named tensor and its shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub tensor: String,
    pub shape: Shape,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputInfo {
    pub name: String,
    pub shape: Shape,
    pub dtype: String,
}

/// A spatial tap: index 0 is the stem, then one per stage.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub index: usize,
    pub name: String,
    pub tensor: String,
    pub shape: Shape,
    pub pre_relu: Option<String>,
}

impl Stage {
    pub fn info(&self) -> TensorInfo {
        TensorInfo {
            tensor: self.tensor.clone(),
            shape: self.shape.clone(),
        }
    }

    /// The tensor before the stage's final ReLU, with its shape (the same as the stage's).
    pub fn pre_relu_info(&self) -> Option<TensorInfo> {
        self.pre_relu.as_ref().map(|t| TensorInfo {
            tensor: t.clone(),
            shape: self.shape.clone(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelAnalysis {
    pub model: String,
    pub inputs: Vec<InputInfo>,
    pub stages: Vec<Stage>,
    pub embedding: TensorInfo,
    pub logits: TensorInfo,
    /// Things the user should act on (e.g. BatchNorms folded away in a student).
    pub warnings: Vec<String>,
    /// How the taps were chosen where a rule had to decide.
    pub notes: Vec<String>,
    /// Number of BatchNormalization nodes (0 means folded away or absent).
    #[serde(skip)]
    pub batchnorms: usize,
    /// The shape of every tensor tract could infer, for `--tap` and for the joint graph.
    #[serde(skip)]
    pub shapes: HashMap<String, Shape>,
    /// Tensors computed from the inputs' values (not weights, not shapes): what `--tap` may name.
    #[serde(skip)]
    pub data_tensors: Vec<String>,
}

impl ModelAnalysis {
    pub fn class_count(&self) -> Option<i64> {
        self.logits.shape.get(1).and_then(shapes::fixed)
    }

    /// A tensor computed from the inputs, with its shape.
    pub fn data_info(&self, tensor: &str) -> Option<TensorInfo> {
        if !self.data_tensors.iter().any(|t| t == tensor) {
            return None;
        }
        self.shapes.get(tensor).map(|s| TensorInfo {
            tensor: tensor.to_string(),
            shape: s.clone(),
        })
    }
}

/// Analyses a normalised model; `shown` is the file name used in messages.
pub fn analyse(model: &pb::ModelProto, shown: &str) -> Result<ModelAnalysis> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::input(format!("`{shown}` holds no graph")))?;
    let shapes = shapes::infer_shapes(model, shown)?;
    let flow = Dataflow::new(graph);
    let initializers = proto::initializers(graph);
    let inputs: Vec<InputInfo> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains_key(i.name.as_str()))
        .map(|i| InputInfo {
            name: i.name.clone(),
            shape: shapes.get(&i.name).cloned().unwrap_or_default(),
            dtype: proto::value_elem_type(i)
                .map(proto::dtype_name)
                .unwrap_or("unknown")
                .to_string(),
        })
        .collect();
    if inputs.is_empty() {
        return Err(Error::input(format!(
            "`{shown}` has no graph input to feed"
        )));
    }
    let image = &inputs[0];
    if image.shape.len() < 2
        || image
            .shape
            .iter()
            .skip(1)
            .any(|d| shapes::fixed(d).is_none())
    {
        return Err(Error::usage(format!(
            "`{shown}`: input `{}` has shape {}, with sizes only known at run time; pass the size to \
             distill at with --input-shape (e.g. --input-shape 3,224,224)",
            image.name,
            show_shape(&image.shape)
        )));
    }
    let logits = find_logits(graph, &shapes, shown)?;
    let found = taps::find_taps(&flow, &shapes, &logits, shown)?;
    let info = |t: &str| TensorInfo {
        tensor: t.to_string(),
        shape: shapes.get(t).cloned().unwrap_or_default(),
    };
    let stages = found
        .spatial
        .iter()
        .enumerate()
        .map(|(index, tensor)| Stage {
            index,
            name: if index == 0 {
                "stem".to_string()
            } else {
                format!("stage{index}")
            },
            tensor: tensor.clone(),
            shape: info(tensor).shape,
            pre_relu: taps::pre_relu(&flow, tensor).map(str::to_string),
        })
        .collect();
    let batchnorms = graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .count();
    Ok(ModelAnalysis {
        model: shown.to_string(),
        inputs,
        stages,
        embedding: info(&found.embedding),
        logits: info(&found.logits),
        warnings: Vec::new(),
        notes: found.notes,
        batchnorms,
        data_tensors: graph
            .node
            .iter()
            .flat_map(|n| n.output.iter())
            .filter(|t| flow.is_data(t))
            .cloned()
            .collect(),
        shapes,
    })
}

/// The logits: the first graph output of shape [N, classes].
fn find_logits(
    graph: &pb::GraphProto,
    shapes: &HashMap<String, Shape>,
    shown: &str,
) -> Result<String> {
    graph
        .output
        .iter()
        .find(|o| shapes.get(&o.name).is_some_and(|s| s.len() == 2))
        .map(|o| o.name.clone())
        .ok_or_else(|| {
            let names: Vec<String> = graph
                .output
                .iter()
                .map(|o| format!("`{}` {}", o.name, shapes.get(&o.name).map(|s| show_shape(s)).unwrap_or("?".into())))
                .collect();
            Error::input(format!(
                "`{shown}`: no graph output has the shape [batch, classes] of logits (outputs: {}); \
                 export the classifier's logits as an output",
                names.join(", ")
            ))
        })
}
