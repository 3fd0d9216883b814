//! Running a joint graph with tract on seeded inputs and reading back every loss term.

use std::collections::HashMap;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::pb;
use crate::plan::Role;

/// The largest input the check feeds (2^30 values, 4 GiB of float32).
const MAX_INPUT_ELEMENTS: usize = 1 << 30;

/// One scalar output of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Term {
    pub name: String,
    pub value: f32,
}

/// Runs `model` with tract at batch size `batch`: float inputs from a seeded generator, integer
/// inputs (labels, CRD's indices) `i % bound` with the bound their sidecar role records.
/// Returns every scalar float output (the loss and its terms), in output order.
pub fn run_losses(
    model: &pb::ModelProto,
    roles: &[Role],
    batch: usize,
    shown: &str,
) -> Result<Vec<Term>> {
    let values = seeded_feeds(model, roles, batch, &mut HashMap::new(), shown)?;
    let mut terms = Vec::new();
    for (name, value) in run_graph(model, values, shown)? {
        if value.rank() == 0 && value.datum_type() == f32::datum_type() {
            let v = value
                .cast_to_scalar::<f32>()
                .map_err(|e| Error::invalid_model(format!("`{shown}`: output `{name}`: {e}")))?;
            terms.push(Term { name, value: v });
        }
    }
    Ok(terms)
}

/// Runs a graph kdgraph derived (gradients, a training step) with tract at batch size `batch`:
/// the inputs in `known` as given, the others seeded as [`run_losses`] seeds them. Fails unless
/// every float output is finite, naming the first that is not.
pub fn run_finite(
    model: &pb::ModelProto,
    roles: &[Role],
    batch: usize,
    mut known: HashMap<String, Tensor>,
    shown: &str,
) -> Result<()> {
    let values = seeded_feeds(model, roles, batch, &mut known, shown)?;
    for (name, value) in run_graph(model, values, shown)? {
        if value.datum_type() != f32::datum_type() {
            continue;
        }
        let finite = value
            .to_plain_array_view::<f32>()
            .map(|v| v.iter().all(|x| x.is_finite()))
            .unwrap_or(true);
        if !finite {
            return Err(Error::unsupported(format!(
                "`{shown}`: output `{name}` is not finite when tract runs the graph on seeded inputs at batch {batch}; please report this with the models"
            )));
        }
    }
    Ok(())
}

/// One value per fed input: from `known` where given, else seeded (float) or `i % bound`
/// (integer inputs with an index bound in `roles`).
fn seeded_feeds(
    model: &pb::ModelProto,
    roles: &[Role],
    batch: usize,
    known: &mut HashMap<String, Tensor>,
    shown: &str,
) -> Result<Vec<Tensor>> {
    let mut values = Vec::new();
    for (index, input) in fed_inputs(model, shown)?.into_iter().enumerate() {
        if let Some(value) = known.remove(&input.name) {
            values.push(value);
            continue;
        }
        let (elem_type, dims) = input_type(input, batch)?;
        let elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elements.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
            return Err(Error::unsupported(format!(
                "`{shown}`: input `{}` of shape {dims:?} is too large to check here; pass --no-check \
                 (merge) or a smaller --batch / --check-batch",
                input.name
            )));
        }
        let count: usize = dims.iter().product();
        let value = if elem_type == pb::tensor_proto::DataType::Int64 as i32 {
            let bound = roles
                .iter()
                .find(|r| r.name == input.name)
                .and_then(|r| r.index_bound)
                .filter(|&b| b > 0)
                .ok_or_else(|| {
                    Error::invalid_model(format!(
                        "`{shown}`: integer input `{}` has no index bound in the sidecar; run kdgraph merge again",
                        input.name
                    ))
                })?;
            tract_ndarray::ArrayD::from_shape_vec(
                dims.clone(),
                (0..count).map(|i| (i as i64) % bound).collect::<Vec<_>>(),
            )
            .map(|a| a.into_tensor())
        } else {
            tract_ndarray::ArrayD::from_shape_vec(dims.clone(), seeded_uniform(count, index as u64))
                .map(|a| a.into_tensor())
        }
        .map_err(|e| Error::invalid_model(format!("input `{}`: {e}", input.name)))?;
        values.push(value);
    }
    Ok(values)
}

