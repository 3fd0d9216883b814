//! Shapes of every named tensor of a model, from tract's shape inference (batch dims stay symbolic).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{Error, Result};
use crate::onnx::{pb, proto};

/// One dimension: a number, or a symbol such as the batch size `N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

pub type Shape = Vec<Dim>;

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// `[N, 64, 32, 32]` as users read it.
pub fn show_shape(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// Dims as value_info dims (a symbol stays a `dim_param`).
pub fn dim_values(shape: &[Dim]) -> Vec<pb::tensor_shape_proto::dimension::Value> {
    use pb::tensor_shape_proto::dimension::Value;
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Value::DimValue(*n),
            Dim::Symbol(s) => Value::DimParam(s.clone()),
        })
        .collect()
}

/// The fixed value of a dimension, if it has one.
pub fn fixed(dim: &Dim) -> Option<i64> {
    match dim {
        Dim::Fixed(n) => Some(*n),
        Dim::Symbol(_) => None,
    }
}

/// What tract's inference knows of one tensor: its shape and its ONNX element type, where found.
#[derive(Debug, Clone, Default)]
pub struct TensorFacts {
    pub shape: Option<Shape>,
    pub elem_type: Option<i32>,
    /// The values of a small integer tensor that inference computed (axes, shapes).
    pub ints: Option<Vec<i64>>,
}

/// Runs tract's shape inference on a (normalised) model and returns the known shapes by tensor name.
pub fn infer_shapes(model: &pb::ModelProto, shown: &str) -> Result<HashMap<String, Shape>> {
    Ok(infer_facts(model, shown)?
        .into_iter()
        .filter_map(|(name, facts)| Some((name, facts.shape?)))
        .collect())
}

/// Runs tract's inference on a (normalised) model: shape and element type by tensor name.
pub fn infer_facts(model: &pb::ModelProto, shown: &str) -> Result<HashMap<String, TensorFacts>> {
    crate::guard::catch_panic(|| tract_facts(model, shown)).unwrap_or_else(|panic| {
        Err(Error::invalid_model(format!(
            "`{shown}`: tract failed while inferring shapes: {panic}; the graph is probably malformed"
        )))
    })
}

fn tract_facts(model: &pb::ModelProto, shown: &str) -> Result<HashMap<String, TensorFacts>> {
    let model = &weights_as_inputs(model);
    let stand_in = crate::onnx::normalize::for_tract(model);
    let model = stand_in.as_ref().unwrap_or(model);
    let onnx = tract_onnx::onnx();
    let parsed = onnx.parse(model, None).map_err(|e| {
        Error::unsupported(format!(
            "`{shown}`: tract cannot read the graph: {}",
            root_cause(&e)
        ))
    })?;
    let mut inference = parsed.model;
    // Obstinate: keep every fact that can be found even where one node cannot be analysed.
    let _ = inference.analyse(true);
    let mut facts = HashMap::with_capacity(parsed.outlets_by_name.len());
    for (name, outlet) in &parsed.outlets_by_name {
        let Ok(fact) = inference.outlet_fact(*outlet) else {
            continue;
        };
        let shape = fact
            .shape
            .concretize()
            .map(|dims| dims.iter().map(to_dim).collect());
        let elem_type = fact.datum_type.concretize().and_then(onnx_elem_type);
        let ints = fact.value.concretize().and_then(|t| small_ints(&t));
        facts.insert(
            name.clone(),
            TensorFacts {
                shape,
                elem_type,
                ints,
            },
        );
    }
    Ok(facts)
}

/// Floating-point initializers larger than this are weights to shape inference: their values
/// decide no shape (a Resize's scales, a Range's bounds are scalars or a few numbers).
const WEIGHT_ELEMENTS: i64 = 64;

