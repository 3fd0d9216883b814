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

/// The fixed value of a dimension, if it has one.
pub fn fixed(dim: &Dim) -> Option<i64> {
    match dim {
        Dim::Fixed(n) => Some(*n),
        Dim::Symbol(_) => None,
    }
}

/// Runs tract's shape inference on a (normalised) model and returns the known shapes by tensor name.
pub fn infer_shapes(model: &pb::ModelProto, shown: &str) -> Result<HashMap<String, Shape>> {
    crate::guard::catch_panic(|| tract_shapes(model, shown)).unwrap_or_else(|panic| {
        Err(Error::invalid_model(format!(
            "`{shown}`: tract failed while inferring shapes: {panic}; the graph is probably malformed"
        )))
    })
}

fn tract_shapes(model: &pb::ModelProto, shown: &str) -> Result<HashMap<String, Shape>> {
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
    let mut shapes = HashMap::with_capacity(parsed.outlets_by_name.len());
    for (name, outlet) in &parsed.outlets_by_name {
        let Ok(fact) = inference.outlet_fact(*outlet) else {
            continue;
        };
        if let Some(dims) = fact.shape.concretize() {
            shapes.insert(name.clone(), dims.iter().map(to_dim).collect());
        }
    }
    Ok(shapes)
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