/// `count` values in [-1, 1) from a xorshift generator seeded by `seed`.
fn seeded_uniform(count: usize, seed: u64) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ seed;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The graph inputs a caller feeds (those that are not initializers), in order.
pub fn fed_inputs<'a>(
    model: &'a pb::ModelProto,
    shown: &str,
) -> Result<Vec<&'a pb::ValueInfoProto>> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` holds no graph")))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect())
}

/// Runs `model` with tract on `values` (one per fed input, in order) and returns every output
/// by name, in the graph's order.
pub fn run_graph(
    model: &pb::ModelProto,
    values: Vec<Tensor>,
    shown: &str,
) -> Result<Vec<(String, Tensor)>> {
    crate::guard::catch_panic(|| run_tract(model, values, shown)).unwrap_or_else(|panic| {
        Err(Error::unsupported(format!(
            "tract failed while running `{shown}`: {panic}"
        )))
    })
}

fn run_tract(
    model: &pb::ModelProto,
    values: Vec<Tensor>,
    shown: &str,
) -> Result<Vec<(String, Tensor)>> {
    let fail = |stage: &str, e: TractError| {
        Error::unsupported(format!(
            "tract could not {stage} `{shown}`: {}",
            e.chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ")
        ))
    };
    let mut inference = tract_onnx::onnx()
        .model_for_proto_model(
            crate::onnx::normalize::for_tract(model)
                .as_ref()
                .unwrap_or(model),
        )
        .map_err(|e| fail("read", e))?;
    for (index, value) in values.iter().enumerate() {
        let fact = InferenceFact::dt_shape(value.datum_type(), value.shape());
        inference
            .set_input_fact(index, fact)
            .map_err(|e| fail("set the inputs of", e))?;
    }
    // Not decluttered: tract's decluttering can merge a teacher and a student that compute the
    // same tensors (one model merged with itself) into a node it then cannot evaluate.
    let runnable = inference
        .into_typed()
        .and_then(|m| m.into_runnable())
        .map_err(|e| fail("prepare", e))?;
    let outputs = runnable
        .run(values.into_iter().map(|v| v.into_tvalue()).collect())
        .map_err(|e| fail("run", e))?;
    let graph = model.graph.as_ref().expect("checked by fed_inputs");
    Ok(graph
        .output
        .iter()
        .zip(outputs)
        .map(|(info, value)| (info.name.clone(), value.into_tensor()))
        .collect())
}

/// Whether `value` fits graph input `input`: its element type and rank, and every fixed dim.
/// The error says what differs (the caller names the array).
pub fn check_fed_value(
    input: &pb::ValueInfoProto,
    value: &Tensor,
    shown: &str,
) -> std::result::Result<(), String> {
    let Some(pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Ok(());
    };
    let expected = crate::onnx::proto::dtype_name(t.elem_type);
    let got = match value.datum_type() {
        DatumType::F32 => "float32",
        DatumType::F64 => "float64",
        DatumType::I64 => "int64",
        DatumType::I32 => "int32",
        DatumType::Bool => "bool",
        _ => "unsupported",
    };
    if got != expected {
        return Err(format!(
            "is {got}, but input `{}` of `{shown}` is {expected}",
            input.name
        ));
    }
    let Some(shape) = t.shape.as_ref() else {
        return Ok(());
    };
    let fits = shape.dim.len() == value.rank()
        && shape
            .dim
            .iter()
            .zip(value.shape())
            .all(|(d, &n)| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(want)) => want == n as i64,
                _ => true,
            });
    if !fits {
        let want: Vec<String> = shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) => n.to_string(),
                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                None => "?".into(),
            })
            .collect();
        return Err(format!(
            "has shape {:?}, but input `{}` of `{shown}` is [{}]",
            value.shape(),
            input.name,
            want.join(", ")
        ));
    }
    Ok(())
}

/// Element type and concrete dims of an input, with every symbolic dim set to `batch`.
fn input_type(input: &pb::ValueInfoProto, batch: usize) -> Result<(i32, Vec<usize>)> {
    let pb::type_proto::Value::TensorType(t) = input
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .ok_or_else(|| Error::invalid_model(format!("input `{}` has no type", input.name)))?;
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                        n as usize
                    }
                    _ => batch,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((t.elem_type, dims))
}
