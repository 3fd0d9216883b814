//! Analysis of one model: its inputs, where it can be tapped (stages with their pre-ReLU points,
//! embedding, logits) and the shapes there. Works on a normalised model (inference-form BN).

pub mod dataflow;
pub mod parameters;
pub mod scopes;
pub mod shapes;
pub mod support;
pub mod taps;

use std::collections::{HashMap, HashSet};

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

/// A spatial tap of the network: index 0 is the stem, then one per stage.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkStage {
    pub index: usize,
    pub name: String,
    pub tensor: String,
    pub shape: Shape,
    pub pre_relu: Option<String>,
    /// The module the stage tensor belongs to (`layer2.1`), where the export records one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl NetworkStage {
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
    pub stages: Vec<NetworkStage>,
    pub embedding: TensorInfo,
    pub logits: TensorInfo,
    /// The modules the embedding and the logits belong to (`avgpool`, `fc`), where the export
    /// records them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits_module: Option<String>,
    /// How the taps were chosen where a rule had to decide.
    pub notes: Vec<String>,
    /// Number of BatchNormalization nodes (0 means folded away or absent).
    #[serde(skip)]
    pub batchnorms: usize,
    /// Number of other normalisations (LayerNorm, GroupNorm, InstanceNorm), as nodes or written out.
    #[serde(skip)]
    pub other_norms: usize,
    /// The BatchNorm behind each tensor that is a BatchNorm's output or a sum with one (a
    /// residual block's pre-ReLU point), with its constant scale and shift.
    #[serde(skip)]
    pub batchnorm_outputs: HashMap<String, BatchNormParams>,
    /// The model's ai.onnx opset and IR version (within what ORT Training 1.19 reads).
    #[serde(skip)]
    pub opset: i64,
    #[serde(skip)]
    pub ir_version: i64,
    /// The shape of every tensor tract could infer, for `--tap` and for the joint graph.
    #[serde(skip)]
    pub shapes: HashMap<String, Shape>,
    /// Tensors computed from the inputs' values (not weights, not shapes): what `--tap` may name.
    #[serde(skip)]
    pub data_tensors: Vec<String>,
    /// The module path of each data tensor that has one, in graph order.
    #[serde(skip)]
    pub tensor_modules: Vec<(String, String)>,
    /// The tensors every path from the input to the logits passes through.
    #[serde(skip)]
    pub main_path: HashSet<String>,
}