/// The model as shape inference needs it: every floating-point initializer of more than
/// [`WEIGHT_ELEMENTS`] elements becomes a graph input of its type and shape, so that tract does
/// not copy the weights' bytes (most of a model) into tensors of its own. The other fields are
/// copied; the weights' bytes are not.
fn weights_as_inputs(model: &pb::ModelProto) -> pb::ModelProto {
    use pb::tensor_proto::DataType as T;
    let Some(graph) = model.graph.as_ref() else {
        return model.clone();
    };
    let weight_type = |t: &pb::TensorProto| {
        let float = [T::Float, T::Double, T::Float16, T::Bfloat16]
            .into_iter()
            .find(|&d| t.data_type == d as i32);
        float.filter(|_| t.dims.iter().product::<i64>() > WEIGHT_ELEMENTS)
    };
    let listed: std::collections::HashSet<&str> =
        graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut input = graph.input.clone();
    let mut initializer = Vec::new();
    for tensor in &graph.initializer {
        match weight_type(tensor) {
            None => initializer.push(tensor.clone()),
            Some(elem_type) if !listed.contains(tensor.name.as_str()) => input.push(
                proto::tensor_info(&tensor.name, elem_type, proto::fixed_dims(&tensor.dims)),
            ),
            Some(_) => {}
        }
    }
    pb::ModelProto {
        ir_version: model.ir_version,
        opset_import: model.opset_import.clone(),
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: String::new(),
        graph: Some(pb::GraphProto {
            node: graph.node.clone(),
            name: graph.name.clone(),
            initializer,
            sparse_initializer: graph.sparse_initializer.clone(),
            doc_string: String::new(),
            input,
            output: graph.output.clone(),
            value_info: graph.value_info.clone(),
            quantization_annotation: graph.quantization_annotation.clone(),
        }),
        metadata_props: model.metadata_props.clone(),
        training_info: Vec::new(),
        functions: model.functions.clone(),
    }
}

/// The values of an integer tensor of at most 64 elements; a tensor of dimensions (`Shape` of a
/// tensor with a symbolic batch, and what is computed from it) where every value is a number.
fn small_ints(tensor: &Tensor) -> Option<Vec<i64>> {
    let integer = tensor.datum_type().is_integer() || tensor.datum_type() == DatumType::TDim;
    if !integer || tensor.len() > 64 {
        return None;
    }
    let cast = tensor.cast_to::<i64>().ok()?;
    Some(
        cast.to_plain_array_view::<i64>()
            .ok()?
            .iter()
            .copied()
            .collect(),
    )
}

fn onnx_elem_type(datum: DatumType) -> Option<i32> {
    use pb::tensor_proto::DataType as T;
    let t = match datum {
        DatumType::F32 => T::Float,
        DatumType::F64 => T::Double,
        DatumType::F16 => T::Float16,
        DatumType::I64 => T::Int64,
        DatumType::I32 => T::Int32,
        DatumType::I16 => T::Int16,
        DatumType::I8 => T::Int8,
        DatumType::U8 => T::Uint8,
        DatumType::Bool => T::Bool,
        _ => return None,
    };
    Some(t as i32)
}

fn to_dim(dim: &TDim) -> Dim {
    match dim.to_i64() {
        Ok(n) => Dim::Fixed(n),
        Err(_) => Dim::Symbol(dim.to_string()),
    }
}

fn root_cause(e: &TractError) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::float_tensor;
    use pb::tensor_proto::DataType;

    /// x [N, 3, 8, 8] -> Conv (weight [4, 3, 3, 3], bias [4]) -> Reshape to [-1, 4 * 36].
    fn conv_then_reshape() -> pb::ModelProto {
        let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|i| i.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        };
        let shape = pb::TensorProto {
            name: "shape".into(),
            dims: vec![2],
            data_type: DataType::Int64 as i32,
            int64_data: vec![-1, 144],
            ..Default::default()
        };
        let dims = [pb::tensor_shape_proto::dimension::Value::DimParam(
            "N".into(),
        )]
        .into_iter()
        .chain(proto::fixed_dims(&[3, 8, 8]));
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: vec![
                    node("Conv", &["x", "w", "b"], "y"),
                    node("Reshape", &["y", "shape"], "z"),
                ],
                initializer: vec![
                    float_tensor("w", &[4, 3, 3, 3], &[0.5; 108]),
                    float_tensor("b", &[4], &[0.0; 4]),
                    shape,
                ],
                input: vec![proto::tensor_info("x", DataType::Float, dims)],
                output: vec![proto::tensor_info("z", DataType::Float, [])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn weights_become_inputs_and_shapes_stay() {
        let model = conv_then_reshape();
        let stand_in = weights_as_inputs(&model);
        let graph = stand_in.graph.as_ref().unwrap();
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            initializers,
            ["b", "shape"],
            "the bias (4 values) and the int64 shape stay"
        );
        assert_eq!(inputs, ["x", "w"]);
        let shapes = infer_shapes(&model, "conv.onnx").unwrap();
        let n = || Dim::Symbol("N".into());
        assert_eq!(
            shapes["y"],
            vec![n(), Dim::Fixed(4), Dim::Fixed(6), Dim::Fixed(6)]
        );
        assert_eq!(shapes["z"], vec![n(), Dim::Fixed(144)]);
        assert_eq!(shapes["w"], [4, 3, 3, 3].map(Dim::Fixed).to_vec());
    }
}
