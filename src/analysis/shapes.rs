//! Shapes of every named tensor of a model, from tract's shape inference (batch dims stay symbolic).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{Error, Result};
use crate::onnx::pb;

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