/// A BatchNormalization's name and its constant per-channel scale (gamma) and shift (beta).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormParams {
    pub node: String,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl ModelAnalysis {
    /// The module path of a tap: its stage's where it is a stage tensor or its pre-ReLU point,
    /// else the tensor's own.
    pub fn module_of(&self, tensor: &str) -> Option<String> {
        match self
            .stages
            .iter()
            .find(|s| s.tensor == tensor || s.pre_relu.as_deref() == Some(tensor))
        {
            Some(stage) => stage.module.clone(),
            None => self
                .tensor_modules
                .iter()
                .find(|(t, _)| t == tensor)
                .map(|(_, m)| m.clone()),
        }
    }

    /// The output of the module at `path` (see [`scopes::module_output`]), with its shape.
    pub fn module_output(&self, path: &str) -> Option<TensorInfo> {
        self.data_info(scopes::module_output(
            &self.tensor_modules,
            &self.main_path,
            path,
        )?)
    }

    /// Every module path the export records, enclosing modules included.
    pub fn module_paths(&self) -> Vec<String> {
        scopes::all_paths(&self.tensor_modules)
    }

    /// The BatchNorm whose output is `tensor`, or is added into it.
    pub fn batchnorm_feeding(&self, tensor: &str) -> Option<&BatchNormParams> {
        self.batchnorm_outputs.get(tensor)
    }

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
/// `modules` holds the module paths the export recorded per node output (`LoadedModel::modules`).
pub fn analyse(
    model: &pb::ModelProto,
    modules: &HashMap<String, String>,
    shown: &str,
) -> Result<ModelAnalysis> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` holds no graph")))?;
    let (opset, ir_version) = support::check_versions(model, shown)?;
    let shapes = shapes::infer_shapes(model, shown)?;
    let flow = Dataflow::new(graph);
    let scopes = scopes::Scopes::new(&flow, modules);
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
        return Err(Error::invalid_model(format!(
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
    let found = taps::find_taps(&scopes, &shapes, &logits, shown)?;
    let info = |t: &str| TensorInfo {
        tensor: t.to_string(),
        shape: shapes.get(t).cloned().unwrap_or_default(),
    };
    let stages = found
        .spatial
        .iter()
        .enumerate()
        .map(|(index, tensor)| NetworkStage {
            index,
            name: if index == 0 {
                "stem".to_string()
            } else {
                format!("stage{index}")
            },
            tensor: tensor.clone(),
            shape: info(tensor).shape,
            module: scopes.module_path(tensor),
            pre_relu: taps::pre_relu(&flow, tensor)
                .or_else(|| {
                    (index > 0)
                        .then(|| taps::preactivation(&flow, tensor))
                        .flatten()
                })
                .map(str::to_string),
        })
        .collect();
    let mut notes = found.notes;
    if crate::onnx::normalize::draws_random(graph) {
        notes.push(
            "the model draws random numbers in training mode (Dropout, RandomUniformLike): kdgraph's tract runs \
             treat each Dropout as identity and each random draw as its lowest value; the joint graph keeps them"
                .into(),
        );
    }
    let data_tensors: Vec<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter())
        .filter(|t| flow.is_data(t))
        .cloned()
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
        embedding_module: scopes.module_path(&found.embedding),
        logits_module: scopes.module_path(&found.logits),
        notes,
        batchnorms,
        other_norms: other_normalisations(graph),
        batchnorm_outputs: batchnorm_outputs(graph, &flow),
        opset,
        ir_version,
        tensor_modules: data_tensors
            .iter()
            .filter_map(|t| Some((t.clone(), scopes.module_path(t)?)))
            .collect(),
        data_tensors,
        main_path: found.main_path.into_iter().collect(),
        shapes,
    })
}

/// LayerNormalization, GroupNormalization and InstanceNormalization nodes, plus each mean-centring
/// `Sub(x, ReduceMean(x))`: the start of a normalisation written out in plain operators (LayerNorm
/// before opset 17, and as kdgraph rewrites it for ORT Training).
fn other_normalisations(graph: &pb::GraphProto) -> usize {
    let means: HashMap<&str, &str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "ReduceMean" && !n.input.is_empty() && !n.output.is_empty())
        .map(|n| (n.output[0].as_str(), n.input[0].as_str()))
        .collect();
    graph
        .node
        .iter()
        .filter(|n| match n.op_type.as_str() {
            "LayerNormalization" | "GroupNormalization" | "InstanceNormalization" => true,
            "Sub" => {
                n.input.len() == 2 && means.get(n.input[1].as_str()) == Some(&n.input[0].as_str())
            }
            _ => false,
        })
        .count()
}

/// Every BatchNorm output with constant parameters, and every Add that sums one (the pre-ReLU
/// point of a residual block), mapped to that BatchNorm.
fn batchnorm_outputs(graph: &pb::GraphProto, flow: &Dataflow) -> HashMap<String, BatchNormParams> {
    let initializers = proto::initializers(graph);
    let params = |bn: &pb::NodeProto| -> Option<BatchNormParams> {
        let value = |i: usize| proto::float_values(initializers.get(bn.input.get(i)?.as_str())?);
        Some(BatchNormParams {
            node: bn.name.clone(),
            gamma: value(1)?,
            beta: value(2)?,
        })
    };
    let mut found = HashMap::new();
    for node in &graph.node {
        let bn = match node.op_type.as_str() {
            "BatchNormalization" => Some(node),
            "Add" => node
                .input
                .iter()
                .filter_map(|i| flow.producer(i))
                .find(|n| n.op_type == "BatchNormalization"),
            _ => None,
        };
        if let (Some(bn), Some(output)) = (bn, node.output.first()) {
            if let Some(p) = params(bn) {
                found.insert(output.clone(), p);
            }
        }
    }
    found
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
            Error::unsupported(format!(
                "`{shown}`: no graph output has the shape [batch, classes] of logits (outputs: {}); \
                 export the classifier's logits as an output",
                names.join(", ")
            ))
        })
}
